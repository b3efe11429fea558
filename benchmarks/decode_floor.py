"""The decode floor of a benchmark shape: a hand-written, compiled decode step on the same weights (issue 15).

What a decode step must cost at least, as this machine runs it: the text decoder's arithmetic for the N = B * G
rows, one token each, written by hand (q/k/v and gate/up fused, rotary prepared once for the rollout, a static
cache of each row's prompt and completion keys with a fixed length, so every step has the same shapes) and compiled
with ``torch.compile`` (``fullgraph``, static shapes: one graph for every step). The prompt cache comes from the
model's own prefill of the shape's first prompt(s), repeated G times; the tokens fed are fixed random ids (the
forward's cost does not depend on them). ``measure_floor`` times ``repeats`` rollouts of T - 1 such steps
(compilation and a warm-up rollout excluded) and the same step eager, for reference.

It is the same plain attention that a static cache gives ``transformers``' forward (every row reads its own
copy of the prompt's keys, over the full P + T positions, future ones masked): the floor of the step that stock
decoders run. This project's lean step (``dapo_lightning/lean_decode.py``) reads each group's prompt keys once
and only the completion keys filled so far, so it can go below this floor where attention matters (long prompts).
"""

from __future__ import annotations

import math
import statistics
import time


def measure_floor(folder: str, system_prompt: str, rows: list[dict], generations: int, completion_length: int,
                  dtype: str, device: str, threads: int, repeats: int = 3) -> dict:
    """Seconds per rollout (T - 1 decode steps of B * G rows) of the compiled and the eager hand-written step."""
    import torch

    torch.set_num_threads(threads)
    from benchmarks.bench_setup import decode as decode_image
    from dapo_lightning.data import example_prompt_batch
    from dapo_lightning.lean_decode import lean_decoder_weights
    from dapo_lightning.models import load_policy, load_processor
    from dapo_lightning.rollout import base_model, prompt_next_position
    from transformers import DynamicCache

    processor = load_processor(folder)
    model = load_policy(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    weights = lean_decoder_weights(model)
    if weights is None:
        raise ValueError(f"{folder}: not a model the hand-written step knows")
    prompts = example_prompt_batch(processor, [{**row, "image": decode_image(row["image"])} for row in rows],
                                   system_prompt=system_prompt).to(device)
    B, P = prompts.input_ids.shape
    G, T = generations, completion_length
    N, steps, S = B * G, max(T - 1, 1), P + T
    H, Hkv, d = weights.num_heads, weights.num_kv_heads, weights.head_dim
    with torch.no_grad():
        cache = DynamicCache(config=base_model(model).config)
        model(**prompts.model_inputs(next(model.parameters()).dtype), cache=cache, use_cache=True, logits_to_keep=1)
        next_position = prompt_next_position(base_model(model), prompts).repeat_interleave(G)  # [N]
    param_dtype = weights.embed.dtype

    def fresh_cache():
        keys, values = [], []
        for layer in cache.layers:
            k = layer.keys.new_zeros(N, Hkv, S, d)  # [N, Hkv, P + T, d]: each row its own prompt copy
            v = layer.values.new_zeros(N, Hkv, S, d)
            k[:, :, :P] = layer.keys.repeat_interleave(G, dim=0)
            v[:, :, :P] = layer.values.repeat_interleave(G, dim=0)
            keys.append(k)
            values.append(v)
        bias = torch.full((N, 1, 1, S), -math.inf, dtype=param_dtype, device=device)  # [N, 1, 1, S]
        bias[..., :P] = torch.zeros(N, P, dtype=param_dtype, device=device).masked_fill(
            prompts.attention_mask.repeat_interleave(G, dim=0) == 0, -math.inf)[:, None, None, :]
        return keys, values, bias

    positions = next_position[None, :] + torch.arange(steps, device=device)[:, None]  # [steps, N]
    freqs = positions[..., None].float() * weights.inv_freq.to(device)  # [steps, N, d / 2]
    angles = torch.cat([freqs, freqs], dim=-1)
    cos = (angles.cos() * weights.rope_scaling).to(param_dtype).unsqueeze(2)  # [steps, N, 1, d]
    sin = (angles.sin() * weights.rope_scaling).to(param_dtype).unsqueeze(2)
    tokens = torch.randint(0, weights.embed.shape[0], (steps, N), generator=torch.Generator().manual_seed(0)).to(device)
    rep = H // Hkv

    def rms(x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + weights.eps)).to(x.dtype)

    def rotate(x, c, s):  # x [N, h, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    def step(token, index, c, s, keys, values, bias):
        """One token per row at cache column ``index`` (a 1-element tensor: the same graph every step). -> [N, V]"""
        bias.index_fill_(-1, index, 0.0)
        hidden = torch.nn.functional.embedding(token, weights.embed)  # [N, D]
        for layer, k_cache, v_cache in zip(weights.layers, keys, values):
            x = rms(hidden, layer.input_norm)
            qkv = torch.nn.functional.linear(x, layer.qkv, layer.qkv_bias)  # [N, (H + 2 Hkv) d]
            q = rotate(qkv[:, : H * d].view(N, H, d), c, s)
            k = rotate(qkv[:, H * d : (H + Hkv) * d].view(N, Hkv, d), c, s)
            v = qkv[:, (H + Hkv) * d :].view(N, Hkv, d)
            k_cache.index_copy_(2, index, k.unsqueeze(2))
            v_cache.index_copy_(2, index, v.unsqueeze(2))
            scores = torch.matmul(q.view(N, Hkv, rep, d), k_cache.transpose(-1, -2)) * weights.scale + bias
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [N, Hkv, rep, S]
            hidden = hidden + torch.matmul(probs, v_cache).reshape(N, H * d) @ layer.out.t()
            gate, up = torch.nn.functional.linear(rms(hidden, layer.post_norm), layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + (torch.nn.functional.silu(gate) * up) @ layer.down.t()
        return torch.nn.functional.linear(rms(hidden, weights.norm), weights.lm_head)

    def rollout(fn) -> float:
        keys, values, bias = fresh_cache()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for t in range(steps):
            index = torch.tensor([P + t], device=device)
            fn(tokens[t], index, cos[t], sin[t], keys, values, bias)
        sync()
        return time.perf_counter() - start

    result = {"rows": N, "steps": steps, "prompt_tokens": P}
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        started = time.perf_counter()
        rollout(compiled)  # compiles, then a warm rollout
        result["compile_seconds"] = time.perf_counter() - started
        for name, fn in (("eager", step), ("compiled", compiled)):
            rollout(fn)
            times = [rollout(fn) for _ in range(repeats)]
            result[name] = {"min": min(times), "median": statistics.median(times), "seconds": times}
    return result
