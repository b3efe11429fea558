"""Shared-prefix attention equals plain attention over each row's repeated prompt + its own keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention
from torch.testing import assert_close

from dapo_lightning.attention.shared_prefix import (
    combine_partials,
    padding_bias,
    partial_attention,
    shared_prefix_attention,
)


def test_a_hand_worked_case():
    """One group, one row, one head, d = 1, scale 1: prompt keys [0, ln 2] (the first padded), completion key [ln 3].

    Kept scores: ln 2 (value 10) and ln 3 (value 20); softmax weights 2/5 and 3/5: 0.4 * 10 + 0.6 * 20 = 16.
    The padded key (value 1000) gets no weight.
    """
    query = torch.ones(1, 1, 1, 1, 1)  # [B, Hkv, G, R, d]
    prefix_key = torch.tensor([0.0, math.log(2)]).view(1, 1, 2, 1)  # [B, Hkv, P, d]
    prefix_value = torch.tensor([1000.0, 10.0]).view(1, 1, 2, 1)
    bias = padding_bias(torch.tensor([[0, 1]]), torch.float32)  # [B, P]
    assert bias.tolist() == [[-math.inf, 0.0]]
    suffix_key = torch.tensor([math.log(3)]).view(1, 1, 1, 1, 1)  # [B, Hkv, G, S, d]
    suffix_value = torch.tensor([20.0]).view(1, 1, 1, 1, 1)
    out = shared_prefix_attention(query, prefix_key, prefix_value, bias.view(1, 1, 1, 1, 2), suffix_key, suffix_value,
                                  None, scale=1.0)
    assert out.shape == (1, 1, 1, 1, 1)
    assert_close(out.flatten(), torch.tensor([16.0]))
    # the same by the two partials: prompt part 10 with lse ln 2, completion part 20 with lse ln 3
    a, lse_a = partial_attention(query, prefix_key.unsqueeze(2), prefix_value.unsqueeze(2), bias.view(1, 1, 1, 1, 2), 1.0)
    b, lse_b = partial_attention(query, suffix_key, suffix_value, None, 1.0)
    assert_close(a.flatten(), torch.tensor([10.0]))
    assert_close(lse_a.flatten(), torch.tensor([math.log(2)]))
    assert_close(lse_b.flatten(), torch.tensor([math.log(3)]))
    assert_close(combine_partials(a, lse_a, b, lse_b).flatten(), torch.tensor([16.0]))


def test_a_fully_masked_partial_weighs_nothing():
    query, key, value = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)  # [.., R, d], [.., K, d]
    masked, lse = partial_attention(query, key, value, torch.full((5,), -math.inf), 0.5)
    assert torch.equal(masked, torch.zeros(2, 3, 4)) and (lse == -math.inf).all()
    other, lse_other = partial_attention(query, key, value, None, 0.5)
    assert_close(combine_partials(masked, lse, other, lse_other), other)


def plain_attention(query, prefix_key, prefix_value, prompt_mask, suffix_key, suffix_value, suffix_allowed, scale):
    """The reference: each row's prompt keys repeated, concatenated with its own, sdpa with GQA expanded. [B, Hkv, G, R, d]"""
    B, Hkv, G, R, d = query.shape
    P, S = prefix_key.shape[2], suffix_key.shape[3]
    keys = torch.cat([prefix_key.unsqueeze(2).expand(B, Hkv, G, P, d), suffix_key], dim=3)  # [B, Hkv, G, P + S, d]
    values = torch.cat([prefix_value.unsqueeze(2).expand(B, Hkv, G, P, d), suffix_value], dim=3)
    allowed = torch.cat([prompt_mask.bool().view(B, 1, 1, 1, P).expand(B, Hkv, G, R, P),
                         suffix_allowed.expand(B, Hkv, G, R, S)], dim=-1)  # [B, Hkv, G, R, P + S]
    # rows as the batch, key-value heads x R queries as heads: [B G, Hkv R, 1, d] against [B G, Hkv, ...] keys
    q = query.transpose(1, 2).reshape(B * G, Hkv, R, d)
    k = keys.transpose(1, 2).reshape(B * G, Hkv, P + S, d)
    v = values.transpose(1, 2).reshape(B * G, Hkv, P + S, d)
    mask = allowed.transpose(1, 2).reshape(B * G, Hkv, R, P + S)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B G, Hkv, R, d]
    return out.view(B, G, Hkv, R, d).transpose(1, 2)


