"""MMMU-Pro -> DDM (docs/spec.md section 1).

Configs ``standard (4 options)`` and ``standard (10 options)`` of the hub's
``MMMU/MMMU_Pro``. Source fields: ``id``, ``question``, ``options`` (a string
holding a Python list literal, parsed with ``ast.literal_eval``, never ``eval``),
``explanation``, ``image_1`` .. ``image_7``, ``img_type``, ``answer`` (a letter),
``topic_difficulty``, ``subject``. Options get letters A..J in order.

Only single-image items are converted by default: the DDM row has one picture,
and a question about ``<image 2>`` cannot be answered from ``image_1``.
Multi-image items are counted ("multi-image") and skipped; ``--multi-image first``
keeps them with their first image instead. ``<image 1>`` placeholders stay in
the text. (The ``vision`` config has no ``question`` field and is refused.)

    python -m dapo_lightning.data_prep mmmu-pro --hub MMMU/MMMU_Pro --config "standard (10 options)" --split test --out data/mmmu10.parquet
    python -m dapo_lightning.data_prep mmmu-pro --input mmmu-pro-standard4.parquet --out data/mmmu4.parquet
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dapo_lightning.data.rows import LETTERS
from dapo_lightning.data_prep.pipeline import (
    ANSWER_NOT_AMONG_OPTIONS,
    MISSING_IMAGE,
    MULTI_IMAGE,
    Drop,
    DropReport,
    add_input_arguments,
    add_output_arguments,
    convert,
    format_problem,
    options_from_args,
    parse_options,
    run_reported,
    source_from_args,
)
from dapo_lightning.data_prep.sources import check_fields, count_rows, iter_records

NAME = "mmmu-pro"
FIELDS = ("id", "question", "options", "answer", "image_1")
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, 8))
READ_COLUMNS = ("id", "question", "options", "answer", *IMAGE_COLUMNS)


def to_mcq_row(data: dict[str, Any], multi_image: str = "skip") -> tuple[str, str, Any]:
    """``(problem, solution, image)`` of one MMMU-Pro row; raises :class:`Drop`."""
    present = [name for name in IMAGE_COLUMNS if data.get(name) is not None]
    if not present:
        raise Drop(MISSING_IMAGE, "image_1..image_7 are all empty")
    if len(present) > 1 and multi_image == "skip":
        raise Drop(MULTI_IMAGE, f"id {data['id']!r} has {len(present)} images ({', '.join(present)})")
    options = parse_options(data["options"])
    answer = data["answer"]
    letter = answer.strip().upper() if isinstance(answer, str) else ""
    if len(letter) != 1 or letter not in LETTERS[: len(options)]:
        raise Drop(ANSWER_NOT_AMONG_OPTIONS, f"answer {answer!r} is not a letter of A-{LETTERS[len(options) - 1]}")
    return format_problem(data["question"], options), letter, data[present[0]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_lightning.data_prep mmmu-pro",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(parser, what="MMMU-Pro standard-config rows")
    parser.add_argument(
        "--multi-image",
        choices=("skip", "first"),
        default="skip",
        help="items with several images: skip them (default) or keep the first image",
    )
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = source_from_args(args, parser)
    options = options_from_args(args)
    report = DropReport(NAME)

    def work() -> None:
        check_fields(source, FIELDS, "MMMU-Pro (standard config)")
        records = iter_records(source, columns=READ_COLUMNS, image_columns=IMAGE_COLUMNS, batch_size=options.batch_size)
        convert(records, lambda data: to_mcq_row(data, args.multi_image), options, report, total=count_rows(source))

    return run_reported(report, args.out, work)


if __name__ == "__main__":
    sys.exit(main())
