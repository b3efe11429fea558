"""The additions to dapo_lightning/data/rows.py that data_prep relies on: BadRow kinds, require_options, one-letter solutions."""

from __future__ import annotations

import pytest

from dapo_lightning.data import rows as mcq
from dp_helpers import png

PROBLEM = "What is shown?\nA: a cat\nB: a dog\nC: a bird"


def test_check_text_returns_the_stripped_upper_case_letter():
    assert mcq.check_text(PROBLEM, " b ") == "B"


@pytest.mark.parametrize(
    ("problem", "solution", "kind", "message"),
    [
        ("   ", "A", mcq.EMPTY_PROBLEM, "f.parquet: row 7: problem is empty"),
        (PROBLEM, "AB", mcq.BAD_SOLUTION, "f.parquet: row 7: solution 'AB' is not a letter A-J"),
        (PROBLEM, "K", mcq.BAD_SOLUTION, "f.parquet: row 7: solution 'K' is not a letter A-J"),
        (PROBLEM, None, mcq.BAD_SOLUTION, "f.parquet: row 7: solution None is not a letter A-J"),
        (PROBLEM, "D", mcq.ANSWER_NOT_AMONG_OPTIONS, "f.parquet: row 7: solution 'D' is not among the options ABC"),
    ],
)
def test_check_text_names_file_row_and_kind(problem, solution, kind, message):
    with pytest.raises(mcq.BadRow) as caught:
        mcq.check_text(problem, solution, source="f.parquet", row=7)
    assert caught.value.kind == kind
    assert str(caught.value) == message


def test_multi_letter_solution_was_accepted_without_options_and_is_not_any_more():
    # "AB" is a substring of "ABCDEFGHIJ"; the old membership test let it through.
    with pytest.raises(mcq.BadRow, match="not a letter"):
        mcq.check_text("Which?", "AB")


def test_require_options_rejects_a_problem_without_option_lines():
    assert mcq.check_text("Which colour?", "A") == "A"  # default: the data module's old behaviour
    with pytest.raises(mcq.BadRow) as caught:
        mcq.check_text("Which colour?", "A", require_options=True)
    assert caught.value.kind == mcq.NO_OPTIONS


def test_decode_image_kinds(tmp_path):
    with pytest.raises(mcq.BadRow) as null:
        mcq.decode_image(None, source="s", row=0)
    assert (null.value.kind, str(null.value)) == (mcq.MISSING_IMAGE, "s: row 0: image is missing (null)")
    with pytest.raises(mcq.BadRow) as missing:
        mcq.decode_image({"bytes": None, "path": None}, source="s", row=1)
    assert missing.value.kind == mcq.MISSING_IMAGE
    with pytest.raises(mcq.BadRow) as gone:
        mcq.decode_image({"bytes": None, "path": str(tmp_path / "nope.png")}, source="s", row=2)
    assert gone.value.kind == mcq.MISSING_IMAGE
    with pytest.raises(mcq.BadRow) as broken:
        mcq.decode_image({"bytes": png((4, 3))[:20], "path": None}, source="s", row=3)
    assert broken.value.kind == mcq.UNREADABLE_IMAGE
    assert str(broken.value).startswith("s: row 3: image cannot be decoded")


def test_bad_row_kind_defaults_to_its_reason():
    assert mcq.BadRow("f", 1, "odd").kind == "odd"
