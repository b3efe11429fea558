"""python -m dapo_lightning.data_prep aokvqa: exact rows from a fixture in the hub's schema, every drop reason, atomic output."""

from __future__ import annotations

import json

import pytest

from dapo_lightning.data_prep import pipeline
from dp_helpers import AOKVQA_FEATURES, MMMU_PRO_FEATURES, decoded, jpeg, png, read_rows, write_parquet

RED = png((6, 4), (255, 0, 0))
BLUE_JPEG = jpeg((8, 5), (0, 0, 255))
GREEN = png((5, 5), (0, 255, 0))


def _row(qid, image, question, choices, index):
    return {
        "image": image,
        "question_id": qid,
        "question": question,
        "choices": choices,
        "correct_choice_idx": index,
        "direct_answers": ["red"] * 10,
        "difficult_direct_answer": False,
        "rationales": ["Because it is."],
    }


COLOURS = ["red", "blue", "green", "yellow"]
ROWS = [
    _row("q0", {"bytes": RED, "path": "q0.png"}, "What colour is the bus?", COLOURS, 0),
    _row("q1", {"bytes": BLUE_JPEG, "path": None}, "  How many dogs? \n", ["one", "two\n or three", "four", "none"], 1),
    _row("q2", None, "Where is it?", COLOURS, 2),
    _row("q3", {"bytes": GREEN, "path": None}, "Test-split question?", COLOURS, None),
    _row("q4", {"bytes": GREEN, "path": None}, "Index out of range?", COLOURS, 7),
    _row("q5", {"bytes": RED[:30], "path": None}, "Truncated image?", COLOURS, 1),
    _row("q6", {"bytes": GREEN, "path": None}, "No choices?", [], 0),
    _row("q7", {"bytes": GREEN, "path": None}, "   ", COLOURS, 0),
    _row("q8", {"bytes": GREEN, "path": None}, "Why " + "very " * 20 + "long?", COLOURS, 3),
]


@pytest.fixture
def hub_file(tmp_path):
    return write_parquet(tmp_path / "aokvqa-train.parquet", ROWS, AOKVQA_FEATURES, row_group_size=4)


def test_exact_rows_and_every_drop_reason(cli, hub_file, tmp_path):
    out = tmp_path / "out" / "aokvqa.parquet"
    code, stdout, stderr = cli(
        "aokvqa", "--input", hub_file, "--out", out, "--max-problem-chars", "80", "--batch-size", "2"
    )
    assert code == 0, stderr
    rows = read_rows(out)
    assert [(r["problem"], r["solution"]) for r in rows] == [
        ("What colour is the bus?\nA: red\nB: blue\nC: green\nD: yellow", "A"),
        ("How many dogs?\nA: one\nB: two or three\nC: four\nD: none", "B"),
    ]
    # Original bytes, untouched (no re-encode without --max-side); path reduced to the file name.
    assert rows[0]["image"] == {"bytes": RED, "path": "q0.png"}
    assert rows[1]["image"] == {"bytes": BLUE_JPEG, "path": None}
    assert decoded(rows[1]["image"]).size == (8, 5)

    lines = stdout.splitlines()
    assert lines[0] == "aokvqa: read 9 rows, kept 2, dropped 7"
    assert [line for line in lines if line.startswith("  dropped")] == [
        "  dropped 1: missing image",
        "  dropped 1: unreadable image",
        "  dropped 1: unparsable options",
        "  dropped 2: answer not among options",
        "  dropped 1: empty problem",
        "  dropped 1: too long",
    ]
    assert f"    e.g. {hub_file} row 2: no image" in lines
    assert f"    e.g. {hub_file} row 3: correct_choice_idx None is not an index of 4 choices" in lines
    assert f"    e.g. {hub_file} row 4: correct_choice_idx 7 is not an index of 4 choices" in lines
    assert f"    e.g. {hub_file} row 6: options is list [], not a non-empty list" in lines
    assert f"    e.g. {hub_file} row 7: question is '   '" in lines
    # "Why " + "very " * 20 + "long?" = 4 + 100 + 5 = 109, plus "\nA: red" 7, "\nB: blue" 8, "\nC: green" 9, "\nD: yellow" 10
    assert f"    e.g. {hub_file} row 8: problem has 143 characters, limit 80" in lines
    assert any(line.startswith(f"    e.g. {hub_file} row 5: image cannot be decoded") for line in lines)
    assert lines[-1] == f"wrote 2 rows to {out}"


