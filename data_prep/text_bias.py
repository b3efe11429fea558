"""A text-bias testbed: the synthetic colour questions with a caption that names an answer (docs/text_bias.md).

Each question is the demo's ("What colour is the shape in the image?", options red, green,
blue, yellow in that order, one shape drawn by ``synthetic.py``), preceded by a cue line,
``the shape is <colour>``, which names one of the options. In the training file the cue names
the drawn colour with probability ``cue_accuracy`` (default 0.75) and another colour otherwise,
so a policy that copies the cue earns 0.75 while one that reads the picture earns 1. The
held-out file is balanced over three splits, in turn row by row (so any prefix of it, such as
``data.eval_limit`` keeps, is balanced too):

- ``aligned``: the cue names the drawn colour;
- ``conflict``: the cue names another colour;
- ``no_cue``: no cue line (the demo's question).

Both files are DDM parquet (``image``, ``problem``, ``solution``) with two more columns:
``source``, the row's split (``aligned`` or ``conflict`` in training), by which validation
logs ``val/accuracy/<source>``, and ``cue``, the letter of the option the cue names ("" without
a cue), which ``TextBiasMetrics`` reads. Every word of a cue is in the offline tokenizer's
vocabulary (``tiny_model.tokenizer_vocabulary``). The rows are a pure function of the settings;
the two files come from separate random streams, so either can be rebuilt alone.

    python -m dapo_lightning.data_prep text-bias --out data/text_bias --rows 640 --eval-rows 192 --cue-accuracy 0.75
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from dapo_lightning.data_prep.synthetic import COLOURS, LETTERS, QUESTIONS, SHAPES, _render

SPLITS = ("aligned", "conflict", "no_cue")
TRAIN_FILE, EVAL_FILE = "train.parquet", "eval.parquet"
OPTIONS = tuple(COLOURS)  # red, green, blue, yellow: the demo's fixed order (option A is always red)


def cue_line(colour: str) -> str:
    """The caption that names ``colour``: words the offline tokenizer has (no ``<unk>``)."""
    return f"the shape is {colour}"


def problem_text(cue: str | None) -> str:
    """The cue line (none for ``no_cue``), the demo's colour question, then the four options in the fixed order."""
    lines = ([] if cue is None else [cue_line(cue)]) + [QUESTIONS["colour"]]
    return "\n".join(lines + [f"{LETTERS[i]}: {colour}" for i, colour in enumerate(OPTIONS)])


@dataclass(frozen=True)
class TextBiasConfig:
    rows: int = 640  # training questions
    eval_rows: int = 192  # held-out questions, a third per split
    cue_accuracy: float = 0.75  # probability that a training cue names the drawn colour
    seed: int = 0
    image_size: int = 56  # the tiny model's image side

    def __post_init__(self) -> None:
        for name, minimum in (("rows", 1), ("eval_rows", 1), ("seed", 0), ("image_size", 28)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: must be a whole number >= {minimum}, got {value!r}")
        p = self.cue_accuracy
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"cue_accuracy: must be a probability in [0, 1], got {p!r}")

    @classmethod
    def from_settings(cls, settings: dict, key: str) -> TextBiasConfig:
        """From a config's dict; every error names ``key``.<field> (unknown fields too)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: not a text-bias setting; choose from {', '.join(sorted(known))}")
        try:
            return cls(**settings)
        except ValueError as error:
            raise ValueError(f"{key}.{error}") from None


def _row(rng: random.Random, size: int, colour: str, cue: str | None, split: str) -> dict:
    shape = rng.choice(SHAPES)
    return {
        "image": {"bytes": _render(rng, size, colour, shape, 1), "path": None},
        "problem": problem_text(cue),
        "solution": LETTERS[OPTIONS.index(colour)],
        "source": split,
        "cue": "" if cue is None else LETTERS[OPTIONS.index(cue)],
    }


def _other(rng: random.Random, colour: str) -> str:
    return rng.choice([c for c in OPTIONS if c != colour])


def training_rows(config: TextBiasConfig) -> list[dict]:
    """``config.rows`` rows; each cue names the drawn colour with probability ``config.cue_accuracy``."""
    rng = random.Random(f"text-bias-train-{config.seed}")
    rows = []
    for _ in range(config.rows):
        colour = rng.choice(OPTIONS)
        right = rng.random() < config.cue_accuracy
        cue = colour if right else _other(rng, colour)
        rows.append(_row(rng, config.image_size, colour, cue, "aligned" if right else "conflict"))
    return rows


def held_out_rows(config: TextBiasConfig) -> list[dict]:
    """``config.eval_rows`` rows, split ``SPLITS[i % 3]`` for row i (balanced, in every prefix)."""
    rng = random.Random(f"text-bias-eval-{config.seed}")
    rows = []
    for i in range(config.eval_rows):
        split = SPLITS[i % len(SPLITS)]
        colour = rng.choice(OPTIONS)
        cue = {"aligned": colour, "conflict": _other(rng, colour), "no_cue": None}[split]
        rows.append(_row(rng, config.image_size, colour, cue, split))
    return rows


def write_rows(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write the rows to ``path`` atomically (a temporary file renamed into place, as ``synthetic.write_parquet``)."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = Features({"image": ImageFeature(), "problem": Value("string"), "solution": Value("string"),
                         "source": Value("string"), "cue": Value("string")})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Dataset.from_list(rows, features=features).to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_files(train_path: str | os.PathLike | None, eval_path: str | os.PathLike | None,
                 config: TextBiasConfig) -> list[str]:
    """Write the training and held-out files that do not exist yet (a None path is left alone); what was written."""
    written = []
    if train_path is not None and not Path(train_path).exists():
        write_rows(train_path, training_rows(config))
        written.append(f"text-bias training questions to {train_path}")
    if eval_path is not None and not Path(eval_path).exists():
        write_rows(eval_path, held_out_rows(config))
        written.append(f"text-bias held-out questions ({', '.join(SPLITS)}) to {eval_path}")
    return written


# --- the command -------------------------------------------------------------------------------------


def _whole(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dapo_lightning.data_prep text-bias",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help=f"output folder: {TRAIN_FILE} and {EVAL_FILE} are written there")
    parser.add_argument("--rows", type=_whole(1), default=640, help="training questions (default 640)")
    parser.add_argument("--eval-rows", type=_whole(1), default=192,
                        help=f"held-out questions, in turn {', '.join(SPLITS)} (default 192)")
    parser.add_argument("--cue-accuracy", type=_probability, default=0.75,
                        help="probability that a training cue names the drawn colour (default 0.75)")
    parser.add_argument("--seed", type=_whole(0), default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=_whole(28), default=56, help="square image side in pixels (default 56)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TextBiasConfig(rows=args.rows, eval_rows=args.eval_rows, cue_accuracy=args.cue_accuracy,
                            seed=args.seed, image_size=args.image_size)
    train = write_rows(Path(args.out) / TRAIN_FILE, training_rows(config))
    held_out = write_rows(Path(args.out) / EVAL_FILE, held_out_rows(config))
    print(f"wrote {config.rows} training questions to {train} and {config.eval_rows} held-out questions "
          f"({', '.join(SPLITS)}) to {held_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
