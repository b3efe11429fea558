"""The capture equals attention computed the slow ways (SPEC 3), keeps the fast kernel and bounds its memory.

(1) Against a brute-force computation from a plain eager forward with ``output_attentions=True``
    (every layer, every head, full matrices): relative error <= 1e-5 in float32.
(2) Against the original system's collection, rows taken step by step from
    ``generate(output_attentions=True, return_dict_in_generate=True)`` on the same sampled completion: within 1e-4.
(3) ``attention_mass``, the one mass computation, against a brute-force softmax on random tensors.
"""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.modeling_utils import AttentionInterface

from dapo_lightning.attention import (
    CapturedAttention,
    DecodeRecorder,
    SpecialTokens,
    TeacherForcedRecorder,
    attention_report,
    first_real_position,
    generation_step_masses,
    modality_masks,
)
from dapo_lightning.attention.capture import _KernelConfig, decoder_attention_modules
from dapo_lightning.batch import RolloutBatch
from dapo_lightning.logprobs import completion_logps, completion_logps_shared
from dapo_lightning.models import load_policy
from dapo_lightning.rollout import SamplingSettings, TokenIds, completion_mask_from_eos, generate

CHUNKS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # micro-batches that mix groups of different prompt lengths


@pytest.fixture()
def rollout(policy, processor, prompt_batch):
    torch.manual_seed(0)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    out = generate(
        policy.eval(),
        prompt_batch,
        processor.tokenizer,
        SamplingSettings(num_generations=4, max_new_tokens=10),
        token_ids,
    )
    lengths = out.completion_lengths.tolist()
    assert len(set(lengths)) > 1 and min(lengths) >= 1, lengths  # right padding is exercised too
    return out


def capture(policy, special, rollout, *, chunks=CHUNKS, shared=False, **kwargs) -> CapturedAttention:
    """What Actor.teacher_forced does: one pass per row chunk inside the recorder, then ``finish``.

    ``shared``: the pass runs each prompt once and the completions from its cache
    (``completion_logps_shared``), as the module does by default.
    """
    finished = []
    recorder = TeacherForcedRecorder(policy, special, rollout.num_rows, rollout.completion_ids.shape[1],
                                     on_finish=lambda r, captured: finished.append((r, captured)), **kwargs)
    with torch.no_grad(), recorder:
        for rows in chunks:
            inputs = rollout.model_inputs(rows)
            recorder.before_chunk(rows, inputs)
            if shared:
                completion_logps_shared(policy, rollout, rows)
            else:
                completion_logps(policy, inputs)
    result = recorder.finish(rollout)
    assert finished == [(rollout, result)]  # handed to whoever asked for the recorder
    return result


def brute_force(eager, special, rollout, variant):
    """Per layer and generation row, from full [H, S, S] attention matrices of every layer, in float64."""
    L = eager.config.text_config.num_hidden_layers
    N, T = rollout.completion_ids.shape
    text = torch.zeros(L, N, T - 1, dtype=torch.float64)
    vision = torch.zeros(L, N, T - 1, dtype=torch.float64)
    for rows in CHUNKS:
        inputs = rollout.model_inputs(rows)
        width = inputs["completion_ids"].shape[1]
        model_args = {k: v for k, v in inputs.items() if k not in ("completion_ids", "completion_mask")}
        with torch.no_grad():
            attentions = eager(**model_args, output_attentions=True).attentions  # L x [n, H, S, S]
        P = model_args["input_ids"].shape[1] - width
        masks = modality_masks(model_args["input_ids"][:, :P], model_args["attention_mask"][:, :P], special)
        for k, i in enumerate(rows):
            C = int(inputs["completion_mask"][k].sum())
            sink = int(first_real_position(model_args["attention_mask"][k : k + 1])[0])
            t_mask, v_mask = masks.text[k].double(), masks.vision[k].double()
            for layer, matrix in enumerate(attentions):
                g = matrix[k].double()[:, P : P + C - 1, :P].clone()  # [H, C - 1, P] generation rows, prompt keys
                g[:, :, sink] = 0.0
                if variant == "original":
                    g = g.mean(0)
                    g = g / g.sum(-1, keepdim=True)
                    t, v = g @ t_mask, g @ v_mask
                else:
                    t, v = g @ t_mask, g @ v_mask  # [H, C - 1]
                    t, v = (t / (t + v)).mean(0), (v / (t + v)).mean(0)
                text[layer, i, : C - 1] = t
                vision[layer, i, : C - 1] = v
    return text, vision