@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("heads, kv_heads, tokens", [(4, 4, 1), (8, 2, 1), (6, 2, 3)],
                         ids=["MHA-decode", "GQA-decode", "GQA-3-queries-causal"])
def test_equal_to_plain_attention(G, heads, kv_heads, tokens):
    """Left-padded prompts of different lengths, GQA (R = query heads per key-value head x query tokens), causal suffix."""
    torch.manual_seed(G * 100 + heads)
    B, P, S, d = 3, 7, 5, 8
    rep = heads // kv_heads
    R = rep * tokens
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :3] = 0  # left padding
    prompt_mask[2, :1] = 0
    query = torch.randn(B, kv_heads, G, R, d)
    prefix_key, prefix_value = torch.randn(B, kv_heads, P, d), torch.randn(B, kv_heads, P, d)
    suffix_key, suffix_value = torch.randn(B, kv_heads, G, S, d), torch.randn(B, kv_heads, G, S, d)
    # query token i (of `tokens`) sits at completion position S - tokens + i: it sees suffix keys up to there
    position = (S - tokens + torch.arange(tokens)).repeat(rep)  # [R]: R = rep x tokens, head-major
    suffix_allowed = torch.arange(S)[None, :] <= position[:, None]  # [R, S]
    suffix_bias = torch.zeros(R, S).masked_fill(~suffix_allowed, -math.inf)
    scale = d**-0.5
    got = shared_prefix_attention(query, prefix_key, prefix_value, padding_bias(prompt_mask, torch.float32).view(B, 1, 1, 1, P),
                                  suffix_key, suffix_value, suffix_bias if tokens > 1 else None, scale)
    expected = plain_attention(query, prefix_key, prefix_value, prompt_mask, suffix_key, suffix_value, suffix_allowed,
                               scale)
    assert got.shape == expected.shape == (B, kv_heads, G, R, d)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the two-partial form gives the same
    prefix_part, prefix_lse = partial_attention(query, prefix_key.unsqueeze(2), prefix_value.unsqueeze(2),
                                                padding_bias(prompt_mask, torch.float32).view(B, 1, 1, 1, P), scale)
    suffix_part, suffix_lse = partial_attention(query, suffix_key, suffix_value, suffix_bias if tokens > 1 else None,
                                                scale)
    assert_close(combine_partials(prefix_part, prefix_lse, suffix_part, suffix_lse), expected, rtol=1e-5, atol=1e-6)


def test_each_prompt_key_is_read_once_per_group():
    """The shared part is one [G R, d] @ [d, P] product per group and key-value head: no per-row prompt copy."""
    B, Hkv, G, R, P, S, d = 2, 2, 4, 3, 6, 2, 4
    calls = []
    matmul = torch.matmul

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return matmul(a, b)

    torch.matmul = spy
    try:
        shared_prefix_attention(torch.randn(B, Hkv, G, R, d), torch.randn(B, Hkv, P, d), torch.randn(B, Hkv, P, d), None,
                                torch.randn(B, Hkv, G, S, d), torch.randn(B, Hkv, G, S, d), None, 0.5)
    finally:
        torch.matmul = matmul
    assert ((B, Hkv, G * R, d), (B, Hkv, d, P)) in calls  # scores against the prompt: each key once per group
    assert ((B, Hkv, G * R, P), (B, Hkv, P, d)) in calls  # the prompt part of the output
