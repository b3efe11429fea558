"""What every source converter shares: DDM row assembly, drop accounting, the streaming loop, the CLI plumbing.

A converter turns one source row into ``(problem, solution, image)`` or raises
:class:`Drop` with a reason. :func:`convert` then applies the checks every DDM
row must pass (the ones the data module and ``validate`` apply, from
``dapo_lightning/data/rows.py``), decodes the image once to prove it is usable (and
shrinks it when ``--max-side`` asks), and streams the row to the atomic writer.
Dropped rows are counted by reason, with the first few examples, and printed:
a converter never drops silently.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dapo_lightning.data import rows as mcq
from dapo_lightning.data_prep.io import MCQParquetWriter, EmptyOutput
from dapo_lightning.data_prep.sources import InputError, Record, SchemaError, Source

# Drop reasons, in the order reports list them. Shared names with mcq.BadRow kinds where they overlap.
MISSING_IMAGE = mcq.MISSING_IMAGE
UNREADABLE_IMAGE = mcq.UNREADABLE_IMAGE
MULTI_IMAGE = "multi-image"
NO_POSITIVE = "no positive"
SEVERAL_POSITIVES = "several positive images"
UNPARSABLE_OPTIONS = "unparsable options"
TOO_MANY_OPTIONS = "too many options"
ANSWER_NOT_AMONG_OPTIONS = mcq.ANSWER_NOT_AMONG_OPTIONS
EMPTY_PROBLEM = mcq.EMPTY_PROBLEM
TOO_LONG = "too long"
NOT_SELECTED = "not in question-id filter"
REASONS = (
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    MULTI_IMAGE,
    NO_POSITIVE,
    SEVERAL_POSITIVES,
    UNPARSABLE_OPTIONS,
    TOO_MANY_OPTIONS,
    ANSWER_NOT_AMONG_OPTIONS,
    EMPTY_PROBLEM,
    TOO_LONG,
    NOT_SELECTED,
)
# check_text's kinds that are not converter reasons map onto the nearest one.
_BAD_ROW_REASON = {mcq.BAD_SOLUTION: ANSWER_NOT_AMONG_OPTIONS, mcq.NO_OPTIONS: UNPARSABLE_OPTIONS}
# A literal options string longer than this is not an options list (and literal_eval's cost grows with it).
MAX_OPTIONS_STRING = 100_000
EXAMPLES_PER_REASON = 3
_NEWLINES = re.compile(r"\s*\n\s*")


class Drop(Exception):
    """A source row that cannot become a DDM row; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class DropReport:
    """Rows kept, rows dropped by reason, and the first few dropped rows of each reason."""

    name: str
    kept: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str, row: int, detail: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{where} row {row}: {detail}")

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        lines = [f"{self.name}: read {self.kept + self.dropped} rows, kept {self.kept}, dropped {self.dropped}"]
        order = [r for r in REASONS if r in self.counts] + sorted(r for r in self.counts if r not in REASONS)
        for reason in order:
            lines.append(f"  dropped {self.counts[reason]}: {reason}")
            lines.extend(f"    e.g. {example}" for example in self.examples.get(reason, []))
        return lines


@dataclass(frozen=True)
class ConvertOptions:
    """The knobs every converter shares (see :func:`add_output_arguments`)."""

    out: Path
    max_side: int | None = None
    max_problem_chars: int | None = None
    batch_size: int = 256


def format_problem(question: str, options: Sequence[str]) -> str:
    """``question`` then one ``X: option`` line per option (SPEC section 1).

    Newlines inside an option become spaces: a problem has exactly one line per option,
    which is how ``mcq.option_letters`` finds them. An empty question raises :class:`Drop`.
    """
    if not isinstance(question, str) or not question.strip():
        raise Drop(EMPTY_PROBLEM, f"question is {_short(question)}")
    if len(options) > len(mcq.LETTERS):
        raise Drop(TOO_MANY_OPTIONS, f"{len(options)} options, at most {len(mcq.LETTERS)} (A-J)")
    lines = [question.strip()]
    for index, option in enumerate(options):
        lines.append(f"{mcq.LETTERS[index]}: {_NEWLINES.sub(' ', option.strip())}")
    return "\n".join(lines)