@pytest.mark.parametrize("shared", [False, True], ids=["full-forward", "shared-prompt"])
@pytest.mark.parametrize("variant", ["original", "paper"])
@pytest.mark.parametrize("chunk_elements", [2**22, 300])  # 300: several head and query-row chunks per layer
def test_capture_equals_brute_force_full_attention(policy, processor, rollout, tiny_model_dir, variant, chunk_elements,
                                                   shared):
    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    got = capture(policy.eval(), special, rollout, variant=variant, chunk_elements=chunk_elements, shared=shared)
    eager = load_policy(str(tiny_model_dir), attn_implementation="eager").eval()
    text, vision = brute_force(eager, special, rollout, variant)
    assert got.text.shape == (2, 12, rollout.completion_ids.shape[1] - 1)  # [L, N, T - 1]
    assert got.captured.all()
    assert_close(got.text.double(), text, rtol=1e-5, atol=1e-8)
    assert_close(got.vision.double(), vision, rtol=1e-5, atol=1e-8)
    # and the per-row metrics that come out of them
    expected = attention_report(
        CapturedAttention(text.float(), vision.float(), got.rows, got.num_text, got.num_vision, got.captured, variant)
    )
    report = attention_report(got)
    for segment in ("late", "all"):
        for metric in ("vgr", "aei_text", "aei_vision", "vision_ratio"):
            assert_close(
                getattr(report.segments[segment], metric),
                getattr(expected.segments[segment], metric),
                rtol=1e-5,
                atol=0,
            )


def test_capture_equals_the_original_collection_from_generate(policy, processor, prompt_batch, tiny_model_dir):
    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    eager = load_policy(str(tiny_model_dir), attn_implementation="eager").eval()
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, eager.generation_config)
    torch.manual_seed(1)
    G = 4
    with torch.no_grad():
        out = eager.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            pixel_values=prompt_batch.pixel_values,
            image_grid_thw=prompt_batch.image_grid_thw,
            mm_token_type_ids=prompt_batch.mm_token_type_ids,
            do_sample=True,
            max_new_tokens=10,
            num_return_sequences=G,
            eos_token_id=list(token_ids.eos),
            pad_token_id=token_ids.pad,
            suppress_tokens=list(token_ids.suppress),
            output_attentions=True,
            return_dict_in_generate=True,
        )
    P = prompt_batch.input_ids.shape[1]
    completion = out.sequences[:, P:]  # [N, T]
    mask, _ = completion_mask_from_eos(completion, token_ids.eos)
    completion = completion.masked_fill(mask == 0, token_ids.pad)
    prompt_mask = prompt_batch.attention_mask.repeat_interleave(G, 0)  # [N, P]
    masks = modality_masks(prompt_batch.input_ids.repeat_interleave(G, 0), prompt_mask, special)
    ref_text, ref_vision = generation_step_masses(out.attentions, prompt_mask, mask, masks)

    rollout = RolloutBatch(
        prompts=prompt_batch,
        num_generations=G,
        completion_ids=completion,
        completion_mask=mask,
        completions=[""] * completion.shape[0],
    )
    assert len(set(rollout.completion_lengths.tolist())) > 1
    got = capture(policy.eval(), special, rollout)  # the sdpa policy, teacher-forced, in micro-batches
    assert_close(got.text, ref_text, rtol=1e-4, atol=1e-6)
    assert_close(got.vision, ref_vision, rtol=1e-4, atol=1e-6)
    assert_close(got.num_vision, masks.num_vision)
    assert_close(got.num_text, masks.num_text)


