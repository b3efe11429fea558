"""Validation accuracy per source: ``val/accuracy/<source>`` and a table in ``eval_results.md`` (issue 12)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from dapo_lightning.callbacks import MarkdownRolloutLog
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.data.rows import mcq_features
from dapo_lightning.metrics import ValidationMetrics
from tests.test_module import fit, make_module


def scored(solutions_right: list[float], sources: list[str] | None) -> SimpleNamespace:
    """The parts of a scored validation rollout ValidationMetrics reads: G = 1, the accuracy reward's column."""
    n = len(solutions_right)
    columns = {"solution": ["A"] * n, **({"source": sources} if sources is not None else {})}
    return SimpleNamespace(
        reward_names=["accuracy"], rewards_per_func=torch.tensor(solutions_right)[:, None],
        rewards=torch.tensor(solutions_right), row_columns=lambda: columns,
    )


def test_accuracy_per_source_by_hand():
    metrics = ValidationMetrics(["accuracy"])
    metrics.update(scored([1.0, 0.0, 1.0], ["a", "b", "a"]))
    metrics.update(scored([0.0, 1.0], ["b", "c"]))
    values = metrics.compute()
    assert values["val/accuracy"] == pytest.approx(3 / 5)
    assert {k: v for k, v in values.items() if k.startswith("val/accuracy/")} == {
        "val/accuracy/a": 1.0, "val/accuracy/b": 0.0, "val/accuracy/c": 1.0}
    metrics.update(scored([1.0], None))  # no source column: only the overall value
    assert not any(k.startswith("val/accuracy/") for k in metrics.compute())


def test_a_fit_logs_and_writes_accuracy_per_source(tmp_path, tiny_model_dir, synthetic_rows):
    rows = [{**row, "source": "left" if i % 2 else "right"} for i, row in enumerate(synthetic_rows)]
    features = mcq_features()
    features["source"] = type(features["problem"])("string")
    path = tmp_path / "with_source.parquet"
    Dataset.from_list(rows, features=features).to_parquet(str(path))
    log = MarkdownRolloutLog(dirpath=str(tmp_path / "md"), every_n_steps=10)
    module = make_module(tiny_model_dir)
    trainer = fit(tmp_path, module, path, tiny_model_dir, steps=1, callbacks=[log], val=True)
    # the held-out rows the fit validated on (the same seeded split; eval_limit 2, one batch)
    data = VisualMCQDataModule(train_path=str(path), processor=str(tiny_model_dir), eval_limit=2, system_prompt=None)
    data.setup("fit")
    held_out = list(data.eval_table["source"])
    logged = trainer.callback_metrics
    per_source = {k.removeprefix("val/accuracy/"): float(v) for k, v in logged.items() if k.startswith("val/accuracy/")}
    assert sorted(per_source) == sorted(set(held_out))
    assert all(0.0 <= v <= 1.0 for v in per_source.values())
    report = (tmp_path / "md" / "eval_results.md").read_text()
    assert "### Accuracy per source" in report and "| source | accuracy | rows |" in report
