"""The lean decode step samples exactly what the model's forward samples (``dapo_lightning/lean_decode.py``).

``generate_shared`` is run twice from the same seed, with ``lean_decode`` on and off: the same tokens, and at
every step the same next-token logits up to float rounding (the lean step fuses projections and splits the
attention into a shared-prompt part and a per-row part, so sums are taken in another order).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import dapo_lightning.rollout as rollout_module
from dapo_lightning.attention import SpecialTokens
from dapo_lightning.attention.recorders import DecodeRecorder
from dapo_lightning.lean_decode import LeanDecoder, lean_decoder_weights
from dapo_lightning.models import apply_lora
from dapo_lightning.rollout import SamplingSettings, TokenIds, generate_shared

LOGIT_TOLERANCE = {"rtol": 0, "atol": 1e-5}  # float32: the two paths differ by ~3e-7 on the tiny model


def decode(policy, processor, prompt_batch, settings, *, lean, seed=0, monkeypatch, **kwargs):
    """``generate_shared`` with a spy on ``sample_next``: the rollout, every step's raw logits, lean steps taken."""
    steps = {"logits": [], "lean": 0}
    sample_next, lean_step = rollout_module.sample_next, LeanDecoder.step

    def spy(logits, *args, **kw):
        steps["logits"].append(logits.clone())
        return sample_next(logits, *args, **kw)

    def counted(self, token, t):
        steps["lean"] += 1
        return lean_step(self, token, t)

    monkeypatch.setattr(rollout_module, "sample_next", spy)
    monkeypatch.setattr(LeanDecoder, "step", counted)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    torch.manual_seed(seed)
    rollout = generate_shared(policy, prompt_batch, processor.tokenizer, settings, token_ids, lean_decode=lean,
                              **kwargs)
    monkeypatch.undo()
    return rollout, steps


def assert_same_samples(policy, processor, prompt_batch, settings, monkeypatch, **kwargs):
    off, off_steps = decode(policy, processor, prompt_batch, settings, lean=False, monkeypatch=monkeypatch, **kwargs)
    on, on_steps = decode(policy, processor, prompt_batch, settings, lean=True, monkeypatch=monkeypatch, **kwargs)
    assert off_steps["lean"] == 0
    assert on_steps["lean"] == len(on_steps["logits"]) - 1 > 0  # every step after the prefill's ran lean
    assert torch.equal(on.completion_ids, off.completion_ids)
    assert torch.equal(on.completion_mask, off.completion_mask)
    assert len(on_steps["logits"]) == len(off_steps["logits"])
    for a, b in zip(on_steps["logits"], off_steps["logits"]):
        assert_close(a, b, **LOGIT_TOLERANCE)
    return on, on_steps


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(num_generations=4, max_new_tokens=10),
        SamplingSettings(num_generations=1, max_new_tokens=8, greedy=True),
        SamplingSettings(num_generations=3, max_new_tokens=8, temperature=0.3, repetition_penalty=1.3),
        SamplingSettings(num_generations=2, max_new_tokens=7, min_new_tokens=7),
        SamplingSettings(num_generations=8, max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9, min_p=0.1),
    ],
    ids=["sampled-G4", "greedy-G1", "repetition-penalty-G3", "min-tokens-G2", "warpers-G8"],
)
def test_lean_decode_samples_what_the_model_forward_samples(policy, processor, prompt_batch, settings, monkeypatch):
    policy.eval()
    rollout, _ = assert_same_samples(policy, processor, prompt_batch, settings, monkeypatch)
    if settings.min_new_tokens:
        assert (rollout.completion_mask.sum(-1) == settings.min_new_tokens).all()


