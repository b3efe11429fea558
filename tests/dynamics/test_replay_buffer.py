"""ReplayBuffer (SPEC 6): eligibility, scores and sampling by hand; replayed groups keep their own prompt and image."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.callbacks import DynamicSampling, ReplayBuffer
from dapo_lightning.callbacks.replay_buffer import eligible_groups, group_statistics, sample_proportional
from dapo_lightning.advantages import group_advantages
from dapo_lightning.data import example_prompt_batch
from dapo_lightning.groups import take_group
from dapo_lightning.hooks import check_callbacks
from dapo_lightning.rewards import get_reward_spec
from dapo_lightning.logprobs import completion_logps
from dapo_lightning.rollout import SamplingSettings, TokenIds, generate

G = 4


# --- the numbers ----------------------------------------------------------------------------------------


def test_std_mean_and_score_worked_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 0, 2, 2, 2, 2])
    advantages = group_advantages(rewards, G)
    std, mean, score = group_statistics(rewards, advantages, G)
    # group 0: mean 0.25, unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.25 -> std 0.5
    #          |A| = (0.75 + 3 * 0.25) / (0.5 + 1e-4) = 1.5 / 0.5001; score = that * 0.5
    # group 1: mean 0.5, var = 4 * 0.25 / 3 -> std 0.57735; |A| = 2 / (0.57735 + 1e-4); score = that * 0.57735
    # group 2: constant -> std 0, score 0
    s1 = (1 / 3) ** 0.5
    assert_close(std, torch.tensor([0.5, s1, 0.0]))
    assert_close(mean, torch.tensor([0.25, 0.5, 2.0]))
    assert_close(score, torch.tensor([1.5 / 0.5001 * 0.5, 2.0 / (s1 + 1e-4) * s1, 0.0]))
    assert score.shape == (3,)  # [B]


def test_eligible_needs_variance_and_a_mean_above_filter_min_reward():
    std, mean = torch.tensor([0.5, 0.57735, 0.0, 1e-7]), torch.tensor([0.25, 0.5, 2.0, 3.0])
    assert eligible_groups(std, mean, var_epsilon=1e-6, min_reward=None).tolist() == [True, True, False, False]
    assert eligible_groups(std, mean, var_epsilon=1e-6, min_reward=0.3).tolist() == [False, True, False, False]
    assert eligible_groups(std, mean, var_epsilon=0.55, min_reward=None).tolist() == [False, True, False, False]


def test_sampling_is_proportional_to_score():
    generator = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    draws = [sample_proportional(scores, 1, generator)[0] for _ in range(10000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).double() / len(draws)
    assert_close(frequencies, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.015, rtol=0)


def test_sampling_repeats_a_group_only_when_more_are_needed_than_held():
    generator = torch.Generator().manual_seed(1)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sorted(sample_proportional(scores, 4, generator)) == [0, 1, 2, 3]  # without replacement
    many = sample_proportional(scores, 7, generator)
    assert len(many) == 7 and len(set(many)) < 7  # with replacement


def test_the_heap_keeps_the_best_scores_and_is_bounded():
    buffer = ReplayBuffer(replay_buffer_size=3)
    for score in [5.0, 1.0, 3.0, 2.0, 4.0]:
        buffer._push(score, SimpleNamespace(for_storage=lambda: None))
    assert sorted(buffer.scores) == [3.0, 4.0, 5.0]


@pytest.mark.parametrize("size", [0, -1, 2.5])
def test_a_bad_size_names_the_key(size):
    with pytest.raises(ValueError, match=r"ReplayBuffer\.replay_buffer_size: must be an integer >= 1"):
        ReplayBuffer(replay_buffer_size=size)


def test_negative_epsilon_names_the_key():
    with pytest.raises(ValueError, match=r"ReplayBuffer\.replay_var_epsilon"):
        ReplayBuffer(replay_var_epsilon=-1.0)


# --- replacing groups in real rollouts -----------------------------------------------------------------


def fake_module(policy, processor, logged):
    """The members of hooks.RolloutModule the buffer reads."""
    return SimpleNamespace(
        reward_names=["r"],
        num_generations=G,
        pad_token_id=TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config).pad,
        policy_dtype=next(policy.parameters()).dtype,
        log_dict=lambda values, **kwargs: logged.append(values),
    )


def fake_trainer(*callbacks):
    return SimpleNamespace(callbacks=list(callbacks), global_rank=0, world_size=1)


def scored_rollout(policy, processor, batch, rewards, *, seed, stage="train"):
    """A real rollout of the tiny policy, with the old log-probs the module would compute and given rewards."""
    torch.manual_seed(seed)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    rollout = generate(policy.eval(), batch, processor.tokenizer, SamplingSettings(num_generations=G, max_new_tokens=4),
                       token_ids, stage=stage)
    with torch.no_grad():
        logps = completion_logps(policy, rollout.model_inputs(list(range(rollout.num_rows)))).logps
    rollout.old_logps = torch.nn.functional.pad(logps, (0, rollout.completion_ids.shape[1] - logps.shape[1]))
    rollout.rewards = torch.tensor(rewards, dtype=torch.float32)
    rollout.rewards_per_func = rollout.rewards.unsqueeze(1)
    rollout.advantages = group_advantages(rollout.rewards, G)
    rollout.reward_names, rollout.reward_weights = ["r"], torch.tensor([1.0])
    return rollout


@pytest.fixture()
def two_batches(processor, synthetic_rows, prompt_batch):
    later = example_prompt_batch(processor, synthetic_rows[10:13])
    assert later.index != prompt_batch.index or later.prompts != prompt_batch.prompts
    return prompt_batch, later


def test_a_replayed_group_keeps_its_own_prompt_image_completions_and_logprobs(policy, processor, two_batches):
    first_batch, second_batch = two_batches
    buffer, logged = ReplayBuffer(replay_buffer_size=4, seed=0), []
    module, trainer = fake_module(policy, processor, logged), fake_trainer(buffer)
    buffer.on_fit_start(trainer, module)

    # step 1: group 0 varies (stored); groups 1 and 2 are constant but the buffer is still empty
    first = scored_rollout(policy, processor, first_batch, [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], seed=1)
    stored = copy.deepcopy(take_group(first, 0))
    buffer.on_rollout_scored(trainer, module, first)
    assert not first.replayed.any() and len(buffer) == 1
    assert buffer.scores == pytest.approx([1.5 / 0.5001 * 0.5])
    assert logged[0] == {"train/replay/replaced_groups": 0.0, "train/replay/ineligible_groups": 2.0}

    # step 2: other prompts; groups 1 and 2 get no signal and are replaced by the one stored group (twice)
    second = scored_rollout(policy, processor, second_batch, [0, 1, 1, 0] + [0] * 8, seed=2)
    kept = copy.deepcopy(take_group(second, 0))
    buffer.on_rollout_scored(trainer, module, second)
    assert second.num_rows == 3 * G
    assert second.replayed.tolist() == [False] * G + [True] * 2 * G
    assert logged[2] == {"train/replay/replaced_groups": 2.0, "train/replay/ineligible_groups": 2.0}
    for g, expected in ((0, kept), (1, stored), (2, stored)):
        got = take_group(second, g)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            assert torch.equal(getattr(got.prompt, key), getattr(expected.prompt, key)), (g, key)
        assert got.prompt.columns == expected.prompt.columns
        assert got.prompt.index == expected.prompt.index
        assert got.completions == expected.completions
        for key in ("completion_ids", "completion_mask", "old_logps", "advantages", "rewards", "truncated"):
            assert torch.equal(got.rows[key], expected.rows[key]), (g, key)
    # the assembled batch is consistent: the policy's log-probs of each row under its own prompt and image
    # are the stored sampling log-probs (a wrong image or shifted padding would change them)
    rows = list(range(3 * G))
    with torch.no_grad():
        now = completion_logps(policy, second.model_inputs(rows))
    width = now.logps.shape[1]
    assert_close(now.logps * now.mask, second.old_logps[:, :width] * now.mask, rtol=0, atol=1e-5)
    # both eligible groups are in the buffer now
    assert sorted(buffer.scores) == pytest.approx(sorted([1.5 / 0.5001 * 0.5, 2.0 / (3 ** -0.5 + 1e-4) * 3 ** -0.5]))


def test_token_weights_of_replayed_rows_are_one(policy, processor, two_batches):
    first_batch, second_batch = two_batches
    buffer = ReplayBuffer(replay_buffer_size=4)
    module, trainer = fake_module(policy, processor, []), fake_trainer(buffer)
    buffer.on_fit_start(trainer, module)
    first = scored_rollout(policy, processor, first_batch, [1, 0, 0, 0] + [0] * 8, seed=1)
    first.token_weights = torch.full(first.completion_ids.shape, 2.0)
    buffer.on_rollout_scored(trainer, module, first)
    second = scored_rollout(policy, processor, second_batch, [0, 1, 1, 0] + [0] * 8, seed=2)
    second.token_weights = torch.full(second.completion_ids.shape, 3.0)
    buffer.on_rollout_scored(trainer, module, second)
    assert (second.token_weights[:G] == 3.0).all()
    assert (second.token_weights[G:] == 1.0).all()


@pytest.mark.parametrize("stage, tag", [("val", None), ("train", "dynamic_sampling"), ("train", "probe:text_black")])
def test_validation_and_extra_rollouts_never_replay(policy, processor, two_batches, stage, tag):
    first_batch, second_batch = two_batches
    buffer = ReplayBuffer(replay_buffer_size=4)
    module, trainer = fake_module(policy, processor, []), fake_trainer(buffer)
    buffer.on_fit_start(trainer, module)
    buffer.on_rollout_scored(trainer, module, scored_rollout(policy, processor, first_batch, [1, 0, 0, 0] * 3, seed=1))
    assert len(buffer) == 3
    other = scored_rollout(policy, processor, second_batch, [0] * 12, seed=2, stage=stage)
    other.requested_by = tag
    before = other.completion_ids.clone()
    buffer.on_rollout_scored(trainer, module, other)
    assert torch.equal(other.completion_ids, before) and not other.replayed.any() and len(buffer) == 3


def test_dynamic_sampling_must_come_first(policy, processor):
    specs = [get_reward_spec("accuracy")]
    check_callbacks([DynamicSampling(), ReplayBuffer()], specs, [1.0])  # the right order
    with pytest.raises(ValueError, match=r"trainer\.callbacks: list DynamicSampling before ReplayBuffer"):
        check_callbacks([ReplayBuffer(), DynamicSampling()], specs, [1.0])


# --- checkpoint state ----------------------------------------------------------------------------------


def roundtrip(state):
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    return torch.load(stream, weights_only=True)


def test_state_survives_a_weights_only_checkpoint(policy, processor, prompt_batch):
    buffer = ReplayBuffer(replay_buffer_size=4, seed=3)
    module, trainer = fake_module(policy, processor, []), fake_trainer(buffer)
    buffer.on_fit_start(trainer, module)
    buffer.on_rollout_scored(trainer, module, scored_rollout(policy, processor, prompt_batch, [1, 0, 0, 0, 1, 1, 0, 0,
                                                                                              0, 0, 0, 3], seed=1))
    state = roundtrip(buffer.state_dict())
    restored = ReplayBuffer(replay_buffer_size=4, seed=99)
    restored.on_fit_start(fake_trainer(restored), module)
    restored.load_state_dict(state)
    restored.on_train_start(fake_trainer(restored), module)
    assert restored.scores == buffer.scores and restored._counter == buffer._counter
    for (_, _, a), (_, _, b) in zip(buffer._heap, restored._heap):
        assert torch.equal(a.prompt.pixel_values, b.prompt.pixel_values)
        assert a.completions == b.completions
    scores = torch.tensor(buffer.scores)
    assert sample_proportional(scores, 5, buffer._generator) == sample_proportional(scores, 5, restored._generator)


def test_a_checkpoint_of_another_world_size_is_shared_out_by_score(policy, processor, prompt_batch):
    record = take_group(scored_rollout(policy, processor, prompt_batch, [1, 0, 0, 0] * 3, seed=1), 0).state()

    def group(score, order):
        return {"score": score, "order": order, "record": record}

    state = {"replay_buffer_size": 3, "reward_names": ["r"], "num_generations": G, "contents_saved": True,
             "per_rank": [{"groups": [group(1.0, 0), group(5.0, 1)], "counter": 2, "generator": None},
                          {"groups": [group(3.0, 0), group(2.0, 1)], "counter": 2, "generator": None}]}
    buffer = ReplayBuffer(replay_buffer_size=3)
    module = fake_module(policy, processor, [])
    buffer.on_fit_start(fake_trainer(buffer), module)
    buffer.load_state_dict(state)
    with pytest.warns(UserWarning, match="written by 2 processes, this run has 1"):
        buffer.on_train_start(fake_trainer(buffer), module)
    assert sorted(buffer.scores) == [2.0, 3.0, 5.0]
