"""python -m dapo_lightning.data_prep merge: counts per source, dedup, caps, one schema, seeded shuffle through the bucket spill."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_lightning.data_prep import merge as merge_module
from dapo_lightning.data_prep.io import MCQParquetWriter, mcq_arrow_schema
from dapo_lightning.data_prep.merge import MergeInput, SourceCounts, merge, shuffled_order
from dapo_lightning.data_prep.pipeline import DropReport
from dapo_lightning.data_prep.synthetic import SyntheticConfig, write_parquet as write_synthetic
from dp_helpers import png, read_rows

RED, GREEN, BLUE = png((6, 4), (255, 0, 0)), png((3, 7), (0, 255, 0)), png((5, 5), (0, 0, 255))


def _problem(text: str) -> str:
    return f"{text}\nA: yes\nB: no\nC: maybe"


def _ddm(path, rows):
    with MCQParquetWriter(path, batch_rows=2) as writer:
        for image, problem, solution in rows:
            writer.write({"image": {"bytes": image, "path": None}, "problem": problem, "solution": solution})
    return path


@pytest.fixture
def inputs(tmp_path):
    a = _ddm(
        tmp_path / "a.parquet",
        [
            (RED, _problem("P0"), "A"),
            (GREEN, _problem("P1"), "B"),
            (BLUE, _problem("P2"), "C"),
            (RED, _problem("P0"), "A"),
        ],
    )
    b = _ddm(
        tmp_path / "b.parquet", [(RED, _problem("P0"), "A"), (GREEN, _problem("P3"), "B"), (BLUE, _problem("P9"), "Z")]
    )
    # A file from elsewhere: large_string columns, an extra column, a lower-case solution, a path-only image.
    (tmp_path / "blue.png").write_bytes(BLUE)
    c = tmp_path / "c.parquet"
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("problem", pa.large_string()),
            ("solution", pa.large_string()),
            ("origin", pa.string()),
        ]
    )
    rows = [
        {"image": {"bytes": GREEN, "path": None}, "problem": _problem("P4"), "solution": " c", "origin": "x"},
        {
            "image": {"bytes": None, "path": str(tmp_path / "blue.png")},
            "problem": _problem("P5"),
            "solution": "A",
            "origin": "y",
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), c)
    return a, b, c


def test_counts_dedup_caps_and_one_schema(cli, inputs, tmp_path):
    a, b, c = inputs
    out = tmp_path / "merged.parquet"
    code, stdout, stderr = cli("merge", f"aok={a}", f"mm={b}", f"mm={c}", "--dedup", "--cap", "mm=2", "--out", out)
    assert code == 0, stderr
    assert stdout.splitlines() == [
        "source  rows  invalid  duplicate  over cap  written",
        "aok        4        0          1         0        3",
        "mm         5        1          1         1        2",
        "total      9        1          2         1        5",
        "invalid rows:",
        "  dropped 1: answer not among options",
        f"    e.g. {b} row 2: solution 'Z' is not a letter A-J",
        f"wrote 5 rows to {out}",
    ]
    assert pq.read_schema(out) == mcq_arrow_schema()
    assert read_rows(out) == [
        {"image": {"bytes": RED, "path": None}, "problem": _problem("P0"), "solution": "A"},
        {"image": {"bytes": GREEN, "path": None}, "problem": _problem("P1"), "solution": "B"},
        {"image": {"bytes": BLUE, "path": None}, "problem": _problem("P2"), "solution": "C"},
        {"image": {"bytes": GREEN, "path": None}, "problem": _problem("P3"), "solution": "B"},
        {"image": {"bytes": GREEN, "path": None}, "problem": _problem("P4"), "solution": "C"},
    ]


def test_without_dedup_everything_valid_is_kept_and_names_default_to_stems(cli, inputs, tmp_path):
    a, b, c = inputs
    out = tmp_path / "merged.parquet"
    code, stdout, _ = cli("merge", a, b, c, "--out", out)
    assert code == 0
    assert stdout.splitlines()[1:4] == [
        "a          4        0          0         0        4",
        "b          3        1          0         0        2",
        "c          2        0          0         0        2",
    ]
    # The path-only image is embedded: the merged file stands alone.
    assert read_rows(out)[-1] == {
        "image": {"bytes": BLUE, "path": "blue.png"},
        "problem": _problem("P5"),
        "solution": "A",
    }


def test_merges_a_synthetic_file_written_by_datasets(cli, tmp_path):
    synthetic = write_synthetic(tmp_path / "synthetic.parquet", SyntheticConfig(rows=6, seed=3))
    other = _ddm(tmp_path / "other.parquet", [(RED, _problem("P0"), "A")])
    out = tmp_path / "merged.parquet"
    code, stdout, _ = cli("merge", synthetic, other, "--out", out)
    assert code == 0
    assert stdout.splitlines()[-1] == f"wrote 7 rows to {out}"
    assert read_rows(out)[:6] == pq.read_table(synthetic).to_pylist()


def _numbered_inputs(tmp_path, sizes):
    inputs = []
    for i, size in enumerate(sizes):
        rows = [(png((2 + r, 2)), _problem(f"Q{i}-{r}"), "A") for r in range(size)]
        inputs.append(MergeInput(f"s{i}", _ddm(tmp_path / f"s{i}.parquet", rows)))
    return inputs


@pytest.mark.parametrize("bucket_rows", [1, 2, 5, 100])
def test_shuffle_writes_exactly_the_seeded_order_whatever_the_bucket_size(tmp_path, bucket_rows):
    inputs = _numbered_inputs(tmp_path, [7, 5, 6])
    counts = {item.name: SourceCounts() for item in inputs}
    out = tmp_path / "shuffled.parquet"
    merge(
        inputs,
        out,
        counts,
        DropReport("merge"),
        caps={"s1": 3},
        shuffle=True,
        seed=11,
        batch_size=2,
        bucket_rows=bucket_rows,
    )
    kept = [((i, r), f"s{i}") for i, size in enumerate([7, 5, 6]) for r in range(size)]
    expected = [_problem(f"Q{i}-{r}") for i, r in shuffled_order(kept, {"s1": 3}, seed=11)]
    assert [row["problem"] for row in read_rows(out)] == expected
    assert len(expected) == 7 + 3 + 6
    assert [(c.rows, c.over_cap, c.written) for c in counts.values()] == [(7, 0, 7), (5, 2, 3), (6, 0, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.parquet", "s1.parquet", "s2.parquet", "shuffled.parquet"]


def test_shuffle_is_a_seeded_permutation(cli, tmp_path):
    inputs = _numbered_inputs(tmp_path, [6, 6])
    paths = [str(item.path) for item in inputs]
    orders = {}
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        out = tmp_path / f"{name}.parquet"
        assert cli("merge", *paths, "--shuffle", "--seed", seed, "--out", out)[0] == 0
        orders[name] = [row["problem"] for row in read_rows(out)]
    assert orders["x"] == orders["y"]
    assert orders["x"] != orders["z"]
    assert sorted(orders["x"]) == sorted(_problem(f"Q{i}-{r}") for i in range(2) for r in range(6))
    assert orders["x"] != sorted(orders["x"])


def test_missing_fields_and_bad_usage_exit_2(cli, inputs, tmp_path):
    a, _, _ = inputs
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"]}), wrong)
    code, _, stderr = cli("merge", a, wrong, "--out", tmp_path / "m.parquet")
    assert code == 2
    assert (
        stderr
        == f"error: {wrong}: not a recognised DDM file: missing fields problem, solution (found: image, question)\n"
    )
    assert not (tmp_path / "m.parquet").exists()

    code, _, stderr = cli("merge", a, "--cap", "nope=3", "--out", tmp_path / "m.parquet")
    assert code == 2
    assert "--cap names unknown source(s) nope; sources are a" in stderr


def test_a_failure_while_shuffling_leaves_the_previous_output_and_no_spill_files(cli, tmp_path, monkeypatch):
    inputs = _numbered_inputs(tmp_path, [4, 4])
    out = tmp_path / "merged.parquet"
    out.write_bytes(b"last week's merge")
    real = merge_module._as_mcq_row
    calls = []

    def failing_in_the_second_pass(record):
        calls.append(record.row)
        if len(calls) == 8 + 3:  # pass 1 reads all 8 rows; fail on the third row of pass 2
            raise OSError("no space left on device")
        return real(record)

    monkeypatch.setattr(merge_module, "_as_mcq_row", failing_in_the_second_pass)
    with pytest.raises(OSError, match="no space left"):
        cli("merge", *(item.path for item in inputs), "--shuffle", "--out", out)
    assert out.read_bytes() == b"last week's merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.parquet", "s0.parquet", "s1.parquet"]


# ------------------------------------------------------------- --source-column


def _sourced(path, rows, schema=None):
    """A DDM file that already has a ``source`` column (as an earlier ``--source-column`` merge leaves it)."""
    cells = [{"image": {"bytes": image, "path": None}, "problem": p, "solution": s, "source": src}
             for image, p, s, src in rows]
    table = pa.Table.from_pylist(cells, schema=schema or mcq_arrow_schema(source_column=True))
    pq.write_table(table, path)
    return path


def test_without_source_column_a_merge_of_one_file_is_that_file_byte_for_byte(cli, tmp_path):
    # The flag is off by default and the output is what merge always wrote: same schema, rows, row groups.
    rows = [(RED, _problem("P0"), "A"), (GREEN, _problem("P1"), "B"), (BLUE, _problem("P2"), "C")]
    a = _ddm(tmp_path / "a.parquet", rows)  # row groups of 2
    out = tmp_path / "merged.parquet"
    assert cli("merge", a, "--batch-size", 2, "--out", out)[0] == 0
    assert out.read_bytes() == a.read_bytes()

    # An input's own source column is dropped without the flag, like any extra column.
    tagged = _sourced(tmp_path / "tagged.parquet", [(RED, _problem("P0"), "A", "aokvqa")])
    assert cli("merge", tagged, "--out", out)[0] == 0
    assert pq.read_schema(out) == mcq_arrow_schema()


@pytest.mark.parametrize("shuffle", [False, True])
def test_source_column_names_each_row_by_its_input(cli, inputs, tmp_path, shuffle):
    a, b, c = inputs
    plain, sourced = tmp_path / "plain.parquet", tmp_path / "sourced.parquet"
    args = [f"aok={a}", f"mm={b}", c, "--dedup", "--cap", "mm=1", *(["--shuffle"] if shuffle else [])]
    assert cli("merge", *args, "--out", plain)[0] == 0
    code, stdout, stderr = cli("merge", *args, "--source-column", "--out", sourced)
    assert code == 0, stderr
    assert "source column" not in stdout  # no input came with source values
    assert pq.read_schema(sourced) == mcq_arrow_schema(source_column=True)
    assert pq.read_schema(sourced).names == ["image", "problem", "solution", "source"]
    # The same rows in the same order as without the flag, each with its input's name (c: the file's stem).
    # aok: 4 rows, 1 duplicate; mm: P3 (P0 is a duplicate of aok's, P9 invalid), capped at 1; c: P4, P5.
    table = pq.read_table(sourced)
    assert table.drop_columns(["source"]).to_pylist() == read_rows(plain)
    by_problem = dict(zip(table.column("problem").to_pylist(), table.column("source").to_pylist(), strict=True))
    assert by_problem == {
        _problem("P0"): "aok",
        _problem("P1"): "aok",
        _problem("P2"): "aok",
        _problem("P3"): "mm",
        _problem("P4"): "c",
        _problem("P5"): "c",
    }


@pytest.mark.parametrize("bucket_rows", [1, 4])
def test_shuffled_rows_carry_their_own_source_through_the_spill(tmp_path, bucket_rows):
    inputs = _numbered_inputs(tmp_path, [5, 3, 4])
    out = tmp_path / "shuffled.parquet"
    counts = {item.name: SourceCounts() for item in inputs}
    merge(
        inputs,
        out,
        counts,
        DropReport("merge"),
        shuffle=True,
        seed=5,
        batch_size=2,
        bucket_rows=bucket_rows,
        source_column=True,
    )
    rows = read_rows(out)
    assert len(rows) == 12
    # problem "Q{i}-{r}" came from input s{i}
    assert all(row["source"] == "s" + row["problem"].split("-")[0][1:] for row in rows)


def test_a_row_keeps_the_source_it_came_with(cli, inputs, tmp_path):
    """Re-merging a merged file keeps each row's original source; rows without one get the input's name."""
    a, _, _ = inputs
    earlier = _sourced(
        tmp_path / "ddm-v1.parquet",
        [
            (RED, _problem("V0"), "A", "aokvqa"),
            (GREEN, _problem("V1"), "B", "mmmu"),
            (BLUE, _problem("V2"), "C", None),  # no value, or only blanks: named after the input
            (BLUE, _problem("V3"), "A", "  "),
        ],
    )
    out = tmp_path / "merged.parquet"
    code, stdout, _ = cli("merge", f"v1={earlier}", f"new={a}", "--source-column", "--out", out)
    assert code == 0
    assert stdout.splitlines()[-2:] == [
        "source column: 2 rows of v1 kept the source value they came with",
        f"wrote 8 rows to {out}",
    ]
    assert [row["source"] for row in read_rows(out)] == ["aokvqa", "mmmu", "v1", "v1", "new", "new", "new", "new"]


def test_a_source_column_that_is_not_text_exits_2_naming_the_row(cli, tmp_path):
    schema = pa.schema([*(mcq_arrow_schema()), ("source", pa.int64())])
    rows = [(RED, _problem("P0"), "A", None), (RED, _problem("P1"), "A", 7)]
    numbered = _sourced(tmp_path / "numbered.parquet", rows, schema=schema)
    out = tmp_path / "merged.parquet"
    code, _, stderr = cli("merge", numbered, "--source-column", "--out", out)
    assert code == 2
    assert stderr == (
        f"error: {numbered}: row 1: column source holds int 7; expected a string "
        "(rename the column, or merge without --source-column to drop it)\n"
    )
    assert not out.exists()
    assert cli("merge", numbered, "--out", out)[0] == 0  # without the flag the column is dropped, as before


def test_the_source_column_reaches_the_prompt_batch(cli, tmp_path, tiny_model_dir):
    """merge --source-column -> validate -> VisualMCQDataModule: every batch carries columns["source"]."""
    from dapo_lightning.data import VisualMCQDataModule

    first = _ddm(tmp_path / "first.parquet", [(png((28, 28), (255, 0, 0)), _problem(f"F{i}"), "A") for i in range(3)])
    second = _ddm(tmp_path / "second.parquet", [(png((28, 28), (0, 0, 255)), _problem(f"S{i}"), "B") for i in range(2)])
    merged = tmp_path / "ddm.parquet"
    assert cli("merge", f"aokvqa={first}", f"mmmu={second}", "--source-column", "--out", merged)[0] == 0
    assert cli("validate", merged)[0] == 0

    module = VisualMCQDataModule(train_path=str(merged), eval_path=str(merged), processor=str(tiny_model_dir),
                                 batch_size=2, eval_batch_size=5)
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    assert set(batch.columns) == {"problem", "solution", "source"}
    assert batch.columns["source"] == ["aokvqa"] * 3 + ["mmmu"] * 2
    train = next(iter(module.train_dataloader()))
    expected = {_problem(f"F{i}"): "aokvqa" for i in range(3)} | {_problem(f"S{i}"): "mmmu" for i in range(2)}
    assert train.columns["source"] == [expected[p] for p in train.columns["problem"]]