def test_question_id_filter(cli, hub_file, tmp_path):
    ids = tmp_path / "keep.txt"
    ids.write_text("q1\n# the original subset\n\nq404\n")
    out = tmp_path / "a.parquet"
    code, stdout, _ = cli("aokvqa", "--input", hub_file, "--question-ids", ids, "--out", out)
    assert code == 0
    assert [r["problem"].splitlines()[0] for r in read_rows(out)] == ["How many dogs?"]
    assert "  dropped 8: not in question-id filter" in stdout.splitlines()


def test_max_side_shrinks_large_images_only(cli, tmp_path):
    big = jpeg((40, 20))
    rows = [
        _row("a", {"bytes": big, "path": "big.jpg"}, "Big?", COLOURS, 0),
        _row("b", {"bytes": RED, "path": None}, "Small?", COLOURS, 1),
    ]
    source = write_parquet(tmp_path / "in.parquet", rows, AOKVQA_FEATURES)
    out = tmp_path / "a.parquet"
    assert cli("aokvqa", "--input", source, "--out", out, "--max-side", "10")[0] == 0
    shrunk, kept = read_rows(out)
    image = decoded(shrunk["image"])
    assert (image.size, image.format, shrunk["image"]["path"]) == ((10, 5), "JPEG", None)
    assert kept["image"] == {"bytes": RED, "path": None}


def test_jsonl_with_image_paths(cli, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0001.png").write_bytes(GREEN)
    lines = [
        {
            "question_id": "j0",
            "image": "img/0001.png",
            "question": "Colour?",
            "choices": COLOURS,
            "correct_choice_idx": 2,
        },
        {
            "question_id": "j1",
            "image": "img/missing.png",
            "question": "Colour?",
            "choices": COLOURS,
            "correct_choice_idx": 2,
        },
    ]
    source = tmp_path / "aokvqa.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "a.parquet"
    code, stdout, _ = cli("aokvqa", "--input", source, "--out", out)
    assert code == 0
    assert read_rows(out) == [
        {
            "image": {"bytes": GREEN, "path": "0001.png"},
            "problem": "Colour?\nA: red\nB: blue\nC: green\nD: yellow",
            "solution": "C",
        }
    ]
    assert "  dropped 1: missing image" in stdout.splitlines()
    assert f"cannot read image file {tmp_path / 'img' / 'missing.png'}" in stdout


def test_unrecognised_schema_exits_2_naming_the_missing_fields(cli, tmp_path):
    wrong = write_parquet(tmp_path / "mmmu.parquet", [], MMMU_PRO_FEATURES)
    out = tmp_path / "a.parquet"
    code, stdout, stderr = cli("aokvqa", "--input", wrong, "--out", out)
    assert code == 2
    assert stderr.startswith(
        f"error: {wrong}: not a recognised A-OKVQA file: missing fields question_id, image, choices, correct_choice_idx"
        " (found: id, question, options,"
    )
    assert not out.exists()


def test_every_row_dropped_exits_2_and_writes_nothing(cli, tmp_path):
    source = write_parquet(tmp_path / "in.parquet", [ROWS[2], ROWS[3]], AOKVQA_FEATURES)
    out = tmp_path / "a.parquet"
    code, stdout, stderr = cli("aokvqa", "--input", source, "--out", out)
    assert code == 2
    assert stderr == f"error: aokvqa: every row was dropped; nothing written to {out}\n"
    assert stdout.splitlines()[0] == "aokvqa: read 2 rows, kept 0, dropped 2"
    assert list(tmp_path.iterdir()) == [source]


def test_failure_mid_conversion_keeps_the_previous_output(cli, hub_file, tmp_path, monkeypatch):
    out = tmp_path / "a.parquet"
    out.write_bytes(b"yesterday's good file")
    real = pipeline.finish_image
    calls = []

    def failing_on_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "finish_image", failing_on_second_image)
    with pytest.raises(OSError, match="disk went away"):
        cli("aokvqa", "--input", hub_file, "--out", out, "--batch-size", "1")  # row 0 already flushed
    assert out.read_bytes() == b"yesterday's good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "aokvqa-train.parquet"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "x.parquet"], "give either --input FILE... or --hub NAME"),
        (["--input", "nope.parquet", "--out", "x.parquet"], "nope.parquet: no such file"),
        (["--input", "{src}", "--split", "train", "--out", "x.parquet"], "--config and --split go with --hub"),
        (["--hub", "HuggingFaceM4/A-OKVQA", "--out", "x.parquet"], "--split is required"),
        (["--input", "{src}", "--out", "x.parquet", "--max-side", "0"], "must be >= 1"),
    ],
)
def test_bad_usage_exits_2(cli, hub_file, argv, message):
    code, _, stderr = cli("aokvqa", *[arg.format(src=hub_file) for arg in argv])
    assert code == 2
    assert message in stderr
