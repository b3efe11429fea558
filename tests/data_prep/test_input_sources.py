"""data_prep/sources.py: every input format yields the same records; schema errors name the missing fields."""

from __future__ import annotations

import base64
import json

import datasets
import pyarrow as pa
import pytest
from datasets import Dataset, Features, Image as ImageFeature, Value

from dapo_lightning.data_prep import sources
from dapo_lightning.data_prep.sources import InputError, SchemaError, Source, check_fields, count_rows, iter_records
from dp_helpers import png, write_parquet

FEATURES = Features({"id": Value("string"), "image": ImageFeature(), "extra": Value("int64")})
RED, BLUE = png((3, 2), (255, 0, 0)), png((2, 5), (0, 0, 255))


def _records(source: Source) -> list[tuple[str, int, dict]]:
    return [(r.where, r.row, r.data) for r in iter_records(source, columns=("id", "image"), image_columns=("image",))]


def test_parquet_in_small_batches_across_files(tmp_path):
    first = write_parquet(
        tmp_path / "a.parquet", [{"id": "a0", "image": {"bytes": RED, "path": "r.png"}, "extra": 1}], FEATURES
    )
    rows = [{"id": f"b{i}", "image": {"bytes": BLUE, "path": None}, "extra": i} for i in range(3)]
    second = write_parquet(tmp_path / "b.parquet", rows, FEATURES, row_group_size=2)
    source = Source(files=(first, second))
    assert count_rows(source) == 4
    records = list(iter_records(source, columns=("id", "image", "absent"), image_columns=("image",), batch_size=1))
    assert [(r.where, r.row, r.data["id"], r.data["absent"]) for r in records] == [
        (str(first), 0, "a0", None),
        (str(second), 0, "b0", None),
        (str(second), 1, "b1", None),
        (str(second), 2, "b2", None),
    ]
    assert records[0].data["image"] == {"bytes": RED, "path": "r.png"}


def test_arrow_stream_from_save_to_disk_and_arrow_file_format(tmp_path):
    Dataset.from_list(
        [{"id": "s0", "image": {"bytes": RED, "path": None}, "extra": 0}], features=FEATURES
    ).save_to_disk(str(tmp_path / "saved"))
    (stream_path,) = (tmp_path / "saved").glob("*.arrow")
    table = pa.Table.from_pylist(
        [{"id": "f0", "image": {"bytes": BLUE, "path": None}, "extra": 0}], schema=FEATURES.arrow_schema
    )
    file_path = tmp_path / "table.arrow"
    with pa.ipc.new_file(str(file_path), table.schema) as writer:
        writer.write_table(table)
    source = Source(files=(stream_path, file_path))
    assert count_rows(source) == 2
    assert [(r[2]["id"], r[2]["image"]["bytes"]) for r in _records(source)] == [("s0", RED), ("f0", BLUE)]


def test_json_and_jsonl_with_relative_paths_and_base64_bytes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(RED)
    rows = [
        {"id": "p", "image": "images/red.png"},
        {"id": "d", "image": {"path": "images/red.png"}},
        {"id": "b", "image": {"bytes": base64.b64encode(BLUE).decode(), "path": None}},
        {"id": "n", "image": None},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows))
    red_path = str(tmp_path / "images" / "red.png")
    expected = [
        {"id": "p", "image": {"bytes": None, "path": red_path}},
        {"id": "d", "image": {"bytes": None, "path": red_path}},
        {"id": "b", "image": {"bytes": BLUE, "path": None}},
        {"id": "n", "image": None},
    ]
    assert [r[2] for r in _records(Source(files=(jsonl,)))] == expected
    assert [r[2] for r in _records(Source(files=(array,)))] == expected
    assert count_rows(Source(files=(jsonl,))) is None


def test_check_fields_names_the_file_and_missing_fields(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", [{"id": "a", "image": None, "extra": 1}], FEATURES)
    with pytest.raises(SchemaError) as caught:
        check_fields(Source(files=(path,)), ("id", "question", "choices"), "A-OKVQA")
    assert (
        str(caught.value)
        == f"{path}: not a recognised A-OKVQA file: missing fields question, choices (found: id, image, extra)"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SchemaError, match="missing fields id .found: no fields"):
        check_fields(Source(files=(empty,)), ("id",), "X")


def test_unreadable_inputs_raise_input_error(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2: not JSON"):
        list(iter_records(Source(files=(bad_json,))))
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes(b"hello")
    with pytest.raises(InputError, match="fake.parquet: not a readable parquet file"):
        check_fields(Source(files=(not_parquet,)), ("id",), "X")
    not_arrow = tmp_path / "fake.arrow"
    not_arrow.write_bytes(b"hello")
    with pytest.raises(InputError, match="fake.arrow: not an arrow IPC file or stream"):
        list(iter_records(Source(files=(not_arrow,))))


def test_source_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        Source()
    with pytest.raises(ValueError, match="--split is required"):
        Source(hub="org/name")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        Source(files=(tmp_path / "x.csv",))


def test_hub_source_streams_with_undecoded_images(monkeypatch):
    """The hub path, without a network: load_dataset is replaced by a local IterableDataset with the hub's features."""
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        rows = [{"id": "h0", "image": {"bytes": RED, "path": "h0.png"}, "extra": 0}]
        return Dataset.from_list(rows, features=FEATURES).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources._hub_dataset.cache_clear()
    source = Source(hub="org/a-okvqa", config="default", split="train")
    check_fields(source, ("id", "image"), "X")
    assert _records(source) == [
        ("org/a-okvqa [default] split train", 0, {"id": "h0", "image": {"bytes": RED, "path": "h0.png"}})
    ]
    assert calls == [("org/a-okvqa", "default", "train", True)]  # opened once, then cached
    sources._hub_dataset.cache_clear()
