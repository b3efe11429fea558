"""VisRAG ArxivQA -> DDM (docs/spec.md section 1).

The hub's ``openbmb/VisRAG-Ret-Test-ArxivQA`` is a retrieval benchmark in three
configs: ``corpus`` (``corpus-id``, ``image``), ``queries`` (``query-id``,
``query``, ``answer``, ``options``) and ``qrels`` (``query-id``, ``corpus-id``,
``score``). A DDM row joins a query with its one positive image (a qrel with
score > 0). Queries with no positive, or with several positive images (the
question would be about a picture we cannot pick), are dropped and counted.

Options may carry their own letters (``A) text``, ``A. text``, ``(A) text``);
the prefix is stripped when its letter is the option's position, since the
problem adds ``A: `` itself. The answer may be a letter (``B``, ``(B)``,
``B) text``) or an option's text, which is mapped to that option's letter.

Memory: queries and qrels (text) are read whole; the corpus (the images) is
streamed once, and each positive image is written when it streams past. Rows
therefore come out in corpus order (queries sharing an image in query order).

    python -m dapo_lightning.data_prep visrag-arxivqa --hub openbmb/VisRAG-Ret-Test-ArxivQA --split train --out data/arxivqa.parquet
    python -m dapo_lightning.data_prep visrag-arxivqa --corpus corpus/*.parquet --queries queries.parquet --qrels qrels.parquet --out data/arxivqa.parquet
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dapo_lightning.data.rows import LETTERS
from dapo_lightning.data_prep.pipeline import (
    ANSWER_NOT_AMONG_OPTIONS,
    MISSING_IMAGE,
    NO_POSITIVE,
    SEVERAL_POSITIVES,
    ConvertOptions,
    Drop,
    DropReport,
    add_output_arguments,
    convert,
    format_problem,
    options_from_args,
    parse_options,
    progress_bar,
    run_reported,
)
from dapo_lightning.data_prep.sources import LOCAL_SUFFIXES, Record, Source, check_fields, count_rows, iter_records

NAME = "visrag-arxivqa"
CORPUS_FIELDS = ("corpus-id", "image")
QUERY_FIELDS = ("query-id", "query", "answer", "options")
QREL_FIELDS = ("query-id", "corpus-id", "score")
# "B", "(B)", "B)", "B.", "B: text", "B) text": an answer that names its letter.
_LETTER_ANSWER = re.compile(r"^\(?([A-J])(?:\)|[.:)]\s.*|[.:)])?$", re.DOTALL)


def strip_option_prefix(option: str, letter: str) -> str:
    """``"A) text"``, ``"A. text"``, ``"(A) text"`` -> ``"text"`` when ``letter`` is ``A``; anything else unchanged."""
    match = re.match(rf"\s*(?:\({letter}\)\s*|{letter}\)\s*|{letter}[.:]\s+)", option)
    return option[match.end() :].strip() if match else option.strip()


def answer_letter(answer: Any, options: list[str]) -> str:
    """The letter of ``answer``: a letter form, or the text of exactly one (prefix-stripped) option."""
    text = str(answer).strip() if answer is not None else ""
    match = _LETTER_ANSWER.match(text)
    if match:
        letter = match.group(1)
        if letter not in LETTERS[: len(options)]:
            raise Drop(ANSWER_NOT_AMONG_OPTIONS, f"answer {text!r} but only {len(options)} options")
        return letter
    wanted = _normalise(text)
    hits = [index for index, option in enumerate(options) if _normalise(option) == wanted]
    if len(hits) != 1:
        found = "matches no option" if not hits else f"matches {len(hits)} options"
        raise Drop(ANSWER_NOT_AMONG_OPTIONS, f"answer {text!r} {found}")
    return LETTERS[hits[0]]


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def query_to_problem(data: dict[str, Any]) -> tuple[str, str]:
    """``(problem, solution)`` of one query; raises :class:`Drop`."""
    options = [strip_option_prefix(option, LETTERS[i]) for i, option in enumerate(parse_options(data["options"]))]
    letter = answer_letter(data["answer"], options)
    return format_problem(data["query"], options), letter


def positive_images(qrels: Source, batch_size: int) -> dict[str, list[str]]:
    """query-id -> its distinct positive corpus-ids (score > 0), in qrels order."""
    positives: dict[str, list[str]] = {}
    for record in iter_records(qrels, columns=QREL_FIELDS, batch_size=batch_size):
        score = record.data["score"]
        if isinstance(score, (int, float)) and score > 0:
            images = positives.setdefault(str(record.data["query-id"]), [])
            if str(record.data["corpus-id"]) not in images:
                images.append(str(record.data["corpus-id"]))
    return positives


def joined_records(
    corpus: Source, queries: Source, qrels: Source, options: ConvertOptions, report: DropReport
) -> Iterator[Record]:
    """Records ``{"problem", "solution", "image"}`` named by their query row; drops go to ``report``."""
    positives = positive_images(qrels, options.batch_size)
    wanted: dict[str, list[Record]] = {}  # corpus-id -> the queries it answers (text only)
    for record in iter_records(queries, columns=QUERY_FIELDS, batch_size=options.batch_size):
        query_id = str(record.data["query-id"])
        images = positives.get(query_id, [])
        if not images:
            report.drop(NO_POSITIVE, record.where, record.row, f"query-id {query_id!r} has no qrel with score > 0")
            continue
        if len(images) > 1:
            report.drop(SEVERAL_POSITIVES, record.where, record.row, f"query-id {query_id!r}: {', '.join(images)}")
            continue
        try:
            problem, solution = query_to_problem(record.data)
        except Drop as drop:
            report.drop(drop.reason, record.where, record.row, f"query-id {query_id!r}: {drop.detail}")
            continue
        wanted.setdefault(images[0], []).append(
            Record(record.where, record.row, {"problem": problem, "solution": solution})
        )

    seen: set[str] = set()
    corpus_rows = iter_records(corpus, columns=CORPUS_FIELDS, image_columns=("image",), batch_size=options.batch_size)
    for item in progress_bar(corpus_rows, total=count_rows(corpus), desc=NAME):
        corpus_id = str(item.data["corpus-id"])
        if corpus_id in seen or corpus_id not in wanted:
            continue  # an image no kept query needs, or a repeated corpus-id (the first one wins)
        seen.add(corpus_id)
        for query in wanted[corpus_id]:
            yield Record(query.where, query.row, {**query.data, "image": item.data["image"]})
    for corpus_id, queries_of_image in wanted.items():
        if corpus_id not in seen:
            for query in queries_of_image:
                report.drop(MISSING_IMAGE, query.where, query.row, f"corpus-id {corpus_id!r} is not in the corpus")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_lightning.data_prep visrag-arxivqa",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    local = parser.add_argument_group("input: local files of the three configs")
    local.add_argument("--corpus", nargs="+", type=Path, metavar="FILE", help="corpus config (corpus-id, image)")
    local.add_argument(
        "--queries", nargs="+", type=Path, metavar="FILE", help="queries config (query-id, query, answer, options)"
    )
    local.add_argument(
        "--qrels", nargs="+", type=Path, metavar="FILE", help="qrels config (query-id, corpus-id, score)"
    )
    hub = parser.add_argument_group("input: a hub dataset with configs corpus, queries, qrels")
    hub.add_argument("--hub", metavar="NAME", help="e.g. openbmb/VisRAG-Ret-Test-ArxivQA (streamed)")
    hub.add_argument("--split", default="train", help="the split of all three configs (default train)")
    add_output_arguments(parser)
    return parser


def sources_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Source, Source, Source]:
    local = {"corpus": args.corpus, "queries": args.queries, "qrels": args.qrels}
    if args.hub is not None:
        if any(local.values()):
            parser.error("give --hub or --corpus/--queries/--qrels, not both")
        return tuple(Source(hub=args.hub, config=name, split=args.split) for name in local)  # type: ignore[return-value]
    missing = [f"--{name}" for name, files in local.items() if not files]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or give --hub NAME)")
    for path in (path for files in local.values() for path in files):
        if not path.is_file():
            parser.error(f"{path}: no such file")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            parser.error(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}")
    return tuple(Source(files=tuple(files)) for files in local.values())  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    corpus, queries, qrels = sources_from_args(args, parser)
    options = options_from_args(args)
    report = DropReport(NAME)

    def work() -> None:
        check_fields(corpus, CORPUS_FIELDS, "VisRAG ArxivQA corpus")
        check_fields(queries, QUERY_FIELDS, "VisRAG ArxivQA queries")
        check_fields(qrels, QREL_FIELDS, "VisRAG ArxivQA qrels")
        records = joined_records(corpus, queries, qrels, options, report)
        convert(
            records, lambda data: (data["problem"], data["solution"], data["image"]), options, report, progress=False
        )

    return run_reported(report, args.out, work)


if __name__ == "__main__":
    sys.exit(main())
