"""The built-in rewards are registered under their SPEC section 2 names; dotted paths resolve."""

import pytest

from dapo_lightning.rewards import available_rewards, get_reward, get_reward_spec, register_reward
from dapo_lightning.rewards.accuracy import accuracy
from dapo_lightning.rewards.format import format_reward
from dapo_lightning.rewards.length import length_reward
from tests.rewards.dotted_reward import brevity


@pytest.mark.parametrize("name, fn", [("accuracy", accuracy), ("format", format_reward), ("length", length_reward)])
def test_builtin_rewards_are_registered(name, fn):
    assert get_reward(name) is fn
    assert name in available_rewards()
    assert get_reward_spec(name).needs == ()


@pytest.mark.parametrize("path", ["tests.rewards.dotted_reward.brevity", "tests.rewards.dotted_reward:brevity"])
def test_a_dotted_path_resolves_to_the_function(path):
    fn = get_reward(path)
    assert fn is brevity
    assert fn(["ab", ""]) == [1 / 3, 1.0]


@pytest.mark.parametrize(
    "name, message",
    [
        ("tests.rewards.dotted_reward.missing", "cannot import it"),
        ("tests.rewards.dotted_reward.NOT_A_FUNCTION", "is not callable"),
        ("no_such_reward", "is not registered; available: accuracy, .*format, .*length"),
    ],
)
def test_unknown_rewards_are_errors(name, message):
    with pytest.raises(ValueError, match=message):
        get_reward(name)


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(brevity)
    assert get_reward("accuracy") is accuracy
