"""Configuration: every numeric setting checked at construction, unknown keys named, rewards as function objects."""

from __future__ import annotations

import math

import pytest

from dapo_lightning.config import (
    LoraSettings, LossConfig, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig, coerce,
)
from dapo_lightning.module import DAPOModule
from dapo_lightning.rewards import get_reward_spec


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: RolloutConfig(top_k=-1), "model.rollout.top_k"),
        (lambda: RolloutConfig(temperature=0.0), "model.rollout.temperature"),
        (lambda: LoraSettings(alpha=0), "model.policy.lora.alpha"),
        (lambda: LoraSettings(dropout=1.0), "model.policy.lora.dropout"),
        (lambda: OptimConfig(learning_rate=math.inf), "model.optim.learning_rate"),
        (lambda: OptimConfig(learning_rate=math.nan), "model.optim.learning_rate"),
        (lambda: OptimConfig(weight_decay=-0.1), "model.optim.weight_decay"),
        (lambda: OptimConfig(adam_betas=(0.9, 1.0)), "model.optim.adam_betas"),
        (lambda: OptimConfig(adam_epsilon=0.0), "model.optim.adam_epsilon"),
        (lambda: LossConfig(epsilon_high=math.inf), "model.loss.epsilon_high"),
        (lambda: LossConfig(beta=math.nan), "model.loss.beta"),
    ],
)
def test_a_bad_number_is_refused_at_construction_naming_its_key(make, key):
    with pytest.raises(ValueError, match=rf"^{key.replace('.', r'[.]')}: "):
        make()


def test_an_unknown_key_in_a_dict_config_is_named_with_the_nearest_one():
    """It trained at the default learning rate without a word before."""
    with pytest.raises(ValueError, match=r"model\.optim\.learning_rat: unknown key; did you mean 'learning_rate'\?"):
        DAPOModule(optim={"learning_rat": 0.5})
    with pytest.raises(ValueError, match=r"^model\.policy\.lora\.rank: unknown key"):
        coerce(PolicyConfig, {"lora": {"rank": 8}}, "model.policy")
    assert DAPOModule(optim={"learning_rate": 0.5}).optim_cfg.learning_rate == 0.5


def module_level_reward(completions, **kwargs):
    return [1.0 for _ in completions]


def test_a_reward_passed_as_a_function_is_named_by_its_dotted_path():
    config = RewardConfig(reward_funcs=["accuracy", module_level_reward])
    assert config.reward_funcs == ["accuracy", "tests.test_config.module_level_reward"]  # a checkpoint-safe name
    assert get_reward_spec(config.reward_funcs[1]).fn is module_level_reward
    module = DAPOModule(rewards=RewardConfig(reward_funcs=[lambda completions, **kw: [0.0] * len(completions)]))
    (name,) = module.reward_names  # a lambda works in this process (a resumed run in another cannot import it)
    assert name.startswith("tests.test_config.") and name.endswith("<lambda>")
