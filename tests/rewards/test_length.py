"""Length reward (SPEC section 2): soft overlong punishment, worked out by hand."""

import pytest

from dapo_lightning.rewards.length import length_reward, overlong_penalty

EOS = 2

# L = 20, C = 5, so L - C = 15.  (n, reward, arithmetic)
SMALL_CASES = [
    (0, 0.0),  # n <= 15
    (15, 0.0),  # n = L - C: last free length
    (16, -0.2),  # (15 - 16) / 5
    (18, -0.6),  # (15 - 18) / 5
    (20, -1.0),  # n = L: (15 - 20) / 5
    (21, -1.0),  # n = L + 1: over the limit
    (100, -1.0),
]


@pytest.mark.parametrize("n, reward", SMALL_CASES)
def test_overlong_penalty_by_hand(n, reward):
    assert overlong_penalty(n, 20, 5) == pytest.approx(reward, abs=1e-12)


# Defaults of the original runs: L = 512, C = 50, so L - C = 462.
@pytest.mark.parametrize(
    "n, reward",
    [(462, 0.0), (463, -0.02), (487, -0.5), (511, -0.98), (512, -1.0), (513, -1.0)],
    # -1/50; (462 - 487)/50; (462 - 511)/50; (462 - 512)/50
)
def test_length_reward_default_cache(n, reward):
    ids = [7] * (n - 1) + [EOS]  # the EOS token counts
    assert length_reward(["text"], completion_ids=[ids], max_completion_length=512) == [pytest.approx(reward, abs=1e-12)]


def test_length_reward_rows_from_completion_ids():
    # L = 10, C = 4, L - C = 6: n = 3 -> 0; n = 8 -> (6 - 8)/4 = -0.5; n = 11 -> -1
    ids = [[1, 2, EOS], [1] * 7 + [EOS], [1] * 11]
    rewards = length_reward(["a", "b", "c"], completion_ids=ids, max_completion_length=10, soft_punish_cache=4, solution=["A"] * 3)
    assert rewards == [0.0, -0.5, -1.0]


def test_length_reward_from_completion_lengths_takes_precedence():
    # L = 10, C = 4: n = 7 -> (6 - 7)/4 = -0.25, whatever the ids say
    rewards = length_reward(["a"], completion_ids=[[1]], completion_lengths=[7], max_completion_length=10, soft_punish_cache=4)
    assert rewards == [-0.25]


def test_zero_cache_is_a_hard_cut_at_the_limit():
    assert length_reward(["a", "b"], completion_lengths=[10, 11], max_completion_length=10, soft_punish_cache=0) == [0.0, -1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"completion_lengths": [1]}, "needs max_completion_length"),
        ({"completion_lengths": [1], "max_completion_length": 0}, "max_completion_length must be >= 1"),
        ({"completion_lengths": [1], "max_completion_length": 512.0}, "max_completion_length must be an integer"),
        ({"completion_lengths": [1], "max_completion_length": 10, "soft_punish_cache": -1}, "soft_punish_cache must be >= 0"),
        ({"completion_lengths": [-1], "max_completion_length": 10}, "completion_lengths must be >= 0"),
        ({"max_completion_length": 10}, "needs completion_ids or completion_lengths"),
        ({"completion_lengths": [1, 2], "max_completion_length": 10}, "1 completions but 2 lengths"),
    ],
)
def test_length_reward_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        length_reward(["a"], **kwargs)
