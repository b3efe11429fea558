"""Where converters read records from: local files, or a hub dataset streamed.

Local files are parquet (what the hub serves), arrow (``datasets`` cache files or
``Dataset.save_to_disk`` shards: arrow IPC stream or file format), JSON (one array
of objects) or JSONL (one object per line). Parquet and arrow are read a batch at
a time (arrow memory-mapped), so a 100k-row source never holds all its images in
memory; a JSON array is parsed whole, so large sources belong in JSONL.

Image values are normalised to what ``datasets.Image`` stores,
``{"bytes": bytes | None, "path": str | None}`` (or ``None``):

- a dict with ``bytes`` and/or ``path`` (parquet/arrow as the hub writes them;
  in JSON, ``bytes`` is a base64 string);
- raw bytes (a ``binary`` column);
- a string, read as a path.

A relative path is resolved against the folder of the file that names it, so a
JSONL beside an ``images/`` folder can say ``"image": "images/0001.jpg"``.

Hub datasets are opened with ``datasets.load_dataset(name, config, split=split,
streaming=True)`` and their ``Image`` columns cast to ``decode=False``, so the
original bytes flow through without a decode/re-encode round trip. Tests never
touch the hub; they feed local files written in the hub's schema.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LOCAL_SUFFIXES = (".parquet", ".arrow", ".json", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class Source:
    """One input of a converter: a list of local files, or a hub dataset (name, config, split)."""

    files: tuple[Path, ...] = ()
    hub: str | None = None
    config: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if bool(self.files) == bool(self.hub):
            raise ValueError("give local files or a hub dataset name, not both and not neither")
        if self.hub and not self.split:
            raise ValueError(f"hub dataset {self.hub}: --split is required")
        for path in self.files:
            if path.suffix.lower() not in LOCAL_SUFFIXES:
                raise ValueError(
                    f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}"
                )

    def __str__(self) -> str:
        if self.hub:
            return f"{self.hub}" + (f" [{self.config}]" if self.config else "") + f" split {self.split}"
        return ", ".join(str(path) for path in self.files)


class SchemaError(ValueError):
    """An input lacks fields its converter needs; the message names the file and the missing fields."""

    def __init__(self, where: str, kind: str, missing: Sequence[str], found: Sequence[str]):
        self.where, self.kind, self.missing, self.found = where, kind, list(missing), list(found)
        super().__init__(
            f"{where}: not a recognised {kind} file: missing fields {', '.join(missing)}"
            f" (found: {', '.join(found) if found else 'no fields'})"
        )


class InputError(ValueError):
    """An input file that cannot be read as its suffix says (bad JSON, not arrow, corrupt parquet)."""


@dataclass(frozen=True)
class Record:
    """One source row: the file (or hub split) it came from, its 0-based index there, and its fields."""

    where: str
    row: int
    data: dict[str, Any]


def check_fields(source: Source, required: Sequence[str], kind: str) -> None:
    """Raise :class:`SchemaError` for the first input that lacks one of ``required``."""
    for where, names in _field_names(source):
        missing = [name for name in required if name not in names]
        if missing:
            raise SchemaError(where, kind, missing, names)


def count_rows(source: Source) -> int | None:
    """The number of rows, when it is cheap to know (for progress bars); ``None`` otherwise."""
    if source.hub:
        try:
            return _hub_dataset(source).info.splits[source.split].num_examples
        except (AttributeError, KeyError, TypeError):
            return None
    total = 0
    for path in source.files:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            total += _parquet(path).metadata.num_rows
        elif suffix == ".arrow":
            total += sum(batch.num_rows for batch in _arrow_batches(path))
        else:
            return None
    return total


def iter_records(
    source: Source,
    *,
    columns: Sequence[str] | None = None,
    image_columns: Sequence[str] = (),
    batch_size: int = 256,
) -> Iterator[Record]:
    """Yield the source's rows one by one, reading ``batch_size`` rows at a time.

    ``columns`` limits what is read (absent ones come back as ``None``); the values of
    ``image_columns`` are normalised as the module docstring says.
    """
    if source.hub:
        where = str(source)
        for index, data in enumerate(_hub_dataset(source)):
            yield Record(where, index, _project(data, columns, image_columns, None))
        return
    for path in source.files:
        for index, data in enumerate(_file_rows(path, columns, batch_size)):
            yield Record(str(path), index, _project(data, columns, image_columns, path.parent))


def _project(
    data: dict[str, Any], columns: Sequence[str] | None, image_columns: Sequence[str], base: Path | None
) -> dict[str, Any]:
    out = dict(data) if columns is None else {name: data.get(name) for name in columns}
    for name in image_columns:
        if name in out:
            out[name] = image_value(out[name], base)
    return out


def image_value(value: Any, base: Path | None = None) -> Any:
    """Normalise an image cell to ``{"bytes", "path"}`` (or ``None``); PIL images pass through."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, str):
        return {"bytes": None, "path": _resolve(value, base)} if value else None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSON carries bytes as base64
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                data = data.encode()  # left undecodable on purpose: the image check reports it
        if data is None and not path:
            return None
        return {"bytes": data, "path": _resolve(path, base) if data is None and path else path}
    return value  # a PIL image from a decoding hub dataset, or something the image check will reject


