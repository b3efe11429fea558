"""Bad input through the CLI: each a clear error naming the key (resume from another config: test_resume.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dapo_lightning.cli import main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")


def run(tmp_path, tiny_model_dir, synthetic_parquet, *extra):
    main(["fit", "--config", DEMO, "--model.policy.model_name_or_path", str(tiny_model_dir),
          "--data.train_path", str(synthetic_parquet), "--trainer.default_root_dir", str(tmp_path),
          "--trainer.max_steps=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
          *extra])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trainer.callbacks+=dapo_lightning.callbacks.ReplayBuffer", "--trainer.callbacks.replay_buffer_size=-3"],
         r"ReplayBuffer\.replay_buffer_size: must be an integer >= 1, got -3"),
        (["--trainer.callbacks+=dapo_lightning.callbacks.ModalityProbe", "--trainer.callbacks.variants=[image_text,text_grey]"],
         r"ModalityProbe\.variants: unknown \['text_grey'\]"),
        (["--trainer.callbacks+=dapo_lightning.callbacks.RewardWeightWarmup", "--trainer.callbacks.early_reward_weights=[1.0,2.0]"],
         r"RewardWeightWarmup\.early_reward_weights: has 2 weights but model\.rewards\.reward_funcs has 1 rewards "
         r"\(accuracy\)"),
    ],
)
def test_bad_callback_settings_name_the_key(tmp_path, tiny_model_dir, synthetic_parquet, extra, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, tiny_model_dir, synthetic_parquet, *extra)


def test_a_value_outside_a_literal_is_refused_while_parsing(tmp_path, tiny_model_dir, synthetic_parquet, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, tiny_model_dir, synthetic_parquet, "--trainer.callbacks+=dapo_lightning.callbacks.DynamicSampling",
            "--trainer.callbacks.keep_if=variance")
    err = capsys.readouterr().err
    assert "dapo_lightning.callbacks.DynamicSampling" in err and 'Parser key "keep_if"' in err and "reward_std" in err
