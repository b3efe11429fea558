"""validate: is a parquet file a usable DDM training set? (docs/spec.md section 1)

Every row goes through the checks the data module applies, from
``dapo_lightning/data/rows.py``: the image decodes to RGB, the problem is not empty and
has ``X: option`` lines, and the solution is one letter A-J that is among them.
The schema must have ``image``, ``problem`` and ``solution``, with ``image`` as
``datasets.Image`` stores it (``struct<bytes, path>``), raw bytes, or a path. The
optional ``source`` column (``merge --source-column``) must be a string column;
when it is there the summary also counts rows per source (a missing value is
listed as ``(none)``, not counted unusable: the row still trains).

Prints a summary (rows, unusable rows by reason with the first few, solution
letters, options per problem, image sizes) and exits 0 when every row is usable,
2 otherwise (or when the file is empty or its schema is wrong). Reads a batch at
a time, so memory holds one batch of images.

    python -m dapo_lightning.data_prep validate data/ddm.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_lightning.data import rows as mcq
from dapo_lightning.data_prep.io import SOURCE_COLUMN
from dapo_lightning.data_prep.pipeline import positive_int, progress_bar

NO_SOURCE = "(none)"  # how rows per source lists a row whose source is null or empty


@dataclass
class Summary:
    """What validation found in one file."""

    path: Path
    rows: int = 0
    bad: Counter = field(default_factory=Counter)  # BadRow kind -> rows
    examples: dict[str, list[str]] = field(default_factory=dict)
    letters: Counter = field(default_factory=Counter)
    option_counts: Counter = field(default_factory=Counter)
    smallest: tuple[int, int] | None = None  # (min width, min height) over usable rows
    largest: tuple[int, int] | None = None
    schema_notes: list[str] = field(default_factory=list)
    sources: Counter | None = None  # source value -> rows (usable or not); None: the file has no source column
    unusable_sources: Counter = field(default_factory=Counter)  # source value -> unusable rows

    @property
    def usable(self) -> int:
        return self.rows - sum(self.bad.values())

    @property
    def ok(self) -> bool:
        return self.rows > 0 and not self.bad

    def lines(self) -> list[str]:
        lines = [f"{self.path}: {self.rows} rows, {self.usable} usable, {self.rows - self.usable} unusable"]
        lines.extend(f"  note: {note}" for note in self.schema_notes)
        if self.sources is not None:
            per_source = []
            for name, number in sorted(self.sources.items()):
                unusable = self.unusable_sources[name]
                per_source.append(f"{name} {number}" + (f" ({unusable} unusable)" if unusable else ""))
            lines.append("  rows per source: " + ", ".join(per_source))
        for kind, number in self.bad.most_common():
            lines.append(f"  unusable {number}: {kind}")
            lines.extend(f"    e.g. {example}" for example in self.examples[kind])
        if self.letters:
            lines.append("  solutions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.letters.items())))
            lines.append(
                "  options per problem: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.option_counts.items()))
            )
        if self.smallest and self.largest:
            (w0, h0), (w1, h1) = self.smallest, self.largest
            lines.append(f"  image sizes: width {w0}-{w1}, height {h0}-{h1}")
        lines.append("ok" if self.ok else "FAILED: not a usable training set")
        return lines


class SchemaProblem(ValueError):
    """The file cannot be a DDM file whatever its rows hold; the message names the file and the fields."""


def check_schema(path: Path) -> list[str]:
    """Raise :class:`SchemaProblem` for missing or mistyped columns; returns notes on what is merely unusual."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise SchemaProblem(f"{path}: not a readable parquet file ({error})") from error
    missing = mcq.missing_columns(schema.names)
    if missing:
        raise SchemaProblem(
            f"{path}: not a DDM file: missing fields {', '.join(missing)} (found: {', '.join(schema.names) or 'no fields'})"
        )
    image_type = schema.field("image").type
    is_struct = pa.types.is_struct(image_type) and {"bytes", "path"} & {
        image_type.field(i).name for i in range(image_type.num_fields)
    }
    if not (
        is_struct
        or pa.types.is_binary(image_type)
        or pa.types.is_large_binary(image_type)
        or pa.types.is_string(image_type)
    ):
        raise SchemaProblem(
            f"{path}: column image has type {image_type}; expected struct<bytes, path>, binary or string"
        )
    for name in ("problem", "solution"):
        column_type = schema.field(name).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise SchemaProblem(f"{path}: column {name} has type {column_type}; expected string")
    if SOURCE_COLUMN in schema.names:
        source_type = schema.field(SOURCE_COLUMN).type
        if not (pa.types.is_string(source_type) or pa.types.is_large_string(source_type)):
            raise SchemaProblem(
                f"{path}: column {SOURCE_COLUMN} has type {source_type}; expected string "
                "(the source name of each row, as merge --source-column writes it)"
            )
    notes = []
    metadata = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or b"{}")
    image_feature = metadata.get("info", {}).get("features", {}).get("image", {})
    if image_feature.get("_type") != "Image":
        notes.append("image is not marked as a datasets Image feature (datasets will load it as a plain struct)")
    return notes


def validate(path: Path, *, batch_size: int = 256, examples_per_reason: int = 3) -> Summary:
    """Check every row of ``path``; raises :class:`SchemaProblem` for a file that is not DDM at all."""
    summary = Summary(path, schema_notes=check_schema(path))
    parquet = pq.ParquetFile(path)
    columns = list(mcq.COLUMNS)
    if SOURCE_COLUMN in parquet.schema_arrow.names:
        columns.append(SOURCE_COLUMN)
        summary.sources = Counter()
    batches = parquet.iter_batches(batch_size=batch_size, columns=columns)
    rows = (row for batch in batches for row in batch.to_pylist())
    for index, row in enumerate(progress_bar(rows, total=parquet.metadata.num_rows, desc="validate")):
        summary.rows += 1
        source = None
        if summary.sources is not None:
            source = row[SOURCE_COLUMN] if row[SOURCE_COLUMN] and row[SOURCE_COLUMN].strip() else NO_SOURCE
            summary.sources[source] += 1
        try:
            letter = mcq.check_text(row["problem"], row["solution"], source=str(path), row=index, require_options=True)
            image = mcq.decode_image(row["image"], source=str(path), row=index)
        except mcq.BadRow as bad:
            summary.bad[bad.kind] += 1
            if source is not None:
                summary.unusable_sources[source] += 1
            shown = summary.examples.setdefault(bad.kind, [])
            if len(shown) < examples_per_reason:
                shown.append(str(bad))
            continue
        summary.letters[letter] += 1
        summary.option_counts[len(mcq.option_letters(row["problem"]))] += 1
        small, large = summary.smallest or image.size, summary.largest or image.size
        summary.smallest = (min(small[0], image.width), min(small[1], image.height))
        summary.largest = (max(large[0], image.width), max(large[1], image.height))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_lightning.data_prep validate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DDM parquet files")
    parser.add_argument(
        "--examples", type=positive_int, default=3, metavar="N", help="bad rows shown per reason (default 3)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=256, metavar="N", help="rows read at a time (default 256)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = 0
    for path in args.files:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            status = 2
            continue
        try:
            summary = validate(path, batch_size=args.batch_size, examples_per_reason=args.examples)
        except SchemaProblem as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
            continue
        print("\n".join(summary.lines()))
        if summary.rows == 0:
            print(f"error: {path}: no rows", file=sys.stderr)
            status = 2
        elif not summary.ok:
            print(f"error: {path}: {summary.rows - summary.usable} of {summary.rows} rows unusable", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
