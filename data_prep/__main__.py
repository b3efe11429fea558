"""``python -m dapo_lightning.data_prep COMMAND ...`` (also the ``dapo-data`` console script): build the DDM training set.

Each command is a module with its own ``main(argv) -> int`` and ``--help``; this
file only dispatches, importing the chosen module lazily so ``--help`` is quick.
Exit codes: 0 done; 2 bad usage, an input schema not recognised, or a file that
fails validation (the message, on stderr, names the file and what is missing).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one line for the overview)
COMMANDS = {
    "aokvqa": ("dapo_lightning.data_prep.aokvqa", "A-OKVQA (hub or local files) -> DDM parquet"),
    "visrag-arxivqa": ("dapo_lightning.data_prep.visrag_arxivqa", "VisRAG ArxivQA (corpus + queries + qrels) -> DDM parquet"),
    "mmmu-pro": ("dapo_lightning.data_prep.mmmu_pro", "MMMU-Pro standard (4 or 10 options) -> DDM parquet"),
    "merge": ("dapo_lightning.data_prep.merge", "concatenate DDM files: dedup, per-source caps, seeded shuffle"),
    "validate": ("dapo_lightning.data_prep.validate", "check a DDM parquet is a usable training set"),
    "synthetic": ("dapo_lightning.data_prep.synthetic", "synthetic coloured-shape questions (offline demo data)"),
    "text-bias": ("dapo_lightning.data_prep.text_bias", "colour questions whose text cue names an answer (text-bias task)"),
    "modality-filter": ("dapo_lightning.data_prep.modality_filter",
                        "keep the rows a model answers only from image and text together (the paper's data step)"),
    "tiny-model": ("dapo_lightning.data_prep.tiny_model", "a tiny random Qwen2.5-VL checkpoint (offline tests)"),
    "fixtures": ("dapo_lightning.data_prep.fixtures", "the offline model and data a fit config asks for, if missing"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: python -m dapo_lightning.data_prep COMMAND [options]   (or: dapo-data COMMAND [options])",
        "",
        "Build the multiple-choice image training set (docs/spec.md section 1: image, problem, solution).",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "python -m dapo_lightning.data_prep COMMAND --help shows a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exit_:  # argparse: --help exits 0, bad usage exits 2
        code = exit_.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        return code if isinstance(code, int) else (0 if code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
