"""modality-filter: keep the questions that only the image and the text together answer (the paper's data step).

The Debias-DAPO paper trains on questions a model cannot answer from one modality alone. This
command asks a model (any ``from_pretrained`` Qwen2.5-VL: a hub name, a folder, an exported
``final/``) each question of a DDM parquet (SPEC section 1) three ways, greedily:

- ``image_text``: the question with its image, as in training;
- ``text_black``: the question with a black image of the image's size;
- ``image_only``: the image, the question's text replaced by a neutral prompt, its option lines kept.

The two probes are ``ModalityProbe``'s (``blank_image``, ``neutral_problem``). A prompt is built and
encoded by the data module's collator (``data/collate.py``: row checks, chat template, system prompt,
``max_image_side``, the image fitted to ``max_prompt_length``) and answered by the rollout's greedy
decoder with the vision tokens suppressed (``rollout.generate``); each answer is scored by the accuracy
reward (SPEC section 2). A row is kept when only ``image_text`` is right, else dropped for the first of
``image_text_wrong``, ``text_alone_right`` (answered with a black image), ``image_alone_right``
(answered without the question) or ``unusable`` (the row checks refuse it; the report says why).

The kept rows go to ``--out`` unchanged (every column, image bytes included, in the input's schema),
published only when the whole file is done (``storage.atomic_write``): a run that fails or is stopped
leaves ``--out`` as it was. The JSON report (``--report``; default: ``OUT`` with ``.report.json``) has
the count per reason, the kept rows and, per dropped row, its row in the input file (from 0, as
``validate`` counts), reason, solution and three answers; the counts are printed as a Markdown table.
Cost: three greedy generations per row, each up to ``--max-new-tokens`` tokens.

    python -m dapo_lightning.data_prep modality-filter data/ddm.parquet --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --out data/ddm.filtered.parquet --device cuda --dtype bfloat16 --batch-size 16
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from dapo_lightning import storage
from dapo_lightning.batch import PromptBatch, SourceRow
from dapo_lightning.callbacks.modality_probe import NEUTRAL_PROMPT, blank_image, neutral_problem
from dapo_lightning.config import PolicyConfig, RolloutConfig
from dapo_lightning.data.collate import PromptCollator
from dapo_lightning.data.module import VisualMCQDataModule
from dapo_lightning.data_prep.io import EmptyOutput
from dapo_lightning.data_prep.pipeline import positive_int
from dapo_lightning.data_prep.validate import SchemaProblem, check_schema
from dapo_lightning.models import load_policy, load_processor
from dapo_lightning.prompts import SYSTEM_PROMPT
from dapo_lightning.rewards.accuracy import extract_answer, score
from dapo_lightning.rollout import SamplingSettings, TokenIds, generate

VARIANTS = ("image_text", "text_black", "image_only")
KEPT = "kept"
IMAGE_TEXT_WRONG, TEXT_ALONE_RIGHT, IMAGE_ALONE_RIGHT = "image_text_wrong", "text_alone_right", "image_alone_right"
UNUSABLE = "unusable"
REASONS = (KEPT, IMAGE_TEXT_WRONG, TEXT_ALONE_RIGHT, IMAGE_ALONE_RIGHT, UNUSABLE)  # in the report's order


def reason_for(right: dict[str, bool]) -> str:
    """``KEPT`` when only ``image_text`` is right; else the first reason in ``REASONS`` that drops the row."""
    if not right["image_text"]:
        return IMAGE_TEXT_WRONG
    if right["text_black"]:
        return TEXT_ALONE_RIGHT
    if right["image_only"]:
        return IMAGE_ALONE_RIGHT
    return KEPT


@dataclass(frozen=True)
class Verdict:
    """What became of one input row."""

    row: int  # in the input file, from 0
    reason: str  # one of REASONS
    solution: str | None = None  # upper-cased and stripped, as the collator reads it (None: unusable)
    answers: dict[str, str | None] | None = None  # variant -> extract_answer of its completion (None: unusable)
    detail: str | None = None  # unusable: the row check's message, naming the file and row


class ThreeWayAnswerer:
    """A policy answering DDM rows three ways (``VARIANTS``), greedily, their prompts encoded as in training."""

    def __init__(self, model, processor, *, system_prompt: str | None, max_image_side: int | None,
                 max_prompt_length: int | None, max_new_tokens: int, neutral_prompt: str = NEUTRAL_PROMPT):
        self.model = model.eval()
        self.tokenizer = processor.tokenizer
        self.device = next(model.parameters()).device
        self.neutral_prompt = neutral_prompt
        # on_bad_row="skip" without refill_from: an unusable row leaves its batch and is listed in batch.skipped
        self.collate = PromptCollator(processor, source="<rows>", system_prompt=system_prompt,
                                      max_image_side=max_image_side, max_prompt_length=max_prompt_length,
                                      on_bad_row="skip")
        self.settings = SamplingSettings(num_generations=1, max_new_tokens=max_new_tokens, greedy=True)
        self.token_ids = TokenIds.from_tokenizer(self.tokenizer, getattr(model, "generation_config", None))

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """One verdict per row, in order; each row carries ``"_index"`` (its row in the file) and ``"_source_row"``."""
        image_text = self.collate(rows)
        by_index = {row["_index"]: row for row in rows}
        usable = [by_index[i] for i in image_text.index]
        prompts = {
            "image_text": image_text,
            # the image as the model sees it (fitted to max_prompt_length if need be): same size, same image tokens
            "text_black": self.collate([{**row, "image": blank_image(image.size, "black")}
                                        for row, image in zip(usable, image_text.images)]),
            "image_only": self.collate([{**row, "problem": neutral_problem(row["problem"], self.neutral_prompt)}
                                        for row in usable]),
        }
        unusable = {error.row: error for batch in prompts.values() for error in batch.skipped}
        completions = {name: dict(zip(batch.index, self.answer(batch))) for name, batch in prompts.items()}
        solutions = dict(zip(image_text.index, image_text.columns.get("solution", [])))
        verdicts = []
        for index in by_index:
            if index in unusable:
                verdicts.append(Verdict(index, UNUSABLE, detail=str(unusable[index])))
                continue
            texts = {name: completions[name][index] for name in VARIANTS}
            right = {name: score(text, solutions[index]) == 1.0 for name, text in texts.items()}
            answers = {name: extract_answer(text) for name, text in texts.items()}
            verdicts.append(Verdict(index, reason_for(right), solutions[index], answers))
        return verdicts

    @torch.no_grad()
    def answer(self, prompts: PromptBatch) -> list[str]:
        """The greedy completion of each prompt (validation's decoder with ``eval_greedy``)."""
        if len(prompts) == 0:
            return []
        rollout = generate(self.model, prompts.to(self.device), self.tokenizer, self.settings, self.token_ids,
                           stage="val")
        return rollout.completions


@dataclass
class FilterReport:
    """The run's settings and one verdict per row read."""

    input: str
    output: str
    model: str
    settings: dict[str, Any]
    verdicts: list[Verdict] = field(default_factory=list)
    written: bool = False  # the kept rows were published at ``output``

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(REASONS, 0)
        for verdict in self.verdicts:
            counts[verdict.reason] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        dropped = [{k: v for k, v in asdict(verdict).items() if v is not None}
                   for verdict in self.verdicts if verdict.reason != KEPT]
        return {"input": self.input, "output": self.output if self.written else None, "model": self.model,
                "settings": self.settings, "rows": len(self.verdicts), "counts": self.counts(),
                "kept_rows": [verdict.row for verdict in self.verdicts if verdict.reason == KEPT], "dropped": dropped}

    def table(self) -> str:
        """The counts as a Markdown table."""
        total = len(self.verdicts)
        lines = [f"modality-filter {self.input}: {total} rows", "", "| reason | rows | share |", "|---|---:|---:|"]
        for reason, count in self.counts().items():
            lines.append(f"| {reason} | {count} | {count / total:.1%} |" if total else f"| {reason} | 0 | - |")
        return "\n".join(lines)


def filter_file(path: Path, out: Path, answerer: ThreeWayAnswerer, report: FilterReport, *, batch_size: int,
                limit: int | None = None) -> None:
    """Judge the rows of ``path`` (the first ``limit``), ``batch_size`` at a time, into ``report.verdicts``; write the
    kept ones to ``out`` atomically. Raises :class:`EmptyOutput` (nothing written) when no row is kept."""
    from tqdm import tqdm

    parquet = pq.ParquetFile(path)
    total = parquet.metadata.num_rows if limit is None else min(limit, parquet.metadata.num_rows)

    def write(file) -> None:
        bar = tqdm(total=total, desc="modality-filter", unit="row", disable=None, file=sys.stderr)
        start = 0
        with bar, pq.ParquetWriter(file, parquet.schema_arrow) as writer:
            for batch in parquet.iter_batches(batch_size=batch_size):
                batch = batch.slice(0, total - start)
                if batch.num_rows == 0:
                    break
                rows = [{**row, "_index": start + k, "_source_row": SourceRow(str(path), start + k)}
                        for k, row in enumerate(batch.to_pylist())]
                verdicts = answerer.judge(rows)
                kept = [k for k, verdict in enumerate(verdicts) if verdict.reason == KEPT]
                if kept:
                    writer.write_batch(batch.take(kept))  # the input's own arrow values: byte for byte
                report.verdicts.extend(verdicts)
                start += batch.num_rows
                bar.update(batch.num_rows)
        if not report.counts()[KEPT]:
            raise EmptyOutput(f"{out}: no row is answered by image and text alone together; nothing written")

    storage.atomic_write(out, write, what="filtered parquet")
    report.written = True


def write_report(report: FilterReport, path: Path) -> None:
    text = json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n"
    storage.atomic_write(path, lambda file: file.write(text.encode("utf-8")), what="report")


# ---------------------------------------------------------------- command line


def _data_default(key: str) -> Any:
    """The data module's default for ``data.<key>``: a prompt is then encoded as in a run that leaves it unset."""
    return inspect.signature(VisualMCQDataModule.__init__).parameters[key].default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_lightning.data_prep modality-filter",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, metavar="FILE", help="DDM parquet (image, problem, solution, ...)")
    parser.add_argument("--model", required=True, help="hub name or folder of the Qwen2.5-VL that answers")
    parser.add_argument("--out", required=True, type=Path, help="parquet of the kept rows (written atomically)")
    parser.add_argument("--report", type=Path, help="JSON report (default: OUT with the suffix .report.json)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="questions answered at a time, each variant in its own batch (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device of the model (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=PolicyConfig.dtype,
                        help=f"parameter dtype (default {PolicyConfig.dtype}, model.policy.dtype's; bfloat16 on GPUs)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="judge only the first N rows")
    parser.add_argument("--max-new-tokens", type=positive_int, default=RolloutConfig.max_completion_length,
                        metavar="N", help="tokens per answer at most (default "
                        f"{RolloutConfig.max_completion_length}, model.rollout.max_completion_length's)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", default=SYSTEM_PROMPT, metavar="TEXT",
                        help="data.system_prompt (default: its default, prompts.SYSTEM_PROMPT)")
    prompt.add_argument("--no-system-prompt", dest="system_prompt", action="store_const", const=None,
                        help="no system turn (data.system_prompt: null, as configs/demo.yaml)")
    parser.add_argument("--max-image-side", type=positive_int, default=_data_default("max_image_side"), metavar="PX",
                        help=f"data.max_image_side (default {_data_default('max_image_side')})")
    parser.add_argument("--max-prompt-length", type=positive_int, default=_data_default("max_prompt_length"),
                        metavar="N", help="data.max_prompt_length (default: none)")
    parser.add_argument("--neutral-prompt", default=NEUTRAL_PROMPT, metavar="TEXT",
                        help=f"replaces the question's text in image_only (default {NEUTRAL_PROMPT!r})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"{args.input}: no such file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    try:
        check_schema(args.input)
    except SchemaProblem as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        model = load_policy(args.model, dtype=args.dtype).to(args.device)
        processor = load_processor(args.model)
    except (OSError, ValueError) as error:
        print(f"error: --model {args.model}: cannot load it ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    answerer = ThreeWayAnswerer(model, processor, system_prompt=args.system_prompt,
                                max_image_side=args.max_image_side, max_prompt_length=args.max_prompt_length,
                                max_new_tokens=args.max_new_tokens, neutral_prompt=args.neutral_prompt)
    settings = {key: getattr(args, key) for key in ("batch_size", "device", "dtype", "limit", "max_new_tokens",
                                                    "system_prompt", "max_image_side", "max_prompt_length",
                                                    "neutral_prompt")}
    report = FilterReport(str(args.input), str(args.out), args.model, settings)
    report_path = args.report or args.out.with_suffix(".report.json")
    try:
        filter_file(args.input, args.out, answerer, report, batch_size=args.batch_size, limit=args.limit)
    except EmptyOutput as error:
        print(f"error: {error}", file=sys.stderr)
    write_report(report, report_path)
    print(report.table())
    print(f"\nreport: {report_path}")
    if not report.written:
        return 2
    print(f"kept {report.counts()[KEPT]} of {len(report.verdicts)} rows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
