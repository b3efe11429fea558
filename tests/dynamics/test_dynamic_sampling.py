"""DynamicSampling: keep groups whose rewards vary, draw more prompts when short, always train on B groups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from dyn_helpers import RolloutLog, fit, make_data, make_module, scalars

from dapo_lightning.callbacks import DynamicSampling
from dapo_lightning.callbacks.dynamic_sampling import kept_groups


def rollout_with(rewards, accuracy, G=4):
    """A scored rollout's rewards and its accuracy reward column (what ``metrics.row_accuracy`` reads)."""
    return SimpleNamespace(num_generations=G, rewards=torch.tensor(rewards, dtype=torch.float32),
                           reward_names=["accuracy"], rewards_per_func=torch.tensor(accuracy, dtype=torch.float32)[:, None])


def test_keep_rules_worked_by_hand():
    # groups of 4: [1 0 0 0] varies; [1 1 1 1] all right; [0 0 0 0] all wrong; [0.5 0.5 0.5 0.5+1e-7] ~constant
    rewards = [1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5 + 1e-7]
    accuracy = [1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    rollout = rollout_with(rewards, accuracy)
    assert kept_groups(rollout, "reward_std", 1e-6).tolist() == [True, False, False, False]
    assert kept_groups(rollout, "reward_std", 0.0).tolist() == [True, False, False, True]
    # 0 < correct < G: 1 of 4, 4 of 4, 0 of 4, 1 of 4
    assert kept_groups(rollout, "accuracy", 1e-6).tolist() == [True, False, False, True]


@pytest.mark.parametrize(
    "kwargs, key",
    [({"oversample_factor": 0}, "oversample_factor"), ({"max_tries": -1}, "max_tries"),
     ({"keep_if": "variance"}, "keep_if"), ({"epsilon": -1.0}, "epsilon")],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"DynamicSampling.{key}"):
        DynamicSampling(**kwargs)


def test_short_batches_are_topped_up_from_extra_rounds(tmp_path, tiny_model_dir, synthetic_parquet):
    log = RolloutLog()
    sampling = DynamicSampling(oversample_factor=1.0, max_tries=3)
    module = make_module(tiny_model_dir, rewards=("dyn_helpers.starts_with_abc",))
    data = make_data(synthetic_parquet, tiny_model_dir, batch_size=3)
    fit(tmp_path, module, data, steps=3, callbacks=[sampling, log])
    rounds = [v for _, v in scalars(tmp_path, "train/dynamic_sampling/rounds")]
    kept = [v for _, v in scalars(tmp_path, "train/dynamic_sampling/kept_groups")]
    filled = [v for _, v in scalars(tmp_path, "train/dynamic_sampling/filled_groups")]
    generated = [v for _, v in scalars(tmp_path, "train/dynamic_sampling/generated_groups")]
    assert len(log.steps) == 3 and sum(rounds) > 3  # some step needed an extra round
    extra_rollouts = [tag for stage, tag in log.tags if tag == "dynamic_sampling"]
    assert len(extra_rollouts) == sum(rounds) - 3  # every extra round is a tagged rollout, seen by later callbacks
    for step, r, k, f, n in zip(log.steps, rounds, kept, filled, generated):
        assert step["num_rows"] == 3 * 4  # always B groups of G
        assert n == 3 * r  # each round generates ceil(1.0 * B) prompts
        assert k + f == 3
        std = step["rewards"].view(3, 4).std(dim=1)
        assert int((std > 1e-6).sum()) == k  # the kept groups are exactly those with a signal
        if f == 0:
            assert r == 1 or (std > 1e-6).all()
        assert all(0 <= i < len(data.train_table) for i in step["index"])


def test_without_any_signal_the_batch_is_filled_after_max_tries(tmp_path, tiny_model_dir, synthetic_parquet):
    log = RolloutLog()
    sampling = DynamicSampling(oversample_factor=0.5, max_tries=2)
    module = make_module(tiny_model_dir, rewards=("dyn_helpers.constant",))
    data = make_data(synthetic_parquet, tiny_model_dir, batch_size=2)
    fit(tmp_path, module, data, steps=2, callbacks=[sampling, log])
    assert [v for _, v in scalars(tmp_path, "train/dynamic_sampling/rounds")] == [3, 3]  # 1 + max_tries
    assert [v for _, v in scalars(tmp_path, "train/dynamic_sampling/generated_groups")] == [4, 4]  # 2 + 1 + 1
    assert [v for _, v in scalars(tmp_path, "train/dynamic_sampling/filtered_groups")] == [4, 4]
    assert [v for _, v in scalars(tmp_path, "train/dynamic_sampling/filled_groups")] == [2, 2]
    for step, loader_batch in zip(log.steps, log.loader):
        assert step["num_rows"] == 2 * 4
        assert step["index"] == loader_batch  # filled with the loader's own groups, in order
