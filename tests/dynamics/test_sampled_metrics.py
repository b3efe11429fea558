"""train/sampled/* describe the step's fresh rollout; train/* the batch the replay buffer and dynamic sampling built."""

from __future__ import annotations

import pytest
from dyn_helpers import RolloutLog, fit, make_data, make_module, scalars

from dapo_lightning.callbacks import DynamicSampling, ReplayBuffer
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import row_accuracy


class FreshRollout(RolloutCallback):
    """Listed first: sees each step's rollout as scored, before the buffer and dynamic sampling change it."""

    def __init__(self):
        self.steps = []

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train" and not rollout.is_extra:
            self.steps.append({"reward_mean": float(rollout.rewards.mean()),
                               "accuracy": float(row_accuracy(rollout).mean())})


def test_sampled_metrics_are_the_fresh_rollouts_and_the_train_metrics_the_trained_batch(
        tmp_path, tiny_model_dir, synthetic_parquet):
    fresh, final = FreshRollout(), RolloutLog()
    callbacks = [fresh, DynamicSampling(oversample_factor=0.5, max_tries=1), ReplayBuffer(replay_buffer_size=4), final]
    module = make_module(tiny_model_dir, rewards=("dyn_helpers.starts_with_abc", "accuracy"), weights=[1.0, 1.0])
    fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=5, callbacks=callbacks)
    sampled = [v for _, v in scalars(tmp_path, "train/sampled/reward_mean")]
    trained = [v for _, v in scalars(tmp_path, "train/reward_mean")]
    assert sampled == pytest.approx([s["reward_mean"] for s in fresh.steps], abs=1e-6)
    assert [v for _, v in scalars(tmp_path, "train/sampled/accuracy")] == pytest.approx(
        [s["accuracy"] for s in fresh.steps], abs=1e-6)
    assert trained == pytest.approx([float(s["rewards"].mean()) for s in final.steps], abs=1e-6)
    # the callbacks did change the trained batch (replayed or swapped groups), so the two curves differ somewhere
    assert any(bool(s["replayed"].any()) for s in final.steps)
    assert sampled != pytest.approx(trained, abs=1e-6)
    assert len(scalars(tmp_path, "train/sampled/frac_reward_zero_std")) == 5
