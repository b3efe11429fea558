"""A reward function that raises: the error names the reward, the sample and its question's parquet row, or
(on_reward_error: zero) the failing samples score 0, every other sample keeps its value, and a counter is logged."""

from __future__ import annotations

import pytest
from rel_helpers import fit, make_module, scalars

from dapo_lightning.batch import SourceRow
from dapo_lightning.rewards import get_reward_spec
from dapo_lightning.rewards.registry import RewardSpec
from dapo_lightning.scoring import RewardError, reward_table

COMPLETIONS = ["ab", "abcd", "", "a", "abc", "", "abcde", "ab"]  # two groups of 4; samples 2 and 5 are empty
KWARGS = {"num_generations": 4, "solution": ["A"] * 8}
DATASET_ROWS = [SourceRow("train.parquet", 17)] * 4 + [SourceRow("train.parquet", 23)] * 4  # each sample's question


def spec(name):
    return get_reward_spec(name)


@pytest.mark.reliability("Faults", "A reward that raises on some samples (on_reward_error: raise)",
                         "RewardError names the reward, the exception, the sample index, its dataset row and an "
                         "escaped preview of the completion")
def test_a_failing_reward_is_named_with_its_sample():
    completions = list(COMPLETIONS)
    completions[5] = ""
    with pytest.raises(RewardError) as error:
        reward_table([spec("rel_helpers.divides_by_length")], completions, KWARGS, dataset_rows=DATASET_ROWS)
    message = str(error.value)
    assert message.startswith("reward 'rel_helpers.divides_by_length' raised ZeroDivisionError: float division by zero "
                              "on sample 2 (from train.parquet: row 17); 1 more failing; completion ''.")
    assert "model.rewards.on_reward_error: zero" in message and error.value.rows == [2, 5]


def test_the_preview_is_escaped_and_short():
    completions = ["x\n</details>\x1b[31m" + "y" * 500, "", "", ""]
    failing = RewardSpec("breaks", lambda cs, **kw: [1 / 0 if c.startswith("x") else 1.0 for c in cs])
    with pytest.raises(RewardError) as error:
        reward_table([failing], completions, {"num_generations": 4})
    message = str(error.value)
    assert "completion 'x\\n</details>\\x1b[31m" in message and "(+437 characters)" in message
    assert "\n" not in message and "\x1b" not in message


@pytest.mark.reliability("Faults", "A reward that raises on some samples (on_reward_error: zero)",
                         "the failing samples score 0, the others keep their values, the rows are reported")
def test_zero_mode_scores_the_failing_samples_zero_and_keeps_the_rest():
    table = reward_table([spec("rel_helpers.divides_by_length"), spec("format")], COMPLETIONS, KWARGS,
                         on_error="zero")
    expected = [0.5, 0.25, 0.0, 1.0, 1 / 3, 0.0, 0.2, 0.5]
    assert table.values[:, 0].tolist() == pytest.approx(expected)
    assert table.errors == {"rel_helpers.divides_by_length": [2, 5]}
    assert not table.nonfinite.any()


def test_a_group_reward_is_located_by_group():
    """A reward with declared inputs (``needs``: vgr, vgr_hard_negative) scores whole groups, so it is called again
    per group, never per sample (a group of one would give another value): the error names the group's rows."""

    def group_reward(completions, vgr, num_generations, **kwargs):
        if any(v is None for v in vgr):
            raise ValueError("vgr missing for a row")
        return [0.5] * len(completions)

    grouped = RewardSpec("grouped", group_reward, needs=("vgr",))
    kwargs = {**KWARGS, "vgr": [1.0] * 5 + [None] + [1.0] * 2}
    with pytest.raises(RewardError, match=r"on samples 4-7 \(the group, from train.parquet: row 23; 'grouped' "
                                          r"scores whole groups\)"):
        reward_table([grouped], COMPLETIONS, kwargs, dataset_rows=DATASET_ROWS)
    table = reward_table([grouped], COMPLETIONS, kwargs, on_error="zero")
    assert table.values[:, 0].tolist() == [0.5] * 4 + [0.0] * 4 and table.errors == {"grouped": [4, 5, 6, 7]}


def test_a_failure_no_single_group_reproduces():
    with pytest.raises(RewardError, match="on the batch of 8 completions, but on no group or sample alone"):
        reward_table([spec("rel_helpers.raises_on_batches")], COMPLETIONS, KWARGS)
    table = reward_table([spec("rel_helpers.raises_on_batches")], COMPLETIONS, KWARGS, on_error="zero")
    assert table.values[:, 0].tolist() == [0.0] * 8 and len(table.errors["rel_helpers.raises_on_batches"]) == 8


def test_wrong_lengths_and_non_numbers():
    too_short = RewardSpec("short", lambda cs, **kw: [1.0])
    with pytest.raises(RewardError, match="reward 'short' returned 1 values for 8 completions"):
        reward_table([too_short], COMPLETIONS, KWARGS, on_error="zero")  # a broken contract is never zeroed
    words = RewardSpec("words", lambda cs, **kw: ["high" if c == "" else 1.0 for c in cs])
    table = reward_table([words], COMPLETIONS, KWARGS, on_error="zero")
    assert table.errors == {"words": [2, 5]}
    none_and_nan = RewardSpec("gaps", lambda cs, **kw: [None, float("nan")] + [1.0] * (len(cs) - 2))
    table = reward_table([none_and_nan], COMPLETIONS, KWARGS)
    assert table.nonfinite[:, 0].tolist() == [False, True] + [False] * 6  # None is "no value", NaN is a fault


@pytest.mark.reliability("Faults", "A reward that raises during training, on_reward_error: zero",
                         "training goes on; train/reward_errors/<reward> counts the zeroed samples per step")
def test_zero_mode_in_a_fit_logs_the_counter(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, rewards=("rel_helpers.raises_on_a", "rel_helpers.starts_with_abc"),
                         on_reward_error="zero")
    trainer = fit(tmp_path, module, tiny_model_dir, synthetic_parquet, batches=2)
    assert trainer.global_step == 2
    counts = [v for _, v in scalars(tmp_path, "train/reward_errors/rel_helpers.raises_on_a")]
    assert len(counts) == 2 and sum(counts) > 0
    assert [v for _, v in scalars(tmp_path, "train/reward_errors/rel_helpers.starts_with_abc")] == [0.0, 0.0]
