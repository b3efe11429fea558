"""The reliability report is rendered from the suite's outcomes, and the copies of its table stay in sync."""

from __future__ import annotations

import pytest
from rel_report import END, REPORT, ROOT, START, embed, render, row


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
    for path in (ROOT / "docs" / "reliability.md", ROOT / "README.md"):
        text = path.read_text()
        if START in text:
            assert embed(text, report) == text, f"{path}: python tests/reliability/rel_report.py --write"
    assert embed(f"a\n{START}\nold\n{END}\nb", report).startswith(f"a\n{START}\n| area |")
