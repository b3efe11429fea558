"""The reliability report is rendered from the suite's outcomes, and the copies of its table stay in sync."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rel_report import EMBEDDED_IN, END, REPORT, START, embed, render, row


def test_render_orders_by_area_and_shows_outcomes():
    rows = [row("Load", "soak", "flat", "passed"), row("Faults", "kill | mid-step", "resumes", "failed"),
            row("Untrusted input", "bomb", "rejected", "skipped"), row("Faults", "NaN", "skipped", "passed")]
    text = render(rows)
    assert "4 cases: 2 pass, 1 FAIL, 1 skipped." in text
    lines = [line for line in text.splitlines() if line.startswith("| ") and "area" not in line]
    assert lines == ["| Faults | kill \\| mid-step | resumes | FAIL |", "| Faults | NaN | skipped | pass |",
                     "| Untrusted input | bomb | rejected | skipped |", "| Load | soak | flat | pass |"]
    with pytest.raises(ValueError, match="area 'Other'"):
        row("Other", "x", "y", "passed")


def test_embedded_copies_match_the_report():
    report = REPORT.read_text()
    assert "| area | fault injected or input tried |" in report
    for path in EMBEDDED_IN:
        text = path.read_text()
        assert START in text and END in text, f"{path}: the report's markers are missing"
        assert embed(text, report) == text, f"{path}: python tests/reliability/rel_report.py --write"
    assert embed(f"a\n{START}\nold\n{END}\nb", report).startswith(f"a\n{START}\n| area |")


REPORT_TESTS = """
import pytest

@pytest.mark.reliability("Faults", "first", "{outcome}")
def test_first():
    assert {outcome!r} == "passes"

@pytest.mark.reliability("Faults", "second", "passes")
def test_second():
    pass
"""


@pytest.mark.parametrize("outcome, stop_early, written", [("passes", False, True), ("fails", False, True),
                                                          ("fails", True, False)])
def test_the_report_is_written_only_when_every_row_ran(pytester, outcome, stop_early, written):
    here = Path(__file__).parent
    folder = pytester.mkdir("tests") / "reliability"
    folder.mkdir()
    (pytester.path / "docs").mkdir()
    for name in ("conftest.py", "rel_report.py"):
        shutil.copy(here / name, folder / name)
    (folder / "test_cases.py").write_text(REPORT_TESTS.format(outcome=outcome))
    pytester.makeini("[pytest]\nmarkers =\n    reliability(area, case, check): a reliability row\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", str(folder), *(["-x"] if stop_early else []))
    report = pytester.path / "docs" / "reliability_report.md"
    assert report.exists() == written, result.stdout.str()
    if written:
        assert "| Faults | first | " + outcome + " | " + ("pass" if outcome == "passes" else "FAIL") + " |" in \
            report.read_text()