def parse_options(value: Any) -> list[str]:
    """An options list from a list, or from a Python-literal string of one (MMMU-Pro), never by ``eval``.

    Raises :class:`Drop` (unparsable options) unless the result is a non-empty list of
    strings or numbers, and (too many options) when it has more than 10.
    """
    if isinstance(value, str):
        if len(value) > MAX_OPTIONS_STRING:
            raise Drop(UNPARSABLE_OPTIONS, f"options string of {len(value)} characters")
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
            raise Drop(UNPARSABLE_OPTIONS, f"options string is not a Python literal ({type(error).__name__})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise Drop(UNPARSABLE_OPTIONS, f"options is {type(value).__name__} {_short(value)}, not a non-empty list")
    if not all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value):
        raise Drop(UNPARSABLE_OPTIONS, f"options list holds non-text items: {_short(value)}")
    if len(value) > len(mcq.LETTERS):
        raise Drop(TOO_MANY_OPTIONS, f"{len(value)} options, at most {len(mcq.LETTERS)} (A-J)")
    return [str(item) for item in value]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finish_row(
    problem: str,
    solution: str,
    image: Any,
    *,
    where: str,
    row: int,
    max_side: int | None = None,
    max_problem_chars: int | None = None,
    verify_image: bool = True,
) -> dict[str, Any]:
    """The DDM row, after the checks the data module applies; raises :class:`Drop` otherwise.

    ``verify_image=False`` (merge: its inputs were verified when converted) only
    embeds the image bytes and skips decoding.
    """
    try:
        letter = mcq.check_text(problem, solution, source=where, row=row, require_options=True)
    except mcq.BadRow as bad:
        raise Drop(_BAD_ROW_REASON.get(bad.kind, bad.kind), bad.reason) from None
    if max_problem_chars is not None and len(problem) > max_problem_chars:
        raise Drop(TOO_LONG, f"problem has {len(problem)} characters, limit {max_problem_chars}")
    if verify_image:
        image = finish_image(image, where=where, row=row, max_side=max_side)
    else:
        image = embed_image(image)
    return {"image": image, "problem": problem, "solution": letter}


def embed_image(value: Any) -> dict[str, Any]:
    """A ``{"bytes", "path"}`` image with its bytes present (read from ``path`` if need be), not decoded.

    The output file must stand alone: a path that only resolves on this machine would
    break training elsewhere, so bytes are always embedded and ``path`` keeps the file name.
    """
    if value is None:
        raise Drop(MISSING_IMAGE, "no image")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if not isinstance(value, dict):
        raise Drop(UNREADABLE_IMAGE, f"image has unsupported type {type(value).__name__}")
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path:
            raise Drop(MISSING_IMAGE, "no image bytes and no path")
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise Drop(MISSING_IMAGE, f"cannot read image file {path} ({error.strerror or error})") from None
    return {"bytes": bytes(data), "path": Path(path).name if path else None}


def finish_image(value: Any, *, where: str, row: int, max_side: int | None = None) -> dict[str, Any]:
    """:func:`embed_image`, then proof that it decodes, shrunk to fit ``max_side`` x ``max_side`` if larger.

    The original bytes are kept when no resize is needed, so converting never
    re-compresses a picture. A resized image is re-encoded as JPEG (quality 95)
    when it was a JPEG and as PNG otherwise; its ``path`` is then ``None``.
    """
    value = embed_image(value)
    try:
        image = mcq.decode_image(value["bytes"], source=where, row=row)
    except mcq.BadRow as bad:
        raise Drop(bad.kind, bad.reason) from None
    if max_side is None or max(image.size) <= max_side:
        return value
    is_jpeg = Image.open(io.BytesIO(value["bytes"])).format == "JPEG"
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    if is_jpeg:
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