def test_one_lean_step_is_the_model_forward_on_the_repeated_cache(policy, processor, prompt_batch):
    """The first decode step, by hand: the model's forward on the repeated prompt cache gives the same logits."""
    from transformers import DynamicCache

    policy.eval()
    G = 2
    inputs = prompt_batch.model_inputs(torch.float32)
    next_position = rollout_module.prompt_next_position(policy, prompt_batch)  # [B]
    with torch.no_grad():
        cache = DynamicCache(config=policy.config)
        policy(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        lean = LeanDecoder(lean_decoder_weights(policy), cache, prompt_batch.attention_mask, next_position, G, steps=3)
        token = torch.arange(len(prompt_batch) * G) + 5  # [N] any ids
        got = lean.step(token, 0)  # [N, V]
        cache.batch_repeat_interleave(G)
        mask = torch.cat([prompt_batch.attention_mask, torch.ones(len(prompt_batch), 1, dtype=torch.long)], 1)
        expected = policy(input_ids=token.unsqueeze(-1), attention_mask=mask.repeat_interleave(G, 0),
                          position_ids=next_position.repeat_interleave(G).view(1, -1, 1).expand(3, -1, 1),
                          cache=cache, use_cache=True).logits[:, -1]
    assert got.shape == expected.shape == (len(prompt_batch) * G, policy.config.text_config.vocab_size)
    assert_close(got, expected, **LOGIT_TOLERANCE)


@pytest.mark.parametrize("G", [1, 4])
def test_the_fast_step_is_the_general_step(policy, processor, prompt_batch, G):
    """Float32's step (norm weights folded, complex rotary on reordered channels, oneDNN's prepacked projections where
    available) gives the logits of the step other dtypes run, over prompts with left padding, at every step."""
    from transformers import DynamicCache

    policy.eval()
    inputs = prompt_batch.model_inputs(torch.float32)
    next_position = rollout_module.prompt_next_position(policy, prompt_batch)  # [B]
    tokens = torch.randint(0, policy.config.text_config.vocab_size, (5, len(prompt_batch) * G),
                           generator=torch.Generator().manual_seed(0))  # [steps, N]
    with torch.no_grad():
        cache = DynamicCache(config=policy.config)
        policy(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        weights = lean_decoder_weights(policy)
        fast, general = (LeanDecoder(weights, cache, prompt_batch.attention_mask, next_position, G, steps=5, fast=f)
                         for f in (True, False))
        assert fast.fast and not general.fast and fast.bias is not None  # the fixture's prompts are padded
        for t, token in enumerate(tokens):
            assert_close(fast.step(token, t), general.step(token, t), **LOGIT_TOLERANCE)


def test_without_onednn_the_fast_step_runs_on_plain_matrix_products(policy, processor, prompt_batch, monkeypatch):
    """A torch build without oneDNN's private linear (``_packed_linear`` -> None) gets ``addmm`` on the same folded
    weights: the same logits as the general step."""
    import dapo_lightning.lean_decode as lean_decode
    from transformers import DynamicCache

    monkeypatch.setattr(lean_decode, "_packed_linear", lambda weight, rows: None)
    policy.eval()
    G = 3
    next_position = rollout_module.prompt_next_position(policy, prompt_batch)  # [B]
    tokens = torch.randint(0, policy.config.text_config.vocab_size, (4, len(prompt_batch) * G),
                           generator=torch.Generator().manual_seed(1))  # [steps, N]
    with torch.no_grad():
        cache = DynamicCache(config=policy.config)
        policy(**prompt_batch.model_inputs(torch.float32), cache=cache, use_cache=True, logits_to_keep=1)
        weights = lean_decoder_weights(policy)
        fast, general = (LeanDecoder(weights, cache, prompt_batch.attention_mask, next_position, G, steps=4, fast=f)
                         for f in (True, False))
        assert fast.fast and fast.linear is lean_decode._addmm_linear
        for t, token in enumerate(tokens):
            assert_close(fast.step(token, t), general.step(token, t), **LOGIT_TOLERANCE)


def test_lean_decode_under_lora(policy, processor, prompt_batch, monkeypatch):
    model = apply_lora(policy, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    torch.manual_seed(5)
    for name, parameter in model.named_parameters():  # peft starts B at 0 (no change); make the adapters count
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.5)
    model.eval()
    settings = SamplingSettings(num_generations=4, max_new_tokens=8)
    on, _ = assert_same_samples(model, processor, prompt_batch, settings, monkeypatch)
    with model.disable_adapter():  # the adapters changed the samples (so the fold was exercised)
        plain, _ = decode(model, processor, prompt_batch, settings, lean=True, monkeypatch=monkeypatch)
    assert not torch.equal(plain.completion_ids, on.completion_ids)


def test_attention_capture_during_decoding_runs_the_model_forward(policy, processor, prompt_batch, monkeypatch):
    """While a recorder is installed the decoder calls the model: the statistics are its kernels', bit for bit."""
    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    settings = SamplingSettings(num_generations=4, max_new_tokens=9)
    policy.eval()
    captured = []
    for lean in (False, True):
        recorder = DecodeRecorder(policy, special, len(prompt_batch) * 4, settings.max_new_tokens, layers=[1],
                                  flush_steps=3)
        with torch.no_grad(), recorder:
            assert lean_decoder_weights(policy) is None  # the hook is installed: no lean step
            recorder.before_generation(prompt_batch, 4)
            rollout, steps = decode(policy, processor, prompt_batch, settings, lean=lean, monkeypatch=monkeypatch,
                                    on_decode_step=recorder.before_decode_step)
        captured.append((rollout, recorder.finish(rollout), steps))
    assert lean_decoder_weights(policy) is not None  # the hook is gone: the lean step again
    (off, off_captured, _), (on, on_captured, on_steps) = captured
    assert on_steps["lean"] == 0 and torch.equal(on.completion_ids, off.completion_ids)
    assert on_captured.captured[1].all() and not on_captured.captured[0].any() and on_captured.rows.any()  # layer 1
    assert torch.equal(on_captured.text, off_captured.text) and torch.equal(on_captured.vision, off_captured.vision)
    # and the samples are those of the lean decoder without a capture
    plain, plain_steps = decode(policy, processor, prompt_batch, settings, lean=True, monkeypatch=monkeypatch)
    assert plain_steps["lean"] > 0 and torch.equal(plain.completion_ids, on.completion_ids)


def test_lockstep_on_one_process(policy, processor, prompt_batch, monkeypatch):
    """``lockstep`` without a process group: the process is its own busiest one, the samples are unchanged."""
    policy.eval()
    settings = SamplingSettings(num_generations=4, max_new_tokens=10)
    lockstep, _ = assert_same_samples(policy, processor, prompt_batch, settings, monkeypatch, lockstep=True)
    alone, _ = decode(policy, processor, prompt_batch, settings, lean=True, monkeypatch=monkeypatch)
    assert torch.equal(lockstep.completion_ids, alone.completion_ids)


class UnknownMLP(nn.Module):
    """An MLP class the lean step does not know (same arithmetic as Qwen2MLP)."""

    def __init__(self, mlp):
        super().__init__()
        self.inner = mlp

    def forward(self, x):
        return self.inner(x)


def test_unknown_architectures_fall_back_to_the_model_forward(policy, processor, prompt_batch, monkeypatch):
    policy.eval()
    assert lean_decoder_weights(policy) is not None
    settings = SamplingSettings(num_generations=2, max_new_tokens=5)
    reference, _ = decode(policy, processor, prompt_batch, settings, lean=True, monkeypatch=monkeypatch)
    layer = policy.model.language_model.layers[0]
    layer.mlp = UnknownMLP(layer.mlp)
    assert lean_decoder_weights(policy) is None
    forwards = []
    handle = policy.register_forward_pre_hook(lambda module, args: forwards.append(1))
    rollout, steps = decode(policy, processor, prompt_batch, settings, lean=True, monkeypatch=monkeypatch)
    handle.remove()
    assert steps["lean"] == 0 and len(forwards) == settings.max_new_tokens  # a prefill, then max_new_tokens - 1 steps
    assert torch.equal(rollout.completion_ids, reference.completion_ids)


def test_what_the_lean_step_refuses(policy):
    """Train mode (dropout), forward hooks (ZeRO-3 gathers, profilers), sharded parameters, other rotary types."""
    policy.eval()
    assert lean_decoder_weights(policy) is not None
    policy.train()
    assert lean_decoder_weights(policy) is None
    policy.eval()
    handle = policy.model.language_model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: None)
    assert lean_decoder_weights(policy) is None
    handle.remove()
    parameter = policy.model.language_model.layers[0].mlp.up_proj.weight
    parameter.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    assert lean_decoder_weights(policy) is None
    del parameter.ds_id
    text_config = policy.model.language_model.config
    saved = text_config.rope_parameters
    text_config.rope_parameters = {**saved, "rope_type": "yarn"}
    assert lean_decoder_weights(policy) is None
    text_config.rope_parameters = saved
    assert lean_decoder_weights(policy) is not None
