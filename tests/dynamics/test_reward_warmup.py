"""RewardWeightWarmup: SPEC 2's switch step, worked by hand, and the weights the scorer actually used."""

from __future__ import annotations

import math

import pytest
import torch
from dyn_helpers import fit, make_data, make_module, scalars

from dapo_lightning.callbacks import RewardWeightWarmup
from dapo_lightning.callbacks.reward_warmup import early_phase_end
from dapo_lightning.config import OptimConfig
from dapo_lightning.hooks import RolloutCallback


@pytest.mark.parametrize(
    "max_steps, ratio, boundary",
    [
        (100, 0.05, 5),  # int(100 * 0.05) = 5: steps 0..4 early
        (100, 0.0, 10),  # no ratio: the first 10%, int(100 * 0.1)
        (30, 0.25, 7),  # int(7.5) = 7
        (7, 0.0, 0),  # int(0.7) = 0: no early step at all
        (1000, 0.033, 33),  # int(33.0) = 33
    ],
)
def test_the_switch_step_follows_spec_2(max_steps, ratio, boundary):
    assert early_phase_end(max_steps, ratio) == boundary


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"early_reward_weights": []}, "early_reward_weights"),
        ({"early_reward_weights": [1.0, math.nan]}, "early_reward_weights"),
        ({"early_reward_weights": [1.0, "a"]}, "early_reward_weights"),
        ({"early_reward_weights": [1.0], "warmup_ratio": 1.5}, "warmup_ratio"),
        ({"early_reward_weights": [1.0], "warmup_ratio": -0.1}, "warmup_ratio"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"RewardWeightWarmup.{key}"):
        RewardWeightWarmup(**kwargs)


class WeightsSeen(RolloutCallback):
    """The weights each rollout was scored with (after every on_rollout_generated hook ran)."""

    def __init__(self):
        self.train, self.val = [], []

    def on_rollout_scored(self, trainer, module, rollout):
        (self.train if rollout.stage == "train" else self.val).append(
            (trainer.global_step, rollout.reward_weights.tolist(), rollout.rewards_per_func, rollout.rewards))


def test_early_then_regular_weights_are_used_and_logged(tmp_path, tiny_model_dir, synthetic_parquet):
    seen = WeightsSeen()
    # 5 steps, warmup_ratio 0.5 -> int(2.5) = 2: steps 0 and 1 early
    module = make_module(tiny_model_dir, rewards=("dyn_helpers.starts_with_letter", "format"), weights=[1.0, 0.5])
    warmup = RewardWeightWarmup(early_reward_weights=[2.0, 3.0], warmup_ratio=0.5)
    fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=5, callbacks=[warmup, seen], val_every=5)
    assert warmup.boundary == 2
    assert [w for _, w, _, _ in seen.train] == [[2.0, 3.0]] * 2 + [[1.0, 0.5]] * 3
    assert seen.val[-1][1] == [1.0, 0.5]  # validation at step 5 scores with the regular weights
    for _, weights, per_func, total in seen.train:  # the total really is the weighted sum with those weights
        torch.testing.assert_close(total, (per_func.nan_to_num(0.0) * torch.tensor(weights)).sum(-1))
    assert [v for _, v in scalars(tmp_path, "train/reward_weights/dyn_helpers.starts_with_letter")] == [2, 2, 1, 1, 1]
    assert [v for _, v in scalars(tmp_path, "train/reward_weights/format")] == [3, 3, 0.5, 0.5, 0.5]
    assert [v for _, v in scalars(tmp_path, "train/reward_warmup/early")] == [1, 1, 0, 0, 0]


def test_warmup_ratio_defaults_to_the_learning_rate_warmup(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, optim=OptimConfig(learning_rate=1e-3, warmup_ratio=0.25))
    warmup = RewardWeightWarmup(early_reward_weights=[2.0])
    fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=8, callbacks=[warmup],
        limit_train_batches=0)
    assert warmup.boundary == 2  # int(8 * 0.25), read from model.optim.warmup_ratio


def test_early_weights_of_the_wrong_length_fail_at_fit_start(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, rewards=("dyn_helpers.starts_with_letter", "format"))
    warmup = RewardWeightWarmup(early_reward_weights=[1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match=r"RewardWeightWarmup\.early_reward_weights: has 3 weights but "
                                         r"model\.rewards\.reward_funcs has 2 rewards"):
        fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=1, callbacks=[warmup])