ToMCQRow = Callable[[dict[str, Any]], tuple[str, str, Any]]


def convert(
    records: Iterable[Record],
    to_mcq_row: ToMCQRow,
    options: ConvertOptions,
    report: DropReport,
    *,
    total: int | None = None,
    progress: bool = True,
) -> DropReport:
    """Stream ``records`` through ``to_mcq_row`` and the DDM checks into ``options.out``, atomically.

    ``progress`` shows a bar over ``records`` on a terminal (``total`` rows, if known);
    a converter that shows its own bar over a different loop turns it off.
    Raises :class:`~dapo_lightning.data_prep.io.EmptyOutput` (nothing written) when every row is dropped.
    """
    with MCQParquetWriter(options.out, batch_rows=options.batch_size) as writer:
        for record in progress_bar(records, total=total, desc=report.name, enabled=progress):
            try:
                problem, solution, image = to_mcq_row(record.data)
                row = finish_row(
                    problem,
                    solution,
                    image,
                    where=record.where,
                    row=record.row,
                    max_side=options.max_side,
                    max_problem_chars=options.max_problem_chars,
                )
            except Drop as drop:
                report.drop(drop.reason, record.where, record.row, drop.detail)
                continue
            writer.write(row)
            report.kept += 1
    return report


def progress_bar(items: Iterable[Any], *, total: int | None, desc: str, enabled: bool = True) -> Iterable[Any]:
    """A tqdm bar on stderr when it is a terminal (``disable=None``); silent in logs and tests."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="row", disable=None if enabled else True, file=sys.stderr)


# ---------------------------------------------------------------- command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_input_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--input FILE...`` or ``--hub NAME [--config CFG] --split SPLIT``."""
    group = parser.add_argument_group("input (local files or a hub dataset)")
    group.add_argument(
        "--input",
        nargs="+",
        type=Path,
        metavar="FILE",
        help=f"{what} as local .parquet, .arrow, .json or .jsonl files (hub field names; images as bytes or paths)",
    )
    group.add_argument("--hub", metavar="NAME", help="a datasets hub name, read with streaming=True")
    group.add_argument("--config", metavar="CFG", help="the hub config (with --hub)")
    group.add_argument("--split", metavar="SPLIT", help="the hub split (with --hub)")


def source_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Source:
    if (args.input is None) == (args.hub is None):
        parser.error("give either --input FILE... or --hub NAME")
    if args.input is not None and (args.config or args.split):
        parser.error("--config and --split go with --hub, not with --input")
    for path in args.input or ():
        if not path.is_file():
            parser.error(f"{path}: no such file")
    try:
        return Source(files=tuple(args.input or ()), hub=args.hub, config=args.config, split=args.split)
    except ValueError as error:
        parser.error(str(error))
        raise  # parser.error exits; this keeps type checkers content


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, type=Path, help="output parquet (written atomically)")
    group.add_argument(
        "--max-side", type=positive_int, metavar="PX", help="shrink images larger than PX x PX (keeps aspect ratio)"
    )
    group.add_argument(
        "--max-problem-chars",
        type=positive_int,
        metavar="N",
        help="drop rows whose problem is longer (reason: too long)",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        metavar="N",
        help="rows read and written at a time (default 256)",
    )


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        out=args.out, max_side=args.max_side, max_problem_chars=args.max_problem_chars, batch_size=args.batch_size
    )


def run_reported(report: DropReport, out: Path, work: Callable[[], Any]) -> int:
    """Run a conversion; print its report; map the expected failures to exit code 2 with a message on stderr."""
    try:
        work()
    except (SchemaError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except EmptyOutput:
        print("\n".join(report.lines()))
        print(f"error: {report.name}: every row was dropped; nothing written to {out}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    print(f"wrote {report.kept} rows to {out}")
    return 0
