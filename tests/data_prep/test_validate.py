"""python -m dapo_lightning.data_prep validate: the summary of a good file, every reason a row is unusable, exit 2 on a bad file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_lightning.data_prep.io import mcq_arrow_schema
from dapo_lightning.data_prep.synthetic import SyntheticConfig, write_parquet as write_synthetic
from dp_helpers import png

RED, GREEN, BLUE = png((6, 4), (255, 0, 0)), png((3, 7), (0, 255, 0)), png((5, 5), (0, 0, 255))
TWO = "Q?\nA: x\nB: y"
FOUR = "Which?\nA: w\nB: x\nC: y\nD: z"


def _file(path, rows, schema=None):
    table = pa.Table.from_pylist(
        [
            {"image": None if image is None else {"bytes": image, "path": None}, "problem": p, "solution": s}
            for image, p, s in rows
        ],
        schema=schema or mcq_arrow_schema(),
    )
    pq.write_table(table, path)
    return path


def test_good_file_summary(cli, tmp_path):
    path = _file(tmp_path / "good.parquet", [(RED, TWO, "A"), (GREEN, FOUR, "B"), (BLUE, FOUR, "b")])
    code, stdout, stderr = cli("validate", path)
    assert (code, stderr) == (0, "")
    assert stdout.splitlines() == [
        f"{path}: 3 rows, 3 usable, 0 unusable",
        "  solutions: A 1, B 2",
        "  options per problem: 2: 1, 4: 2",
        "  image sizes: width 3-6, height 4-7",
        "ok",
    ]


def test_synthetic_data_validates(cli, tmp_path):
    path = write_synthetic(tmp_path / "synthetic.parquet", SyntheticConfig(rows=8, seed=1))
    code, stdout, _ = cli("validate", path)
    assert code == 0
    assert stdout.splitlines()[0] == f"{path}: 8 rows, 8 usable, 0 unusable"
    assert "  image sizes: width 112-112, height 112-112" in stdout.splitlines()


def test_bad_rows_are_counted_by_reason_and_exit_2(cli, tmp_path):
    rows = [
        (RED, TWO, "A"),
        (RED[:30], TWO, "A"),
        (GREEN, "", "A"),
        (GREEN, TWO, "C"),
        (GREEN, "Just a question?", "A"),
        (None, TWO, "A"),
        (GREEN, "Q2?\nA: x\nB: y\nC: z", "c"),
        (GREEN, TWO, "AB"),
    ]
    path = _file(tmp_path / "bad.parquet", rows)
    code, stdout, stderr = cli("validate", path, "--batch-size", "3")
    assert code == 2
    assert stderr == f"error: {path}: 6 of 8 rows unusable\n"
    lines = stdout.splitlines()
    assert lines[0] == f"{path}: 8 rows, 2 usable, 6 unusable"
    assert [line for line in lines if line.startswith("  unusable")] == [
        "  unusable 1: unreadable image",
        "  unusable 1: empty problem",
        "  unusable 1: answer not among options",
        "  unusable 1: no options",
        "  unusable 1: missing image",
        "  unusable 1: solution not a letter",
    ]
    assert f"    e.g. {path}: row 2: problem is empty" in lines
    assert f"    e.g. {path}: row 3: solution 'C' is not among the options AB" in lines
    assert f"    e.g. {path}: row 4: problem has no option lines ('A: ...')" in lines
    assert f"    e.g. {path}: row 5: image is missing (null)" in lines
    assert f"    e.g. {path}: row 7: solution 'AB' is not a letter A-J" in lines
    assert lines[-4:] == [
        "  solutions: A 1, C 1",
        "  options per problem: 2: 1, 3: 1",
        "  image sizes: width 3-6, height 4-7",
        "FAILED: not a usable training set",
    ]


def test_schema_problems_exit_2_naming_the_file(cli, tmp_path):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"], "answer": ["A"]}), wrong)
    code, stdout, stderr = cli("validate", wrong)
    assert (code, stdout) == (2, "")
    assert (
        stderr == f"error: {wrong}: not a DDM file: missing fields problem, solution (found: image, question, answer)\n"
    )

    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"image": [1], "problem": ["q"], "solution": ["A"]}), typed)
    assert (
        cli("validate", typed)[2]
        == f"error: {typed}: column image has type int64; expected struct<bytes, path>, binary or string\n"
    )

    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    assert cli("validate", junk)[2].startswith(f"error: {junk}: not a readable parquet file")

    empty = _file(tmp_path / "empty.parquet", [])
    code, _, stderr = cli("validate", empty)
    assert (code, stderr) == (2, f"error: {empty}: no rows\n")


def test_plain_struct_without_datasets_metadata_is_noted_not_failed(cli, tmp_path):
    plain = pa.schema([(f.name, f.type) for f in mcq_arrow_schema()])  # same types, no huggingface metadata
    path = _file(tmp_path / "plain.parquet", [(RED, TWO, "A")], schema=plain)
    code, stdout, _ = cli("validate", path)
    assert code == 0
    assert (
        stdout.splitlines()[1]
        == "  note: image is not marked as a datasets Image feature (datasets will load it as a plain struct)"
    )


def _sourced_file(path, rows, source_type=pa.string()):
    schema = pa.schema([*mcq_arrow_schema(), ("source", source_type)], metadata=mcq_arrow_schema().metadata)
    cells = [{"image": {"bytes": image, "path": None}, "problem": p, "solution": s, "source": src}
             for image, p, s, src in rows]
    table = pa.Table.from_pylist(cells, schema=schema)
    pq.write_table(table, path)
    return path


def test_a_source_column_is_counted_per_source(cli, tmp_path):
    rows = [
        (RED, TWO, "A", "mmmu"),
        (GREEN, FOUR, "B", "aokvqa"),
        (BLUE, FOUR, "D", "mmmu"),
        (GREEN, TWO, "C", "mmmu"),  # unusable: C is not among A, B
        (RED, TWO, "B", None),  # no source: listed, but the row still trains
    ]
    path = _sourced_file(tmp_path / "sourced.parquet", rows)
    code, stdout, _ = cli("validate", path)
    assert code == 2
    assert stdout.splitlines()[:3] == [
        f"{path}: 5 rows, 4 usable, 1 unusable",
        "  rows per source: (none) 1, aokvqa 1, mmmu 3 (1 unusable)",
        "  unusable 1: answer not among options",
    ]

    good = _sourced_file(tmp_path / "ok.parquet", [row for row in rows if row[2] != "C"])
    code, stdout, _ = cli("validate", good)
    assert code == 0
    assert stdout.splitlines()[1] == "  rows per source: (none) 1, aokvqa 1, mmmu 2"
    assert stdout.splitlines()[-1] == "ok"


def test_a_source_column_that_is_not_text_is_a_schema_problem(cli, tmp_path):
    path = _sourced_file(tmp_path / "numbered.parquet", [(RED, TWO, "A", 3)], source_type=pa.int64())
    code, stdout, stderr = cli("validate", path)
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"error: {path}: column source has type int64; expected string "
        "(the source name of each row, as merge --source-column writes it)\n"
    )
