"""SPEC 2 vgr and vgr_hard_negative rewards on hand-worked groups."""

import math

import pytest

from dapo_lightning.rewards import get_reward, get_reward_spec
from dapo_lightning.rewards.vgr import group_statistics, vgr_hard_negative_reward, vgr_reward

NAN, INF = math.nan, math.inf


def _vgr(values, G):
    return vgr_reward([""] * len(values), vgr=values, num_generations=G)


def test_both_rewards_are_registered_and_need_the_attention_callback():
    for name, fn in (("vgr", vgr_reward), ("vgr_hard_negative", vgr_hard_negative_reward)):
        spec = get_reward_spec(name)
        assert get_reward(name) is fn
        assert spec.needs == ("vgr",) and spec.provider_hint == "dapo_lightning.callbacks.AttentionMetrics"


def test_quartiles_below_ten_values():
    # n = 4 < 10: q = (0.25, 0.75); q_lo = s[int(1.0)] = 20, q_hi = s[int(3.0)] = 40, iqr 20, median s[2] = 30,
    # threshold max(5, 3) = 5 <= 20. Rewards clip((40 - v) / 20, 0, 1): 10 -> 1.5 -> 1, 20 -> 1, 30 -> 0.5, 40 -> 0.
    assert group_statistics([10, 20, 30, 40]) == (40, 20)
    assert _vgr([10, 20, 30, 40], 4) == [1.0, 1.0, 0.5, 0.0]
    assert _vgr([40, 30, 20, 10], 4) == [0.0, 0.5, 1.0, 1.0]  # order within a group does not matter


def test_deciles_from_ten_values():
    # n = 10: q = (0.10, 0.90); q_lo = s[1] = 10, q_hi = s[9] = 90, iqr 80, median s[5] = 50, threshold max(5, 5).
    values = [float(10 * k) for k in range(10)]  # 0, 10, ..., 90
    expected = [min(1.0, (90 - v) / 80) for v in values]  # 0 -> 1.125 -> 1, 10 -> 1, 50 -> 0.5, 90 -> 0
    assert _vgr(values, 10) == pytest.approx(expected)
    assert expected[5] == 0.5 and expected[0] == 1.0


def test_a_narrow_spread_or_too_few_valid_values_give_one_half():
    # iqr 8 >= 5 but < 0.10 * median (0.1 * 108 = 10.8)
    assert _vgr([100, 104, 108, 112], 4) == [0.5] * 4
    # iqr 0.4 < 5 (n = 3: q_lo = s[0] = 1.0, q_hi = s[2] = 1.4); the NaN row is invalid
    assert _vgr([1.0, 1.2, 1.4, NAN], 4) == [0.5] * 4
    # two valid values only
    assert _vgr([10, NAN, INF, 40], 4) == [0.5] * 4


def test_invalid_rows_get_one_half_and_the_rest_are_ranked_among_valid_ones():
    # valid [10, 30, 40, 50]: q_lo = s[1] = 30, q_hi = s[3] = 50, iqr 20, median s[2] = 40 -> threshold 5
    assert _vgr([10, INF, 30, 40, 50], 5) == [1.0, 0.5, 1.0, 0.5, 0.0]


def test_groups_are_independent_and_rows_past_the_last_full_group_get_one_half():
    values = [10, 20, 30, 40, 1, 1, 1, 1, 7, 9]
    assert _vgr(values, 4) == [1.0, 1.0, 0.5, 0.0] + [0.5] * 4 + [0.5, 0.5]
    assert _vgr([10, 20, 30, 40], 1) == [0.5] * 4  # G <= 1: no group to compare with


def test_hard_negative_scores_only_correct_rows_when_two_are_correct():
    values = [10, 20, 30, 40]
    # statistics over all valid rows: q_hi 40, iqr 20; correct rows 0, 2, 3 -> 1 - 0.5, 0.5 - 0.5, 0 - 0.5
    out = vgr_hard_negative_reward([""] * 4, vgr=values, num_generations=4, accuracy=[1.0, 0.0, 1.0, 1.0])
    assert out == [0.5, 0.0, 0.0, -0.5]
    # one correct row: nothing to contrast, all 0
    assert vgr_hard_negative_reward([""] * 4, vgr=values, num_generations=4, accuracy=[1, 0, 0, 0]) == [0.0] * 4
    # valid [10, 30, 40]: n = 3, q_lo = s[0] = 10, q_hi = s[2] = 40, iqr 30; correct rows 0, 1, 2:
    # row 0 -> clip(30/30) - 0.5 = 0.5; row 1 has no valid VGR -> 0; row 2 -> 10/30 - 0.5 = -1/6; row 3 is wrong -> 0
    out = vgr_hard_negative_reward([""] * 4, vgr=[10, NAN, 30, 40], num_generations=4, accuracy=[1, 1, 1, 0])
    assert out == pytest.approx([0.5, 0.0, -1 / 6, 0.0])
    # narrow spread: all 0
    assert (
        vgr_hard_negative_reward([""] * 4, vgr=[100, 104, 108, 112], num_generations=4, accuracy=[1] * 4) == [0.0] * 4
    )


def test_missing_inputs_are_errors_that_say_what_to_add():
    with pytest.raises(ValueError, match="add dapo_lightning.callbacks.AttentionMetrics"):
        vgr_reward(["a"], num_generations=1)
    with pytest.raises(ValueError, match="list the accuracy reward before it"):
        vgr_hard_negative_reward(["a"], vgr=[1.0], num_generations=1)
    with pytest.raises(ValueError, match="2 completions but 1 VGR values"):
        vgr_reward(["a", "b"], vgr=[1.0], num_generations=2)
