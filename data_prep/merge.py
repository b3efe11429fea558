"""merge: concatenate converted DDM files into one training file (docs/spec.md section 1).

Each input is ``PATH`` or ``NAME=PATH``; the name (default: the file's stem) is the
source that counts and ``--cap`` refer to, and several inputs may share one. Rows
are cast to the one DDM schema (``image`` bytes embedded, ``solution`` an upper-case
letter; extra columns dropped, ``source`` too unless ``--source-column``) and their
text checked as the data module checks it; images are not decoded again (the
converters did; ``validate`` does).

- ``--dedup`` drops a row whose problem text and image bytes (SHA-256) equal an
  earlier row's, across all inputs, first one kept.
- ``--cap NAME=N`` keeps at most N rows of a source: its first N, or with
  ``--shuffle`` a random N drawn with ``--seed``.
- ``--shuffle`` writes the rows in a random order drawn with ``--seed``. Memory
  stays bounded: rows are spilled to temporary bucket files by output position,
  then each bucket is sorted and written in turn.
- ``--source-column`` also writes a string column ``source``: each row's source
  name, by which validation accuracy is reported per source. A row that already
  has a non-empty ``source`` (from an earlier ``--source-column`` merge) keeps it,
  so re-merging a merged file keeps its rows' original sources; the summary says
  how many rows of which input kept theirs. A duplicate dropped by ``--dedup``
  leaves the source of the row kept. Off by default: the output then has exactly
  the three DDM columns, as before.

    python -m dapo_lightning.data_prep merge aokvqa=data/aokvqa.parquet data/arxivqa.parquet mmmu=data/mmmu4.parquet mmmu=data/mmmu10.parquet \\
        --dedup --cap aokvqa=5000 --shuffle --seed 42 --source-column --out data/ddm.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dapo_lightning.data.rows import COLUMNS
from dapo_lightning.data_prep.io import SOURCE_COLUMN, EmptyOutput, MCQParquetWriter, mcq_arrow_schema
from dapo_lightning.data_prep.pipeline import Drop, DropReport, finish_row, positive_int, progress_bar
from dapo_lightning.data_prep.sources import LOCAL_SUFFIXES, InputError, Record, SchemaError, Source, check_fields, iter_records

NAME = "merge"
# Shuffle spills to at most this many bucket files at once (open file handles).
MAX_BUCKETS = 256


@dataclass(frozen=True)
class MergeInput:
    name: str
    path: Path


@dataclass
class SourceCounts:
    """Per-source tallies; ``rows = invalid + duplicate + over_cap + written``."""

    rows: int = 0
    invalid: int = 0
    duplicate: int = 0
    over_cap: int = 0
    written: int = 0


Key = tuple[int, int]  # (input index, row index in that input)


def parse_input(text: str) -> MergeInput:
    name, sep, path = text.partition("=")
    if not sep:
        return MergeInput(Path(text).stem, Path(text))
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PATH or NAME=PATH")
    return MergeInput(name, Path(path))


def parse_cap(text: str) -> tuple[str, int]:
    name, sep, number = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=N")
    try:
        return name, positive_int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: N must be a positive integer") from None


def _input_rows(
    inputs: list[MergeInput], batch_size: int, source_column: bool
) -> Iterator[tuple[Key, MergeInput, Record]]:
    columns = (*COLUMNS, SOURCE_COLUMN) if source_column else COLUMNS  # an absent source column reads as None
    for index, item in enumerate(inputs):
        source = Source(files=(item.path,))
        for record in iter_records(source, columns=columns, image_columns=("image",), batch_size=batch_size):
            yield (index, record.row), item, record


def _as_mcq_row(record: Record) -> dict[str, Any]:
    """The record cast to the DDM schema (text checked, image bytes embedded); raises :class:`Drop`."""
    data = record.data
    return finish_row(
        data["problem"], data["solution"], data["image"], where=record.where, row=record.row, verify_image=False
    )


def _source_of(item: MergeInput, record: Record) -> tuple[str, bool]:
    """``(the row's source value, whether it came with the row)``: its own non-empty ``source``, else the input's name.

    A row's own value wins so that re-merging a merged file keeps where each question
    came from (``aokvqa``, ``mmmu``...) instead of renaming them all after the file.
    """
    value = record.data.get(SOURCE_COLUMN)
    if value is None or (isinstance(value, str) and not value.strip()):
        return item.name, False
    if not isinstance(value, str):
        raise InputError(
            f"{record.where}: row {record.row}: column {SOURCE_COLUMN} holds {type(value).__name__} {value!r}; "
            "expected a string (rename the column, or merge without --source-column to drop it)"
        )
    return value, True


def _dedup_key(row: dict[str, Any]) -> bytes:
    image_digest = hashlib.sha256(row["image"]["bytes"]).digest()
    return hashlib.sha256(row["problem"].encode("utf-8") + b"\0" + image_digest).digest()


def _checked_rows(
    inputs: list[MergeInput],
    counts: dict[str, SourceCounts],
    report: DropReport,
    dedup: bool,
    batch_size: int,
    source_column: bool,
    kept_sources: Counter,
) -> Iterator[tuple[Key, str, dict[str, Any]]]:
    """Every input row that passes the checks (and dedup), as ``(key, input name, DDM row)``; tallies the rest.

    With ``source_column`` each row also gets its ``source`` value; ``kept_sources`` counts,
    per input name, the rows that came with their own.
    """
    seen: set[bytes] = set()
    for key, item, record in _input_rows(inputs, batch_size, source_column):
        tally = counts[item.name]
        tally.rows += 1
        try:
            row = _as_mcq_row(record)
        except Drop as drop:
            tally.invalid += 1
            report.drop(drop.reason, record.where, record.row, drop.detail)
            continue
        if dedup:
            digest = _dedup_key(row)
            if digest in seen:
                tally.duplicate += 1
                continue
            seen.add(digest)
        if source_column:
            row[SOURCE_COLUMN], came_with_row = _source_of(item, record)
            if came_with_row:
                kept_sources[item.name] += 1
        yield key, item.name, row


def shuffled_order(kept: list[tuple[Key, str]], caps: dict[str, int], seed: int) -> list[Key]:
    """The output order with ``--shuffle``: per-source random caps, then one random permutation, both from ``seed``."""
    rng = random.Random(seed)
    by_source: dict[str, list[Key]] = {}
    for key, name in kept:
        by_source.setdefault(name, []).append(key)
    chosen: list[Key] = []
    for name, keys in by_source.items():
        cap = caps.get(name)
        chosen.extend(keys if cap is None or cap >= len(keys) else sorted(rng.sample(keys, cap)))
    rng.shuffle(chosen)
    return chosen


def merge(
    inputs: list[MergeInput],
    out: Path,
    counts: dict[str, SourceCounts],
    report: DropReport,
    *,
    dedup: bool = False,
    caps: dict[str, int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    bucket_rows: int | None = None,
    source_column: bool = False,
    kept_sources: Counter | None = None,
) -> None:
    """Write the merged file, tallying into ``counts`` (one entry per source name) and ``report`` (invalid rows).

    ``source_column`` writes the ``source`` column (``--source-column``); ``kept_sources``
    then counts, per input name, the rows that kept the source value they came with
    (rows later over a ``--cap`` included). ``bucket_rows`` (shuffle only) is the most
    rows held in memory at once; by default ``max(batch_size, ceil(rows / MAX_BUCKETS))``.
    Raises :class:`EmptyOutput` when no row is left.
    """
    caps = caps or {}
    kept_sources = Counter() if kept_sources is None else kept_sources
    for item in inputs:
        check_fields(Source(files=(item.path,)), COLUMNS, "DDM")
    checked = _checked_rows(inputs, counts, report, dedup, batch_size, source_column, kept_sources)
    rows = progress_bar(checked, total=None, desc=NAME)
    if not shuffle:
        with MCQParquetWriter(out, batch_rows=batch_size, source_column=source_column) as writer:
            for _, name, row in rows:
                tally = counts[name]
                if name in caps and tally.written >= caps[name]:
                    tally.over_cap += 1
                    continue
                writer.write(row)
                tally.written += 1
        return

    kept = [(key, name) for key, name, _ in rows]  # pass 1: which rows survive; no images held
    order = shuffled_order(kept, caps, seed)
    source_of = dict(kept)
    chosen = Counter(source_of[key] for key in order)
    available = Counter(name for _, name in kept)
    for name, tally in counts.items():
        tally.written, tally.over_cap = chosen[name], available[name] - chosen[name]
    if not order:
        raise EmptyOutput(f"{out}: no rows to write; nothing written")
    position = {key: index for index, key in enumerate(order)}
    bucket_rows = bucket_rows or max(batch_size, math.ceil(len(order) / MAX_BUCKETS))
    _write_shuffled(inputs, out, position, bucket_rows, batch_size, source_column)


def _write_shuffled(
    inputs: list[MergeInput],
    out: Path,
    position: dict[Key, int],
    bucket_rows: int,
    batch_size: int,
    source_column: bool,
) -> None:
    """Pass 2 spills each chosen row to the bucket of its output position; pass 3 sorts and writes each bucket."""
    schema = mcq_arrow_schema(source_column=source_column).append(pa.field("position", pa.int64()))
    out.parent.mkdir(parents=True, exist_ok=True)
    spill = Path(tempfile.mkdtemp(prefix=f".{out.name}.shuffle-", dir=out.parent))
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    try:
        for key, item, record in _input_rows(inputs, batch_size, source_column):
            where = position.get(key)
            if where is None:
                continue
            bucket = where // bucket_rows
            if bucket not in writers:
                writers[bucket] = pa.ipc.new_stream(str(spill / f"{bucket}.arrow"), schema)
            row = {**_as_mcq_row(record), "position": where}
            if source_column:
                row[SOURCE_COLUMN] = _source_of(item, record)[0]
            writers[bucket].write_batch(pa.RecordBatch.from_pylist([row], schema=schema))
        for writer in writers.values():
            writer.close()
        with MCQParquetWriter(out, batch_rows=batch_size, source_column=source_column) as output:
            for bucket in sorted(writers):
                with pa.memory_map(str(spill / f"{bucket}.arrow")) as source:
                    table = pa.ipc.open_stream(source).read_all().sort_by("position")
                for row in table.drop_columns(["position"]).to_pylist():
                    output.write(row)
    finally:
        for writer in writers.values():
            try:
                writer.close()
            except (OSError, pa.ArrowInvalid):
                pass
        shutil.rmtree(spill, ignore_errors=True)


def summary_lines(counts: dict[str, SourceCounts]) -> list[str]:
    """A table: one line per source, then the totals."""
    total = SourceCounts(*(sum(column) for column in zip(*(astuple(c) for c in counts.values()), strict=True)))
    table = [("source", "rows", "invalid", "duplicate", "over cap", "written")]
    table += [(name, *(str(n) for n in astuple(c))) for name, c in [*counts.items(), ("total", total)]]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return [
        "  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))])
        for line in table
    ]


def _print_summary(counts: dict[str, SourceCounts], report: DropReport, kept_sources: Counter) -> None:
    print("\n".join(summary_lines(counts)))
    if report.dropped:
        print("\n".join(["invalid rows:", *report.lines()[1:]]))
    for name, number in kept_sources.items():
        print(f"source column: {number} rows of {name} kept the source value they came with")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_lightning.data_prep merge",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", type=parse_input, metavar="[NAME=]PATH", help="converted DDM files")
    parser.add_argument("--out", required=True, type=Path, help="output parquet (written atomically)")
    parser.add_argument("--dedup", action="store_true", help="drop repeats of (problem, image bytes)")
    parser.add_argument(
        "--cap",
        action="append",
        type=parse_cap,
        default=[],
        metavar="NAME=N",
        help="keep at most N rows of source NAME (repeatable)",
    )
    parser.add_argument("--shuffle", action="store_true", help="random output order (and random capped subsets)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    parser.add_argument(
        "--source-column",
        action="store_true",
        help="also write a string column 'source': each row's source NAME (a row that has one keeps its own)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        metavar="N",
        help="rows read and written at a time (default 256)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = {item.name for item in args.inputs}
    for item in args.inputs:
        if not item.path.is_file():
            parser.error(f"{item.path}: no such file")
        if item.path.suffix.lower() not in LOCAL_SUFFIXES:
            parser.error(f"{item.path}: unknown file type {item.path.suffix!r}")
    caps = dict(args.cap)
    unknown = sorted(set(caps) - names)
    if unknown:
        parser.error(f"--cap names unknown source(s) {', '.join(unknown)}; sources are {', '.join(sorted(names))}")
    counts = {item.name: SourceCounts() for item in args.inputs}
    report = DropReport(NAME)
    kept_sources: Counter = Counter()
    try:
        merge(
            args.inputs,
            args.out,
            counts,
            report,
            dedup=args.dedup,
            caps=caps,
            shuffle=args.shuffle,
            seed=args.seed,
            batch_size=args.batch_size,
            source_column=args.source_column,
            kept_sources=kept_sources,
        )
    except (SchemaError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except EmptyOutput:
        _print_summary(counts, report, kept_sources)
        print(f"error: merge: no rows left; nothing written to {args.out}", file=sys.stderr)
        return 2
    _print_summary(counts, report, kept_sources)
    print(f"wrote {sum(c.written for c in counts.values())} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
