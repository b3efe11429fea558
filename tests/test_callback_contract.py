"""``hooks.check_callbacks``: what callbacks and rewards declare is validated at set-up, from declarations only."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback

from dapo_lightning.callbacks import (
    AttentionMetrics,
    DynamicSampling,
    MarkdownRolloutLog,
    ReplayBuffer,
    RewardWeightWarmup,
    TokenWeights,
)
from dapo_lightning.hooks import RolloutCallback, check_callbacks
from dapo_lightning.rewards import get_reward_spec
from tests.test_module import fit, make_module


def specs(*names):
    return [get_reward_spec(name) for name in names]


class Needs(RolloutCallback):
    needs = ("halo",)
    provider_hint = "tests.test_module.HaloCallback"


class Provides(RolloutCallback):
    provides = ("halo",)


class After(RolloutCallback):
    runs_after = ("halo",)


def test_needs_provides_and_order_come_from_declarations():
    plan = check_callbacks([Provides(), Needs()], specs("accuracy"), [1.0])
    assert plan.needed_annotations == {"halo"} and not plan.needs_old_logps
    with pytest.raises(ValueError, match=r"Needs needs halo that no callback provides; add tests.test_module.Halo"):
        check_callbacks([Needs()], specs("accuracy"), [1.0])
    check_callbacks([Provides(), After()], specs("accuracy"), [1.0])
    with pytest.raises(ValueError, match=r"trainer\.callbacks: list Provides before After"):
        check_callbacks([After(), Provides()], specs("accuracy"), [1.0])
    check_callbacks([After()], specs("accuracy"), [1.0])  # nothing provides it: no order to keep


def test_the_project_callbacks_declare_what_they_need_and_provide():
    plan = check_callbacks([AttentionMetrics(), TokenWeights(), DynamicSampling(), ReplayBuffer(),
                            MarkdownRolloutLog()], specs("accuracy", "vgr"), [1.0, 0.5])
    assert plan.needed_annotations == {"attention_tokens", "vgr"} and plan.needs_old_logps
    # token weights read a per-row annotation that moves with its group: they may follow the callbacks that move groups
    check_callbacks([AttentionMetrics(), DynamicSampling(), ReplayBuffer(), TokenWeights()], specs("accuracy"), [1.0])


def test_a_reward_weighted_only_during_warm_up_needs_its_inputs_too():
    """The defect: a zero regular vgr weight with a non-zero early weight and no AttentionMetrics scored vgr as
    "no value" (0) during the whole warm-up, silently. Both weight sets count now."""
    warmup = RewardWeightWarmup(early_reward_weights=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"reward 'vgr' \(weight 0.5 in RewardWeightWarmup.early_reward_weights\) "
                                         r"needs per-sample vgr values that no callback provides; add "
                                         r"dapo_lightning.callbacks.AttentionMetrics"):
        check_callbacks([warmup], specs("accuracy", "vgr"), [1.0, 0.0])
    check_callbacks([RewardWeightWarmup(early_reward_weights=[1.0, 0.0])], specs("accuracy", "vgr"), [1.0, 0.0])
    check_callbacks([AttentionMetrics(), warmup], specs("accuracy", "vgr"), [1.0, 0.0])
    with pytest.raises(ValueError, match=r"RewardWeightWarmup\.early_reward_weights: has 2 weights but "
                                         r"model\.rewards\.reward_funcs has 3 rewards"):
        check_callbacks([warmup], specs("accuracy", "vgr", "format"), [1.0, 0.0, 1.0])


def test_the_warm_up_defect_is_an_error_before_a_fit_trains(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, rewards=("accuracy", "vgr"), weights=[1.0, 0.0])
    warmup = RewardWeightWarmup(early_reward_weights=[1.0, 0.5], warmup_ratio=0.5)
    with pytest.raises(ValueError, match=r"reward 'vgr' \(weight 0.5 in RewardWeightWarmup"):
        fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2, callbacks=[warmup])
    assert module.policy is None  # refused at set-up, before the model was loaded


def test_reward_order_rules_come_from_the_reward_specs():
    assert get_reward_spec("vgr_hard_negative").reads_rewards == ("accuracy",)
    with pytest.raises(ValueError, match="vgr_hard_negative reads each row's accuracy; list the accuracy reward"):
        check_callbacks([AttentionMetrics()], specs("vgr_hard_negative", "accuracy"), [1.0, 1.0])
    with pytest.raises(ValueError, match="'vgr_hard_negative' is listed after 'vgr', whose output replaces"):
        check_callbacks([AttentionMetrics()], specs("accuracy", "vgr", "vgr_hard_negative"), [1.0, 1.0, 1.0])


class PlainWithHooks(Callback):
    def on_rollout_scored(self, trainer, pl_module, rollout):
        pass


def test_a_plain_lightning_callback_with_rollout_hooks_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"PlainWithHooks defines rollout hooks but is not a "
                                         r"dapo_lightning\.hooks\.RolloutCallback"):
        check_callbacks([PlainWithHooks()], specs("accuracy"), [1.0])
    check_callbacks([Callback()], specs("accuracy"), [1.0])  # an ordinary callback is fine
