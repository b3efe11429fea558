"""Group advantages and reward combination (SPEC section 2)."""

import math

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.advantages import combine_rewards, frac_zero_std, group_advantages, normalize_then_sum

# Two groups of G = 4: [1, 0, 0, 1] and [2, 2, 2, 2].
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
# group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
STD1 = math.sqrt(1 / 3)


def test_group_scaling():
    adv = group_advantages(REWARDS, 4, "group")
    a = 0.5 / (STD1 + 1e-4)
    assert adv.shape == (8,)
    assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))


def test_batch_scaling_uses_the_whole_batch_std():
    adv = group_advantages(REWARDS, 4, "batch")
    std = REWARDS.std()  # unbiased over all 8
    a = 0.5 / (float(std) + 1e-4)
    assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    # an explicit (e.g. all-process) std wins
    adv = group_advantages(REWARDS, 4, "batch", batch_std=torch.tensor(1.0))
    assert_close(adv[0], torch.tensor(0.5 / 1.0001))


def test_no_scaling_only_centres():
    assert_close(group_advantages(REWARDS, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_advantages_sum_to_zero_per_group():
    rewards = torch.randn(24)
    adv = group_advantages(rewards, 6).view(4, 6)
    assert_close(adv.sum(1), torch.zeros(4), atol=1e-5, rtol=0)


def test_frac_zero_std_counts_constant_groups():
    assert float(frac_zero_std(REWARDS, 4)) == 0.5


def test_combine_rewards_weights_and_nan_as_zero():
    per_func = torch.tensor([[1.0, float("nan"), 0.5], [0.0, 0.2, -1.0]])  # [N=2, K=3]
    weights = torch.tensor([2.5, 1.0, 0.5])
    # row 0: 2.5*1 + 0 (NaN) + 0.5*0.5 = 2.75 ; row 1: 0 + 0.2 - 0.5 = -0.3
    assert_close(combine_rewards(per_func, weights), torch.tensor([2.75, -0.3]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(REWARDS, 4, "rank")


# --- normalize_then_sum (GDPO; TRL's multi_objective_aggregation) ------------------------------------------

# Two groups of G = 2, two rewards with weights [1, 0.5]:
#   group 0: reward 0 = [1, 0] (mean 0.5, unbiased std sqrt(0.5)), reward 1 = [0, 0] (std 0: contributes 0)
#   group 1: reward 0 = [1, 1] (std 0: 0),              reward 1 = [2, 4] (mean 3, std sqrt(2))
PER_FUNC = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 4.0]])
WEIGHTS = torch.tensor([1.0, 0.5])


def test_normalize_then_sum_worked_by_hand():
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # group 0, reward 0
    b = 0.5 * 1.0 / (math.sqrt(2.0) + 1e-4)  # group 1, reward 1 (weight 0.5)
    summed = torch.tensor([a, -a, -b, b])  # mean 0
    std = math.sqrt((2 * a * a + 2 * b * b) / 3)  # unbiased, over the batch
    expected = summed / (std + 1e-4)
    assert_close(normalize_then_sum(PER_FUNC, WEIGHTS, 2), expected)
    # the plain sum then group scaling sees group 1 as [2, 3]: a different ranking of what matters
    sum_first = group_advantages(combine_rewards(PER_FUNC, WEIGHTS), 2, "group")
    assert not torch.allclose(sum_first, expected)


def test_normalize_then_sum_is_scale_free_per_reward_and_uses_the_gathered_batch():
    scaled = PER_FUNC * torch.tensor([1.0, 100.0])  # reward 1 on a 100x scale
    assert_close(normalize_then_sum(scaled, WEIGHTS, 2), normalize_then_sum(PER_FUNC, WEIGHTS, 2), rtol=1e-3, atol=1e-3)
    # the batch statistics come from every process when ``gather`` is given
    other = torch.tensor([5.0, -5.0])  # another process's sums
    adv = normalize_then_sum(PER_FUNC, WEIGHTS, 2, gather=lambda s: torch.cat([s, other]))
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = 0.5 / (math.sqrt(2.0) + 1e-4)
    everything = torch.tensor([a, -a, -b, b, 5.0, -5.0])
    assert_close(adv, torch.tensor([a, -a, -b, b]) / (everything.std() + 1e-4))


def test_normalize_then_sum_leaves_no_value_out():
    per_func = torch.tensor([[1.0, float("nan")], [0.0, float("nan")], [1.0, 2.0], [1.0, 4.0]])
    adv = normalize_then_sum(per_func, WEIGHTS, 2)  # reward 1 gave group 0 no value: it counts 0 there
    assert_close(adv, normalize_then_sum(PER_FUNC, WEIGHTS, 2))