def test_the_fast_kernel_still_runs_and_untouched_layers_are_not_computed(policy, processor, rollout, monkeypatch):
    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    policy.eval()
    sdpa = AttentionInterface._global_mapping["sdpa"]
    calls = []

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "Qwen2_5_VLAttention":
            calls.append(("sdpa", module.layer_idx))
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    for module in decoder_attention_modules(policy):  # which kernel each layer asks for when it runs
        module.register_forward_pre_hook(
            lambda m, args: calls.append(("capture" if isinstance(m.config, _KernelConfig) else "own", m.layer_idx))
        )
    with torch.no_grad():
        plain = completion_logps(policy, rollout.model_inputs(CHUNKS[0])).logps
    got = None
    recorder = TeacherForcedRecorder(policy, special, rollout.num_rows, rollout.completion_ids.shape[1], layers=[1])
    calls.clear()
    with torch.no_grad(), recorder:
        inputs = rollout.model_inputs(CHUNKS[0])
        recorder.before_chunk(CHUNKS[0], inputs)
        got = completion_logps(policy, inputs).logps
    result = recorder.finish(rollout)
    # both layers ran sdpa once; layer 1 through the capture (its config names the capture kernel), layer 0 as usual
    assert calls == [("own", 0), ("sdpa", 0), ("capture", 1), ("sdpa", 1)]
    assert torch.equal(got, plain)  # the forward's output is untouched
    assert result.captured[:, :4].tolist() == [[False] * 4, [True] * 4]
    assert (result.text[0] == 0).all()  # layer 0: no statistics computed
    # on exit the modules are as they were
    for module in decoder_attention_modules(policy):
        assert not isinstance(module.config, _KernelConfig) and not hasattr(module, "_dapo_attention_capture")


def test_scores_are_computed_in_bounded_chunks(policy, processor, rollout, monkeypatch):
    import dapo_lightning.attention.capture as capture_module

    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    sizes = []
    fused = capture_module.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        sizes.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])  # scores of this chunk: n * h * r * S
        return fused(q, k, v, **kwargs)

    monkeypatch.setattr(capture_module, "scaled_dot_product_attention", spy)
    got = capture(policy.eval(), special, rollout, chunks=[CHUNKS[0]], chunk_elements=300)
    inputs = rollout.model_inputs(CHUNKS[0])
    n, S = inputs["input_ids"].shape
    R = inputs["completion_ids"].shape[1] - 1
    # each chunk covers at most max(budget, one query row of every row) scores, never a whole [n, H, R, S] slice
    assert sizes and max(sizes) <= max(300, n * S) < n * 4 * R * S
    assert sum(sizes) == 2 * n * 4 * R * S  # together: every head and generation row of both layers, once
    # what is kept: two floats per layer, row and generation row
    assert got.text.shape == got.vision.shape == (2, rollout.num_rows, rollout.completion_ids.shape[1] - 1)


def test_a_second_capture_on_the_same_model_is_refused(policy, processor, rollout):
    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    first = TeacherForcedRecorder(policy, special, rollout.num_rows, rollout.completion_ids.shape[1])
    with first:
        with pytest.raises(RuntimeError, match="already active"):
            with DecodeRecorder(policy, special, rollout.num_rows, rollout.completion_ids.shape[1]):
                pass
    for module in decoder_attention_modules(policy):
        assert not isinstance(module.config, _KernelConfig)


@pytest.mark.parametrize("flush", [32, 3], ids=["one-reduction", "reduced-every-3-steps"])
@pytest.mark.parametrize("variant", ["original", "paper"])
def test_capture_during_generation_equals_brute_force(policy, processor, prompt_batch, tiny_model_dir, variant,
                                                      flush):
    """The decode steps' own queries (no second forward) give the same statistics as full attention matrices."""
    from dapo_lightning.rollout import generate_shared

    special = SpecialTokens.from_tokenizer(processor.tokenizer)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    settings = SamplingSettings(num_generations=4, max_new_tokens=10)
    policy.eval()
    recorder = DecodeRecorder(policy, special, len(prompt_batch) * 4, settings.max_new_tokens, variant=variant,
                              flush_steps=flush)
    torch.manual_seed(0)
    with torch.no_grad(), recorder:
        recorder.before_generation(prompt_batch, 4)
        rollout = generate_shared(policy, prompt_batch, processor.tokenizer, settings, token_ids,
                                  on_decode_step=recorder.before_decode_step)
    got = recorder.finish(rollout)
    assert len(set(rollout.completion_lengths.tolist())) > 1  # rows end at different steps
    eager = load_policy(str(tiny_model_dir), attn_implementation="eager").eval()
    text, vision = brute_force(eager, special, rollout, variant)
    assert got.text.shape == text.shape
    assert torch.equal(got.rows, torch.arange(text.shape[2])[None, :] < rollout.completion_lengths[:, None] - 1)
    assert_close(got.text.double(), text, rtol=1e-5, atol=1e-7)
    assert_close(got.vision.double(), vision, rtol=1e-5, atol=1e-7)


