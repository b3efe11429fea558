"""Collects the outcome of every ``@pytest.mark.reliability(area, case, check)`` test for the report.

The marker's strings may name the test's parameters, ``{name}``, filled from its call spec.
When the whole ``tests/reliability`` folder ran to the end in one process (``make test``; not under
pytest-xdist, whose controller does not load this file), ``docs/reliability_report.md`` is
rewritten from them (see ``rel_report.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rel_report import REPORT, render, row

HERE = Path(__file__).resolve().parent
_rows: dict[str, dict] = {}
_order: list[str] = []
_complete = {"value": False, "expected": 0}


def pytest_collection_finish(session):
    """The report is only rewritten when every reliability test was selected (a partial run would drop rows)."""
    config = session.config
    if config.getoption("keyword") or config.getoption("markexpr") or config.getoption("deselect", None):
        return
    here = str(HERE)
    args = [str(Path(a.split("::")[0]).resolve()) for a in (config.args or [str(config.rootpath)])]
    _complete["value"] = any(here == a or here.startswith(a.rstrip("/") + "/") for a in args)
    _complete["expected"] = sum(item.get_closest_marker("reliability") is not None for item in session.items)


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("reliability")
    if marker is None:
        return
    params = {k: getattr(v, "__name__", v) for k, v in getattr(getattr(item, "callspec", None), "params", {}).items()}
    area, case, check = (str(a).format(**params) if params else str(a) for a in marker.args)
    item.user_properties.append(("reliability", json.dumps(row(area, case, check, "passed"))))


def pytest_runtest_logreport(report):
    values = dict(report.user_properties).get("reliability")
    if values is None:
        return
    if report.nodeid not in _rows:
        _rows[report.nodeid] = json.loads(values)
        _order.append(report.nodeid)
    entry = _rows[report.nodeid]
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not _complete["value"] or not _rows:
        return
    if len(_rows) != _complete["expected"]:  # stopped early (-x, Ctrl-C): the rows that did not run would be lost
        return
    text = render([_rows[nodeid] for nodeid in _order])
    if not REPORT.exists() or REPORT.read_text() != text:
        REPORT.write_text(text)
