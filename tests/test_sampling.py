"""Sampling settings: min-p and the repetition penalty by hand, and validation's own ``eval_*`` keys.

That both generators draw the same tokens with each setting is in ``tests/test_shared_prompt.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.batch import PromptBatch
from dapo_lightning.config import RolloutConfig
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.rollout import SamplingSettings, generate_shared, processed_logits, prompt_tokens_seen, sample_next
from tests.test_module import fit, make_module

INF = math.inf


def _settings(**kwargs) -> SamplingSettings:
    return SamplingSettings(num_generations=1, max_new_tokens=1, **kwargs)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, True]])
    # penalty 2: 2 / 2 = 1, -1 * 2 = -2, token 2 unseen stays 0.5, 0 / 2 = 0 (0 is not negative: divided)
    got = processed_logits(logits, _settings(repetition_penalty=2.0, greedy=True), None, seen)
    assert_close(got, torch.tensor([[1.0, -2.0, 0.5, 0.0]]), rtol=0, atol=0)
    # penalty 0.5 favours repeats: 2 / 0.5 = 4, -1 * 0.5 = -0.5
    got = processed_logits(logits, _settings(repetition_penalty=0.5, greedy=True), None, seen)
    assert_close(got, torch.tensor([[4.0, -0.5, 0.5, 0.0]]), rtol=0, atol=0)
    # a suppressed token stays -inf whatever the penalty (-inf * 2 = -inf; then the suppression sets it)
    got = processed_logits(logits, _settings(repetition_penalty=2.0, greedy=True), torch.tensor([1]), seen)
    assert_close(got, torch.tensor([[1.0, -INF, 0.5, 0.0]]), rtol=0, atol=0)
    # unseen tokens, or no ``seen`` at all, are untouched
    assert torch.equal(processed_logits(logits, _settings(repetition_penalty=2.0, greedy=True), None), logits)


def test_repetition_penalty_comes_before_greedy_and_top_k():
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, False]])
    # greedy: 2 / 2 = 1 < 1.5, so the argmax moves from token 0 to token 1
    assert sample_next(logits, _settings(greedy=True), None).tolist() == [0]
    assert sample_next(logits, _settings(greedy=True, repetition_penalty=2.0), None, seen).tolist() == [1]
    # top-k 1 after the penalty keeps token 1 (before it, it would keep token 0, then penalised to 1.0)
    got = processed_logits(logits, _settings(top_k=1, repetition_penalty=2.0), None, seen)
    assert_close(got, torch.tensor([[-INF, 1.5, -INF]]), rtol=0, atol=0)


def test_min_p_drops_tokens_below_min_p_times_the_top_probability_after_temperature():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = p.log()
    # T = 1: threshold 0.2 * 0.5 = 0.1 drops only p = 0.05
    got = processed_logits(logits, _settings(min_p=0.2), None)
    assert_close(got, torch.cat([logits[:, :3], torch.full((1, 1), -INF)], dim=1))
    # T = 0.5: logits 2 log p, probabilities p^2 / 0.365 = [0.685, 0.247, 0.062, 0.007];
    # threshold 0.2 * 0.685 = 0.137 also drops p = 0.15: min-p sees the tempered distribution
    got = processed_logits(logits, _settings(temperature=0.5, min_p=0.2), None)
    assert_close(got, torch.cat([2 * logits[:, :2], torch.full((1, 2), -INF)], dim=1))
    # min_p 0 is off: the logits only divided by the temperature
    assert torch.equal(processed_logits(logits, _settings(temperature=0.5), None), logits / 0.5)
    # what is dropped is never drawn: with min_p 0.7 (threshold 0.35) only token 0 is left
    torch.manual_seed(0)
    draws = sample_next(logits.expand(64, 4), _settings(min_p=0.7), None)
    assert draws.tolist() == [0] * 64


def test_min_p_comes_after_top_p():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top-p 0.75 first: ascending cumulative mass [0.1, 0.3, 0.6, 1.0], <= 0.25 drops p = 0.1;
    # then min-p 0.3: threshold 0.3 * 0.4 = 0.12 keeps 0.4, 0.3 and 0.2 -> three tokens.
    # (min-p first would drop 0.1, renormalise to [0.44, 0.33, 0.22], and top-p would then drop 0.22 too.)
    got = processed_logits(p.log(), _settings(top_p=0.75, min_p=0.3), None)
    assert torch.isfinite(got).tolist() == [[True, True, True, False]]


def test_prompt_tokens_seen_skips_left_padding_and_ids_past_the_logits():
    pad = 7
    ids = torch.tensor([[pad, pad, 5, 6], [3, pad, 5, 9]])  # row 1: a pad id inside the prompt, an id >= V = 8
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    prompts = PromptBatch(input_ids=ids, attention_mask=mask, pixel_values=torch.zeros(0, 1),
                          image_grid_thw=torch.zeros(0, 3, dtype=torch.long), image_counts=[0, 0])
    seen = prompt_tokens_seen(prompts, vocab_size=8)  # [B, V + 1]; column V collects what the penalty ignores
    assert seen.shape == (2, 9)
    # row 0 sees 5 and 6 (its left padding is not a token of the prompt); row 1 sees 3, 7 (attended), 5; 9 is past V
    assert seen[:, :8].nonzero().tolist() == [[0, 5], [0, 6], [1, 3], [1, 5], [1, 7]]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"min_p": 1.0}, "model.rollout.min_p: must be in [0, 1) (0: off), got 1.0"),
        ({"min_p": -0.1}, "model.rollout.min_p: must be in [0, 1)"),
        ({"repetition_penalty": 0.0}, "model.rollout.repetition_penalty: must be > 0 (1.0: off), got 0.0"),
        ({"top_k": -1}, "model.rollout.top_k: must be >= 0"),
        ({"eval_temperature": 0.0}, "model.rollout.eval_temperature: must be > 0, got 0.0"),
        ({"eval_top_p": 1.5}, "model.rollout.eval_top_p: must be in (0, 1]"),
        ({"eval_top_k": -2}, "model.rollout.eval_top_k: must be >= 0"),
        ({"eval_min_p": 1.0}, "model.rollout.eval_min_p: must be in [0, 1)"),
        ({"eval_repetition_penalty": -1.0}, "model.rollout.eval_repetition_penalty: must be > 0"),
        ({"eval_greedy": True, "eval_temperature": 0.7},
         "model.rollout.eval_temperature: is not used when model.rollout.eval_greedy is true"),
        ({"eval_greedy": True, "eval_min_p": 0.1}, "model.rollout.eval_min_p: is not used when"),
    ],
)
def test_sampling_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError) as error:
        RolloutConfig(**kwargs)
    assert str(error.value).startswith(key)


def test_greedy_validation_may_keep_a_repetition_penalty():
    RolloutConfig(eval_greedy=True, eval_repetition_penalty=1.1)  # greedy applies the penalty: no error


def test_validation_takes_the_eval_keys_and_falls_back_to_the_training_values(tiny_model_dir):
    module = make_module(tiny_model_dir)
    module.rollout_cfg = RolloutConfig(num_generations=4, max_completion_length=5, temperature=0.9, top_p=0.95,
                                       top_k=40, min_p=0.05, repetition_penalty=1.1)
    module.configure_model()
    train = module.actor.sampling("train")
    assert train == SamplingSettings(num_generations=4, max_new_tokens=5, temperature=0.9, top_p=0.95, top_k=40,
                                     min_p=0.05, repetition_penalty=1.1)
    assert module.actor.sampling("val") == replace(train, num_generations=4)  # unset eval keys: the training values
    module.actor.rollout_cfg = replace(module.rollout_cfg, eval_temperature=0.6, eval_top_p=0.8, eval_top_k=0,
                                       eval_min_p=0.0, eval_repetition_penalty=1.0, eval_num_generations=2)
    assert module.actor.sampling("val") == SamplingSettings(num_generations=2, max_new_tokens=5, temperature=0.6,
                                                            top_p=0.8, top_k=0, min_p=0.0, repetition_penalty=1.0)
    assert module.actor.sampling("train") == train  # training never reads the eval keys
    module.actor.rollout_cfg = replace(module.rollout_cfg, eval_greedy=True, eval_repetition_penalty=1.3)
    greedy = module.actor.sampling("val")
    assert greedy.greedy and greedy.num_generations == 1 and greedy.repetition_penalty == 1.3


def test_default_validation_samples_as_before(tiny_model_dir):
    """No eval key set: validation samples eval_num_generations at the training temperature, not greedy."""
    module = make_module(tiny_model_dir)
    module.configure_model()
    assert module.actor.sampling("val") == SamplingSettings(num_generations=2, max_new_tokens=3, temperature=1.0)


class SettingsSeen(RolloutCallback):
    """The settings each stage's decoder was given, and the validation rollouts."""

    def __init__(self):
        self.settings, self.val = {}, []

    def generation_recorder(self, trainer, pl_module, prompts, settings, stage, requested_by):
        self.settings.setdefault(stage, settings)
        return None

    def on_rollout_generated(self, trainer, pl_module, rollout):
        if rollout.stage == "val":
            self.val.append(rollout)


def test_a_validation_rollout_samples_with_the_eval_settings(tmp_path, tiny_model_dir, synthetic_parquet):
    seen = SettingsSeen()
    module = make_module(tiny_model_dir, rewards=("tests.test_module.text_length",))
    # training samples the full distribution; validation at temperature 0.5 among the top-1 token only
    module.rollout_cfg = RolloutConfig(num_generations=4, max_completion_length=4, eval_num_generations=3,
                                       eval_temperature=0.5, eval_top_k=1)
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2, callbacks=[seen], val=True)
    assert seen.settings["train"] == SamplingSettings(num_generations=4, max_new_tokens=4)
    assert seen.settings["val"] == SamplingSettings(num_generations=3, max_new_tokens=4, temperature=0.5, top_k=1)
    (val,) = seen.val
    # top-1 sampling is the argmax: each prompt's 3 completions are its greedy completion (the policy after the fit)
    greedy = generate_shared(module.policy.eval(), val.prompts, module.tokenizer,
                             SamplingSettings(num_generations=1, max_new_tokens=4, greedy=True), module.actor.token_ids)
    assert torch.equal(val.completion_ids, greedy.completion_ids.repeat_interleave(3, dim=0))
