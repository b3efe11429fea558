"""Writing DDM parquet files: streamed in row groups, published atomically.

A converter may run for an hour over a 100k-row source and fail at row 90k. The
target path must then hold what it held before (or nothing), never a truncated
file that the data module would happily train on. So rows go to a temporary
file beside the target and ``os.replace`` moves it into place only on success;
on failure the temporary file is removed.

Rows are buffered ``batch_rows`` at a time and written as one parquet row group,
so memory holds at most one batch of images. The schema is the ``datasets``
one (``mcq_features().arrow_schema``): ``image`` is ``struct<bytes: binary,
path: string>`` and the ``huggingface`` schema metadata marks it as an
``Image`` feature, so ``Dataset.from_parquet`` decodes it as a picture.

One optional fourth column, ``source`` (a non-empty string per row: the dataset the
question came from, e.g. ``aokvqa``), is written when ``source_column=True``
(``merge --source-column``); the data module passes it through to
``PromptBatch.columns["source"]``, by which validation accuracy is logged per source.
Only that column: the DDM format is a contract (SPEC section 1) that the data module,
``validate`` and the metrics rely on, so other columns are dropped, not carried along.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_lightning.data.rows import mcq_features


SOURCE_COLUMN = "source"


def mcq_arrow_schema(*, source_column: bool = False) -> pa.Schema:
    """The arrow schema of a DDM file, with the ``huggingface`` metadata that names ``image`` an Image.

    ``source_column`` appends ``source: string`` (to the metadata's features too, so
    ``datasets`` reads it as ``Value("string")``).
    """
    features = mcq_features()
    if source_column:
        from datasets import Value

        features[SOURCE_COLUMN] = Value("string")
    return features.arrow_schema


class EmptyOutput(RuntimeError):
    """Every row was dropped; an empty training file is never published."""


class MCQParquetWriter:
    """Write DDM rows (``{"image": {"bytes", "path"}, "problem", "solution"}``) to ``path`` atomically.

    Use as a context manager: leaving the block normally publishes the file, leaving
    it by an exception removes the temporary file and leaves ``path`` untouched.
    With ``allow_empty=False`` (the default) publishing zero rows raises
    :class:`EmptyOutput` and writes nothing. With ``source_column=True`` every row
    must also carry ``"source"``, a non-empty string (``ValueError`` otherwise);
    without it a row's other keys are ignored.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        batch_rows: int = 256,
        allow_empty: bool = False,
        source_column: bool = False,
    ):
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.path = Path(path)
        self.batch_rows = batch_rows
        self.allow_empty = allow_empty
        self.source_column = source_column
        self.schema = mcq_arrow_schema(source_column=source_column)
        self.rows_written = 0
        # Hidden, per-process name in the target's folder: same filesystem, so os.replace is atomic.
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._buffer: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> MCQParquetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(str(self.tmp_path), self.schema)
        return self

    def write(self, row: dict[str, Any]) -> None:
        if self.source_column:
            source = row.get(SOURCE_COLUMN)
            if not isinstance(source, str) or not source.strip():
                index = self.rows_written + len(self._buffer)
                raise ValueError(f"{self.path}: row {index}: source must be a non-empty string, got {source!r}")
        self._buffer.append(row)
        if len(self._buffer) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            raise RuntimeError("MCQParquetWriter.write called outside its 'with' block")
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.batch_rows)
        self.rows_written += len(self._buffer)
        self._buffer.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            try:
                if exc_type is None:
                    self._flush()
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            if exc_type is None:
                if self.rows_written == 0 and not self.allow_empty:
                    raise EmptyOutput(f"{self.path}: no rows to write; nothing written")
                os.replace(self.tmp_path, self.path)
        finally:
            self._buffer.clear()
            self.tmp_path.unlink(missing_ok=True)
