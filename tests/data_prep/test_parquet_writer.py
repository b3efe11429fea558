"""data_prep/io.py: batches become row groups, datasets reads Image, and a failure publishes nothing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image as ImageFeature, Value

from dapo_lightning.data.rows import mcq_features
from dapo_lightning.data_prep.io import MCQParquetWriter, EmptyOutput, mcq_arrow_schema
from dp_helpers import png


def _row(index: int) -> dict:
    return {"image": {"bytes": png((4 + index, 3)), "path": None}, "problem": f"Q{index}?\nA: x\nB: y", "solution": "B"}


def test_rows_are_written_in_batches_and_datasets_decodes_image(tmp_path):
    out = tmp_path / "sub" / "out.parquet"
    with MCQParquetWriter(out, batch_rows=2) as writer:
        for index in range(5):
            writer.write(_row(index))
    assert writer.rows_written == 5
    parquet = pq.ParquetFile(out)
    assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)] == [2, 2, 1]
    assert parquet.schema_arrow == mcq_arrow_schema()
    assert parquet.schema_arrow.metadata == mcq_features().arrow_schema.metadata

    dataset = Dataset.from_parquet(str(out))
    assert isinstance(dataset.features["image"], ImageFeature)
    assert [dataset[i]["image"].size for i in range(5)] == [(4, 3), (5, 3), (6, 3), (7, 3), (8, 3)]
    assert dataset[4]["problem"] == "Q4?\nA: x\nB: y"
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]


def test_a_failure_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous contents")
    with pytest.raises(RuntimeError, match="boom"):
        with MCQParquetWriter(out, batch_rows=1) as writer:
            writer.write(_row(0))
            writer.write(_row(1))  # two row groups already on disk in the temporary file
            assert writer.tmp_path.exists()
            raise RuntimeError("boom")
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]


def test_zero_rows_publish_nothing(tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises(EmptyOutput, match="no rows to write"):
        with MCQParquetWriter(out):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_row_that_does_not_fit_the_schema_publishes_nothing(tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        with MCQParquetWriter(out, batch_rows=2) as writer:
            writer.write(_row(0))
            writer.write({"image": "not a struct", "problem": "Q", "solution": "A"})
    assert list(tmp_path.iterdir()) == []


def test_the_optional_source_column_is_a_datasets_string(tmp_path):
    out = tmp_path / "sourced.parquet"
    with MCQParquetWriter(out, batch_rows=2, source_column=True) as writer:
        for index, source in enumerate(["aokvqa", "mmmu", "aokvqa"]):
            writer.write({**_row(index), "source": source})
    schema = pq.read_schema(out)
    assert schema == mcq_arrow_schema(source_column=True)
    assert schema.names == ["image", "problem", "solution", "source"]
    assert schema.field("source").type == pa.string()

    dataset = Dataset.from_parquet(str(out))
    assert dataset.features == Features({**mcq_features(), "source": Value("string")})
    assert dataset["source"] == ["aokvqa", "mmmu", "aokvqa"]
    assert dataset[1]["image"].size == (5, 3)


def test_without_source_column_a_source_key_is_ignored(tmp_path):
    out = tmp_path / "plain.parquet"
    with MCQParquetWriter(out) as writer:
        writer.write({**_row(0), "source": "aokvqa"})
    assert pq.read_schema(out) == mcq_arrow_schema()


@pytest.mark.parametrize("source", [None, "", " ", 3])
def test_with_source_column_every_row_needs_a_name(tmp_path, source):
    out = tmp_path / "out.parquet"
    row = _row(1) if source is None else {**_row(1), "source": source}
    with pytest.raises(ValueError, match=rf"out.parquet: row 1: source must be a non-empty string, got {source!r}"):
        with MCQParquetWriter(out, batch_rows=4, source_column=True) as writer:
            writer.write({**_row(0), "source": "aokvqa"})
            writer.write(row)
    assert list(tmp_path.iterdir()) == []
