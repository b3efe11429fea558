"""Shared-prompt rollouts and log-prob passes give the same numbers as the per-row reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.config import LoraSettings, LossConfig, OptimConfig, PolicyConfig, RolloutConfig
from dapo_lightning.models import apply_lora
from transformers.cache_utils import DynamicLayer

from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.logprobs import completion_logps, completion_logps_shared
from dapo_lightning.rollout import RepeatedPromptLayer, SamplingSettings, TokenIds, generate_hf, generate_shared
from tests.test_module import GradientCapture, fit, make_module


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(num_generations=1, max_new_tokens=8, greedy=True),
        SamplingSettings(num_generations=4, max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=20),
        SamplingSettings(num_generations=2, max_new_tokens=6, min_new_tokens=6),
        # the tiny model's next-token distributions are nearly flat: temperature 0.3 lets min-p and the penalty bite
        SamplingSettings(num_generations=4, max_new_tokens=8, temperature=0.3, min_p=0.5),
        SamplingSettings(num_generations=4, max_new_tokens=8, temperature=0.3, repetition_penalty=1.3),
        SamplingSettings(num_generations=4, max_new_tokens=8, temperature=0.3, repetition_penalty=0.8),
        # greedy with a strong penalty: fails if the left padding or the prompt were counted wrongly
        SamplingSettings(num_generations=1, max_new_tokens=8, greedy=True, repetition_penalty=3.0),
        SamplingSettings(num_generations=4, max_new_tokens=8, temperature=0.3, top_k=20, top_p=0.9, min_p=0.3,
                         repetition_penalty=1.2, min_new_tokens=8),
    ],
    ids=["greedy", "sampled", "min-length", "min-p", "repetition-penalty", "repetition-reward", "greedy-penalty",
         "everything"],
)
def test_shared_generation_samples_exactly_what_generate_samples(policy, processor, prompt_batch, settings):
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    policy.eval()
    torch.manual_seed(0)
    reference = generate_hf(policy, prompt_batch, processor.tokenizer, settings, token_ids)
    torch.manual_seed(0)
    shared = generate_shared(policy, prompt_batch, processor.tokenizer, settings, token_ids)
    assert torch.equal(shared.completion_ids, reference.completion_ids)
    assert torch.equal(shared.completion_mask, reference.completion_mask)
    assert shared.completions == reference.completions
    if settings.min_new_tokens:
        assert (shared.completion_mask.sum(-1) == settings.min_new_tokens).all()
    if settings.min_p or settings.repetition_penalty != 1.0:  # the setting changed what was sampled
        torch.manual_seed(0)
        off = generate_shared(policy, prompt_batch, processor.tokenizer,
                              replace(settings, min_p=0.0, repetition_penalty=1.0), token_ids)
        assert not torch.equal(off.completion_ids, shared.completion_ids)


def test_repeated_prompt_layer_is_repeat_then_concatenate_without_the_copies():
    torch.manual_seed(0)
    B, H, P, D, G = 2, 3, 4, 5, 3
    keys, values = torch.randn(B, H, P, D), torch.randn(B, H, P, D)
    reference = DynamicLayer()
    reference.update(keys, values)
    reference.batch_repeat_interleave(G)  # row b * G + g holds prompt b
    prompt = DynamicLayer()
    prompt.update(keys, values)
    layer = RepeatedPromptLayer.from_prompt(prompt, G, reserve=2)
    assert layer.key_buffer.shape == (B * G, H, P + 2, D)
    storage = layer.key_buffer.untyped_storage().data_ptr()
    for step in range(4):  # two decode steps inside the reserve, two past it
        new_keys, new_values = torch.randn(B * G, H, 1, D), torch.randn(B * G, H, 1, D)
        expected = reference.update(new_keys, new_values)
        got = layer.update(new_keys, new_values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert layer.get_seq_length() == P + step + 1 == got[0].shape[-2]
        # inside the reserve the step wrote in place: the keys are a view of the buffer, not a new copy
        assert (got[0].untyped_storage().data_ptr() == storage) == (step < 2)


def _rollout(policy, processor, prompt_batch):
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    torch.manual_seed(1)
    return generate_shared(policy, prompt_batch, processor.tokenizer,
                           SamplingSettings(num_generations=4, max_new_tokens=6), token_ids)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_logprobs_and_gradients_equal_the_full_forward(policy, processor, prompt_batch, lora):
    rollout = _rollout(policy, processor, prompt_batch)
    model = apply_lora(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]) if lora else policy
    model.train()
    # rows from every group, one group partial, in an order that interleaves groups (as replay produces)
    rows = [9, 0, 1, 2, 3, 5, 10, 11]
    params = [p for p in model.parameters() if p.requires_grad]
    full = completion_logps(model, rollout.model_inputs(rows))
    shared = completion_logps_shared(model, rollout, rows)
    assert torch.equal(full.mask, shared.mask)
    valid = full.mask.bool()
    assert_close(shared.logps[valid], full.logps[valid], rtol=0, atol=1e-5)
    weights = torch.randn(full.logps.shape, generator=torch.Generator().manual_seed(0))  # any downstream loss
    grads_full = torch.autograd.grad((full.logps * weights * full.mask).sum(), params)
    grads_shared = torch.autograd.grad((shared.logps * weights * shared.mask).sum(), params)
    for p, a, b in zip(params, grads_full, grads_shared):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-9, p.shape
    if not lora:  # the vision tower is trained through the cached prompt keys/values
        visual = dict(model.named_parameters())["model.visual.patch_embed.proj.weight"]
        index = params.index(visual)
        assert grads_shared[index].abs().sum() > 0


class OldLogps(GradientCapture, RolloutCallback):
    def __init__(self):
        super().__init__()
        self.old = None

    def on_rollout_scored(self, trainer, module, rollout):
        if self.old is None:
            self.old = rollout.old_logps[rollout.completion_mask.bool()]  # valid tokens only

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if not self.grads:  # the first step: both runs are at the same parameters
            super().on_before_optimizer_step(trainer, module, optimizer)


@pytest.mark.parametrize(
    "level, sampling",
    [("token", {}), ("sequence", {}), ("token", {"temperature": 0.3, "min_p": 0.3, "repetition_penalty": 1.3})],
    ids=["token", "sequence", "min-p-and-repetition-penalty"],
)
def test_a_training_step_is_the_same_with_and_without_sharing(tmp_path, tiny_model_dir, synthetic_parquet, level,
                                                              sampling):
    """Same samples, same old log-probs (teacher-forced pass), same first gradient, micro-batches splitting groups."""
    captures = []
    for shared in (False, True):
        capture = OldLogps()
        module = make_module(tiny_model_dir, rewards=("tests.test_module.text_length",),
                             loss=LossConfig(importance_sampling_level=level),
                             optim=OptimConfig(learning_rate=1e-2, num_iterations=2, micro_batch_size=6))
        module.rollout_cfg = RolloutConfig(num_generations=4, max_completion_length=3, shared_prompt=shared, **sampling)
        fit(tmp_path / f"{shared}", module, synthetic_parquet, tiny_model_dir, steps=1, callbacks=[capture])
        captures.append(capture)
    full, shared = captures
    assert_close(shared.old, full.old, rtol=0, atol=1e-5)
    assert full.grads.keys() == shared.grads.keys() and full.grads
    for name, grad in full.grads.items():
        assert (shared.grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-9, name


def test_gradient_checkpointing_falls_back_to_the_full_forward(tiny_model_dir):
    module = make_module(tiny_model_dir, policy=PolicyConfig(model_name_or_path=str(tiny_model_dir),
                                                             gradient_checkpointing=True))
    module.configure_model()
    assert not module.actor.shares_prompts_in_logps
    lora = make_module(tiny_model_dir, policy=PolicyConfig(model_name_or_path=str(tiny_model_dir),
                                                           lora=LoraSettings(r=2, alpha=4)))
    lora.configure_model()
    assert lora.actor.shares_prompts_in_logps