def _brute_force_mass(query, key, indicators, key_valid, first_query, first_position, count, scale, sliding_window,
                      variant):
    """Full softmax in float64, query by query: SPEC 3's sink-zeroed, renormalised head average (or per-head shares)."""
    n, H, _, d = query.shape
    groups = H // key.shape[1]
    keys = key.double().repeat_interleave(groups, dim=1)  # [n, H, S, d]
    S, P = keys.shape[2], indicators.shape[1]
    sets = torch.zeros(n, S, 3, dtype=torch.float64)
    sets[:, :P] = indicators.double()
    text, vision = torch.zeros(n, count, dtype=torch.float64), torch.zeros(n, count, dtype=torch.float64)
    for r in range(count):
        position = first_position + r
        allowed = (torch.arange(S) <= position) & key_valid[:, :S]  # [n, S]
        if sliding_window is not None:
            allowed &= torch.arange(S) > position - sliding_window
        scores = (query[:, :, first_query + r].double().unsqueeze(2) @ keys.transpose(-1, -2)).squeeze(2) * scale
        attention = scores.masked_fill(~allowed[:, None], -math.inf).softmax(-1)  # [n, H, S]
        if variant == "original":
            g = attention.mean(1)  # [n, S] head average
            kept, t, v = (g.unsqueeze(-1) * sets).sum(1).unbind(-1)  # [n] each
            text[:, r], vision[:, r] = t / kept, v / kept  # renormalised over the kept prompt keys
        else:
            t = torch.einsum("nhs,ns->nh", attention, sets[..., 1])  # [n, H] each head's mass on text keys
            v = torch.einsum("nhs,ns->nh", attention, sets[..., 2])
            text[:, r], vision[:, r] = (t / (t + v)).mean(1), (v / (t + v)).mean(1)
    return text, vision


@pytest.mark.parametrize("variant", ["original", "paper"])
@pytest.mark.parametrize("chunk_elements, sliding_window", [(2**22, None), (20, None), (2**22, 4)],
                         ids=["one-chunk", "chunked", "sliding-window"])
def test_attention_mass_equals_a_brute_force_softmax(variant, chunk_elements, sliding_window):
    from dapo_lightning.attention import attention_mass

    torch.manual_seed(0)
    n, H, H_kv, d, P, T = 2, 4, 2, 8, 5, 4  # grouped keys: two query heads per key head
    S = P + T
    query, key = torch.randn(n, H, S, d), torch.randn(n, H_kv, S, d)  # a full forward over prompt + completion
    key_valid = torch.ones(n, S, dtype=torch.bool)
    key_valid[1, 0] = False  # row 1 is left-padded by one column
    kept = key_valid[:, :P].clone()
    kept[0, 0], kept[1, 1] = False, False  # the sinks: each row's first real column
    text_keys = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool) & kept
    vision_keys = torch.tensor([[0, 0, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool) & kept
    indicators = torch.stack([kept, text_keys, vision_keys], dim=-1).float()  # [n, P, 3]
    # generation rows 1 .. 2 (queries at columns P + 1, P + 2) of the block of completion queries
    text, vision = attention_mass(query, key, indicators, key_valid, first_query=P + 1, first_position=P + 1,
                                  count=2, scaling=0.3, sliding_window=sliding_window, variant=variant,
                                  chunk_elements=chunk_elements)
    assert text.shape == vision.shape == (n, 2)  # [n, count]
    expected = _brute_force_mass(query, key, indicators, key_valid, P + 1, P + 1, 2, 0.3, sliding_window, variant)
    assert_close(text.double(), expected[0], rtol=1e-5, atol=1e-7)
    assert_close(vision.double(), expected[1], rtol=1e-5, atol=1e-7)
    # the same queries given as a block of their own (as the shared-prompt pass and the decode steps give them)
    alone = attention_mass(query[:, :, P + 1 : P + 3], key, indicators, key_valid, first_query=0,
                           first_position=P + 1, count=2, scaling=0.3, sliding_window=sliding_window,
                           variant=variant, chunk_elements=chunk_elements)
    assert_close(alone[0], text)
    assert_close(alone[1], vision)
