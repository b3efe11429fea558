"""Synthetic multiple-choice image questions in the DDM parquet format (docs/spec.md section 1).

Each row is a picture of coloured shapes and one question about it: its colour,
its shape or how many shapes there are. Four options, one correct letter. The
rows are a pure function of ``seed``, so tests and benchmarks see the same data
on every machine, and nothing is downloaded.

    python -m dapo_lightning.data_prep.synthetic --out data/synthetic.parquet --rows 512 --seed 0
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNTS = ("1", "2", "3", "4")
QUESTION_TYPES = ("colour", "shape", "count")
QUESTIONS = {
    "colour": "What colour is the shape in the image?",
    "shape": "What shape is in the image?",
    "count": "How many shapes are in the image?",
}
LETTERS = "ABCD"


def vocabulary() -> list[str]:
    """Every word the generated problems use (the offline tokenizer is built from it)."""
    words: list[str] = []
    for text in [*QUESTIONS.values(), *COLOURS, *SHAPES, *COUNTS]:
        words.extend(text.replace("?", " ? ").split())
    return words


@dataclass(frozen=True)
class SyntheticConfig:
    rows: int = 256
    seed: int = 0
    image_size: int = 112
    question_types: tuple[str, ...] = QUESTION_TYPES
    shuffle_options: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.question_types) - set(QUESTION_TYPES)
        if unknown or not self.question_types:
            raise ValueError(f"question_types: unknown {sorted(unknown)}; choose from {QUESTION_TYPES}")
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")
        if self.image_size < 28:
            raise ValueError(f"image_size must be >= 28 pixels, got {self.image_size}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _render(rng: random.Random, size: int, colour: str, shape: str, count: int) -> bytes:
    """A light-grey canvas with ``count`` copies of one shape in one colour.

    One shape is drawn large, near the centre (colour and shape questions); several
    shapes go into distinct quadrants (count questions).
    """
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    if count == 1:
        side = rng.randint(size // 2, size * 7 // 8)
        x0 = rng.randint(0, size - side)
        y0 = rng.randint(0, size - side)
        _draw_shape(draw, shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[colour])
    else:
        cell = size // 2
        margin = max(2, cell // 8)
        for index in rng.sample(range(4), count):
            cx, cy = (index % 2) * cell, (index // 2) * cell
            side = rng.randint(cell // 2, cell - 2 * margin)
            x0 = cx + rng.randint(margin, cell - margin - side)
            y0 = cy + rng.randint(margin, cell - margin - side)
            _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_rows(config: SyntheticConfig) -> list[dict]:
    """Rows ``{"image": {"bytes", "path"}, "problem", "solution"}``, deterministic in ``config``."""
    rng = random.Random(config.seed)
    rows = []
    for _ in range(config.rows):
        kind = rng.choice(config.question_types)
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        count = rng.randint(1, 4) if kind == "count" else 1
        answer = {"colour": colour, "shape": shape, "count": str(count)}[kind]
        options = list({"colour": list(COLOURS), "shape": list(SHAPES), "count": list(COUNTS)}[kind])
        if config.shuffle_options:
            rng.shuffle(options)
        problem = QUESTIONS[kind] + "".join(f"\n{LETTERS[i]}: {text}" for i, text in enumerate(options))
        rows.append(
            {
                "image": {"bytes": _render(rng, config.image_size, colour, shape, count), "path": None},
                "problem": problem,
                "solution": LETTERS[options.index(answer)],
            }
        )
    return rows


def write_parquet(path: str | os.PathLike, config: SyntheticConfig) -> Path:
    """Write the rows to ``path`` atomically (a temporary file renamed into place)."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = generate_rows(config)
    features = Features({"image": ImageFeature(), "problem": Value("string"), "solution": Value("string")})
    dataset = Dataset.from_list(rows, features=features)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        dataset.to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_parquet(path: str | os.PathLike, config: SyntheticConfig) -> Path:
    """Write the dataset unless ``path`` already exists (the demo's build-on-first-use)."""
    path = Path(path)
    return path if path.exists() else write_parquet(path, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dapo_lightning.data_prep synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output parquet path")
    parser.add_argument("--rows", type=int, default=256, help="number of questions (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=112, help="square image side in pixels (default 112)")
    parser.add_argument(
        "--question-types",
        default=",".join(QUESTION_TYPES),
        help=f"comma-separated subset of {','.join(QUESTION_TYPES)} (default all)",
    )
    parser.add_argument("--shuffle-options", action="store_true", help="shuffle option order per question")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = SyntheticConfig(
            rows=args.rows,
            seed=args.seed,
            image_size=args.image_size,
            question_types=tuple(t.strip() for t in args.question_types.split(",") if t.strip()),
            shuffle_options=args.shuffle_options,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = write_parquet(args.out, config)
    print(f"wrote {config.rows} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
