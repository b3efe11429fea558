"""python -m dapo_lightning.data_prep mmmu-pro: the options string parsed as a literal (never evaluated), single images, letters to J."""

from __future__ import annotations

import pytest

from datasets import Features, Image as ImageFeature, Value

from dp_helpers import MMMU_PRO_FEATURES, decoded, png, read_rows, write_parquet

RED, GREEN, BLUE = png((6, 4), (255, 0, 0)), png((3, 7), (0, 255, 0)), png((5, 5), (0, 0, 255))


def _row(item_id, question, options, answer, **images):
    row = {
        "id": item_id,
        "question": question,
        "options": options,
        "explanation": "",
        "img_type": "['Plots and Charts']",
        "answer": answer,
        "topic_difficulty": "Medium",
        "subject": "Finance",
    }
    for k in range(1, 8):
        data = images.get(f"image_{k}")
        row[f"image_{k}"] = None if data is None else {"bytes": data, "path": None}
    return row


TEN = str([str(n) for n in range(1, 11)])  # "['1', '2', ..., '10']", as the 10-option config stores it
ROWS = [
    _row(
        "m0", "Which graph in <image 1> shows growth?", "['Graph A', 'Graph B', 'Graph C', 'Graph D']", "C", image_1=RED
    ),
    _row("m1", "Pick the last one.", TEN, "J", image_1=GREEN),
    _row("m2", "Compare <image 1> and <image 2>.", "['same', 'different']", "B", image_1=RED, image_2=GREEN),
    _row("m3", "Injected?", "__import__('os').system('touch PWNED')", "A", image_1=RED),
    _row("m4", "Truncated literal?", "['a', 'b'", "A", image_1=RED),
    _row("m5", "Eleven options?", str([str(n) for n in range(11)]), "A", image_1=RED),
    _row("m6", "Answer outside?", "['w', 'x', 'y', 'z']", "E", image_1=RED),
    _row("m7", "No picture?", "['w', 'x']", "A"),
    _row("m8", "Numbers?", "[1, 2.5, 'x']", "b", image_1=BLUE),
    _row("m9", "Only image_3?", "['p', 'q']", "A", image_3=GREEN),
]


@pytest.fixture
def hub_file(tmp_path):
    return write_parquet(tmp_path / "mmmu-pro-standard10.parquet", ROWS, MMMU_PRO_FEATURES)


def test_exact_rows_and_drop_reasons(cli, hub_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mmmu.parquet"
    code, stdout, stderr = cli("mmmu-pro", "--input", hub_file, "--out", out)
    assert code == 0, stderr
    rows = read_rows(out)
    assert [(r["problem"], r["solution"]) for r in rows] == [
        ("Which graph in <image 1> shows growth?\nA: Graph A\nB: Graph B\nC: Graph C\nD: Graph D", "C"),
        ("Pick the last one.\n" + "\n".join(f"{'ABCDEFGHIJ'[i]}: {i + 1}" for i in range(10)), "J"),
        ("Numbers?\nA: 1\nB: 2.5\nC: x", "B"),
        ("Only image_3?\nA: p\nB: q", "A"),
    ]
    assert [r["image"]["bytes"] for r in rows] == [RED, GREEN, BLUE, GREEN]
    assert [decoded(r["image"]).size for r in rows] == [(6, 4), (3, 7), (5, 5), (3, 7)]
    assert not (tmp_path / "PWNED").exists()  # the options string was parsed, not run

    lines = stdout.splitlines()
    assert lines[0] == "mmmu-pro: read 10 rows, kept 4, dropped 6"
    assert [line for line in lines if line.startswith("  dropped")] == [
        "  dropped 1: missing image",
        "  dropped 1: multi-image",
        "  dropped 2: unparsable options",
        "  dropped 1: too many options",
        "  dropped 1: answer not among options",
    ]
    assert f"    e.g. {hub_file} row 2: id 'm2' has 2 images (image_1, image_2)" in lines
    assert f"    e.g. {hub_file} row 3: options string is not a Python literal (ValueError)" in lines
    assert f"    e.g. {hub_file} row 4: options string is not a Python literal (SyntaxError)" in lines
    assert f"    e.g. {hub_file} row 5: 11 options, at most 10 (A-J)" in lines
    assert f"    e.g. {hub_file} row 6: answer 'E' is not a letter of A-D" in lines
    assert f"    e.g. {hub_file} row 7: image_1..image_7 are all empty" in lines


def test_multi_image_first_keeps_the_first_image(cli, hub_file, tmp_path):
    out = tmp_path / "mmmu.parquet"
    code, stdout, _ = cli("mmmu-pro", "--input", hub_file, "--out", out, "--multi-image", "first")
    assert code == 0
    compare = [r for r in read_rows(out) if r["problem"].startswith("Compare")]
    assert compare == [
        {
            "image": {"bytes": RED, "path": None},
            "problem": "Compare <image 1> and <image 2>.\nA: same\nB: different",
            "solution": "B",
        }
    ]
    assert "multi-image" not in stdout


def test_four_option_config_and_vision_config_refused(cli, tmp_path):
    four = write_parquet(tmp_path / "std4.parquet", [ROWS[0]], MMMU_PRO_FEATURES)
    assert cli("mmmu-pro", "--input", four, "--out", tmp_path / "o.parquet")[0] == 0
    # The "vision" config: the question is inside the picture, so there is no question field.
    vision = Features(
        {
            "id": Value("string"),
            "image": ImageFeature(),
            "options": Value("string"),
            "answer": Value("string"),
            "subject": Value("string"),
        }
    )
    wrong = write_parquet(tmp_path / "vision.parquet", [], vision)
    code, _, stderr = cli("mmmu-pro", "--input", wrong, "--out", tmp_path / "p.parquet")
    assert code == 2
    assert stderr == (
        f"error: {wrong}: not a recognised MMMU-Pro (standard config) file: missing fields question, image_1"
        " (found: id, image, options, answer, subject)\n"
    )
    assert not (tmp_path / "p.parquet").exists()
