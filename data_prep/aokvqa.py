"""A-OKVQA -> DDM (docs/spec.md section 1).

Source fields, as the hub's ``HuggingFaceM4/A-OKVQA`` has them: ``question_id``,
``image``, ``question``, ``choices`` (four strings), ``correct_choice_idx``,
``direct_answers``, ``difficult_direct_answer``, ``rationales``. The problem is
the question then ``A: choice0``, ``B: choice1``, ...; the solution is the letter
of ``correct_choice_idx``. The test split has no ``correct_choice_idx``; its rows
drop as "answer not among options". ``--question-ids`` keeps only the listed
questions (e.g. the subset the original DDM used).

    python -m dapo_lightning.data_prep aokvqa --hub HuggingFaceM4/A-OKVQA --split train --out data/aokvqa.parquet
    python -m dapo_lightning.data_prep aokvqa --input aokvqa-train.parquet --question-ids keep.txt --out data/aokvqa.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dapo_lightning.data.rows import LETTERS
from dapo_lightning.data_prep.pipeline import (
    ANSWER_NOT_AMONG_OPTIONS,
    NOT_SELECTED,
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

NAME = "aokvqa"
FIELDS = ("question_id", "image", "question", "choices", "correct_choice_idx")


def to_mcq_row(data: dict[str, Any], question_ids: frozenset[str] | None = None) -> tuple[str, str, Any]:
    """``(problem, solution, image)`` of one A-OKVQA row; raises :class:`Drop`."""
    if question_ids is not None and str(data["question_id"]) not in question_ids:
        raise Drop(NOT_SELECTED, f"question_id {data['question_id']!r}")
    choices = parse_options(data["choices"])
    index = data["correct_choice_idx"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(choices):
        raise Drop(ANSWER_NOT_AMONG_OPTIONS, f"correct_choice_idx {index!r} is not an index of {len(choices)} choices")
    return format_problem(data["question"], choices), LETTERS[index], data["image"]


def read_question_ids(path: Path) -> frozenset[str]:
    """One id per line; blank lines and ``#`` comments are ignored."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return frozenset(line for line in lines if line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_lightning.data_prep aokvqa",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(parser, what="A-OKVQA rows")
    parser.add_argument(
        "--question-ids", type=Path, metavar="FILE", help="keep only these question ids (a text file, one per line)"
    )
    add_output_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = source_from_args(args, parser)
    if args.question_ids is not None and not args.question_ids.is_file():
        parser.error(f"--question-ids {args.question_ids}: no such file")
    question_ids = read_question_ids(args.question_ids) if args.question_ids is not None else None
    options = options_from_args(args)
    report = DropReport(NAME)

    def work() -> None:
        check_fields(source, FIELDS, "A-OKVQA")
        records = iter_records(source, columns=FIELDS, image_columns=("image",), batch_size=options.batch_size)
        convert(records, lambda data: to_mcq_row(data, question_ids), options, report, total=count_rows(source))

    return run_reported(report, args.out, work)


if __name__ == "__main__":
    sys.exit(main())