def _resolve(path: str, base: Path | None) -> str:
    if base is None or "://" in path or Path(path).is_absolute():
        return path
    return str(base / path)


def _field_names(source: Source) -> Iterator[tuple[str, list[str]]]:
    if source.hub:
        dataset = _hub_dataset(source)
        names = list(dataset.features) if dataset.features is not None else list(next(iter(dataset), {}))
        yield str(source), names
        return
    for path in source.files:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield str(path), list(_parquet(path).schema_arrow.names)
        elif suffix == ".arrow":
            yield str(path), list(_arrow_reader(pa.memory_map(str(path)), path).schema.names)
        else:
            first = next(_json_rows(path), None)
            yield str(path), list(first) if isinstance(first, dict) else []


def _file_rows(path: Path, columns: Sequence[str] | None, batch_size: int) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        parquet = _parquet(path)
        present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
            yield from batch.to_pylist()
    elif suffix == ".arrow":
        for batch in _arrow_batches(path):
            if columns is not None:
                batch = batch.select([c for c in columns if c in batch.schema.names])
            for start in range(0, batch.num_rows, batch_size):
                yield from batch.slice(start, batch_size).to_pylist()
    else:
        for index, data in enumerate(_json_rows(path)):
            if not isinstance(data, dict):
                raise InputError(f"{path}: row {index}: expected a JSON object, got {type(data).__name__}")
            yield data


def _parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: not a readable parquet file ({error})") from error


def _arrow_reader(stream: pa.NativeFile, path: Path) -> Any:
    """Arrow IPC file format first (``Table`` feather files), then stream format (``datasets`` cache files)."""
    try:
        return pa.ipc.open_file(stream)
    except pa.ArrowInvalid:
        stream.seek(0)
        try:
            return pa.ipc.open_stream(stream)
        except pa.ArrowInvalid as error:
            raise InputError(f"{path}: not an arrow IPC file or stream ({error})") from error


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    reader = _arrow_reader(pa.memory_map(str(path)), path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
    else:
        yield from reader


def _json_rows(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1)
        while head and head.isspace():
            head = handle.read(1)
        if head == "[":
            handle.seek(0)
            try:
                rows = json.load(handle)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from error
            yield from rows
            return
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}: line {number}: not JSON ({error.msg})") from error


@functools.lru_cache(maxsize=4)
def _hub_dataset(source: Source) -> Any:
    """The hub split as an ``IterableDataset`` whose ``Image`` columns yield undecoded bytes (opened once per source)."""
    import datasets

    dataset = datasets.load_dataset(source.hub, source.config, split=source.split, streaming=True)
    features = getattr(dataset, "features", None)
    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset
