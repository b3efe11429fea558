"""configs/attention.yaml, stacked on the demo, runs all the attention callbacks from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_attention_config_trains_with_every_attention_callback(
    tmp_path, tiny_model_dir, synthetic_parquet, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dapo_lightning.cli import main

    config = yaml.safe_load((ROOT / "configs" / "attention.yaml").read_text())
    assert {name: c["class_path"] for name, c in config["callbacks"].items()} == {  # named, in this order
        "attention_metrics": "dapo_lightning.callbacks.AttentionMetrics",
        "token_weights": "dapo_lightning.callbacks.TokenWeights",
        "markdown_rollout_log": "dapo_lightning.callbacks.MarkdownRolloutLog",
    }
    assert list(config["callbacks"]) == ["attention_metrics", "token_weights", "markdown_rollout_log"]
    assert config["model"]["rewards"]["reward_funcs"] == ["accuracy", "vgr"]
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["dapo-lightning"])  # the arguments come from the list below
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--config",
            str(ROOT / "configs" / "attention.yaml"),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            f"--trainer.default_root_dir={run}",
            f"--model.policy.model_name_or_path={tiny_model_dir}",
            f"--data.train_path={synthetic_parquet}",
            "--data.eval_limit=2",
            "--data.batch_size=2",
            "--trainer.enable_progress_bar=false",
            "--model.export_final=false",
        ]
    )
    version = run / "lightning_logs" / "version_0"
    accumulator = EventAccumulator(str(version))
    accumulator.Reload()
    tags = accumulator.Tags()
    for tag in (
        "train/attention/late/vgr",
        "train/attention/all/aei_text",
        "train/attention/all/aei_vision",
        "train/attention/late/vision_ratio",
        "val/attention/late/vgr",
        "train/rewards/vgr/mean",
        "train/token_weights/mean",
        "train/token_weights/frac_above_1",
    ):
        assert tag in tags["scalars"], tag
    assert len(accumulator.Scalars("train/attention/late/vgr")) == 2  # every step
    assert "train/token_weights" in tags["histograms"]
    for name in ("rollout_results.md", "eval_results.md", "token_weights.md"):
        assert (version / name).stat().st_size > 0, name
    # every_n_steps: 10 in the config: of two steps only the first is written
    assert (version / "rollout_results.md").read_text().count("\n## Step ") == 1
