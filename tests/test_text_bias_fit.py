"""The text-bias task end to end (issue 14): a config builds its files on first use and a short CPU fit logs every
text-bias tag (the numbers themselves are worked by hand in ``tests/test_text_bias.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from dapo_lightning.cli import main
from benchmarks.scalars import scalar_tags

ROOT = Path(__file__).resolve().parents[1]


def overlay(tmp_path: Path, model: Path) -> Path:
    """A config stacked on the demo's: the text-bias data, every captured step, the text-bias callbacks."""
    path = tmp_path / "text_bias.yaml"
    path.write_text(f"""
trainer:
  max_steps: 2
  val_check_interval: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  default_root_dir: {tmp_path / 'run'}
callbacks:
  attention_metrics:
    init_args:
      every_n_steps: 1
  text_bias:
    class_path: dapo_lightning.callbacks.TextBiasMetrics
  modality_probe:
    class_path: dapo_lightning.callbacks.ModalityProbe
    init_args:
      variants: [image_text, image_only, text_black]
model:
  policy:
    model_name_or_path: {model}
  rollout:
    max_completion_length: 4
data:
  train_path: {tmp_path / 'data' / 'train.parquet'}
  eval_path: {tmp_path / 'data' / 'eval.parquet'}
  build_synthetic_if_missing:
    task: text_bias
    rows: 32
    eval_rows: 6
  batch_size: 2
  eval_batch_size: 6
  eval_limit: 6
""")
    return path


@pytest.mark.slow
def test_a_config_builds_the_task_and_a_fit_logs_every_text_bias_tag(tmp_path, tiny_model_dir):
    main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(overlay(tmp_path, tiny_model_dir))])
    held_out = Dataset.from_parquet(str(tmp_path / "data" / "eval.parquet"))
    assert held_out["source"] == ["aligned", "conflict", "no_cue"] * 2  # built on first use, offline
    assert Dataset.from_parquet(str(tmp_path / "data" / "train.parquet")).num_rows == 32
    tags = scalar_tags(tmp_path / "run")
    new = {"val/accuracy/aligned", "val/accuracy/conflict", "val/accuracy/no_cue", "val/text_reliance",
           "val/vgr/aligned", "val/vgr/conflict", "val/vgr/no_cue", "val/probe/visual_reliance",
           "train/vgr_reward/gate_closed_groups", "train/vgr_reward/accuracy_spearman"}
    assert not new - tags, f"missing {sorted(new - tags)}; logged {sorted(tags)}"
    report = next((tmp_path / "run").rglob("eval_results.md")).read_text()
    assert "### Text bias" in report and "| conflict | 2 |" in report
