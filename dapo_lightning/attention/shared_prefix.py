"""Shared-prefix ("cascade") attention: G rows that share a prompt read its keys and values once.

In a group of G completions of one prompt, every row attends to the same P prompt keys
and to its own completion keys. Plain attention over a cache that repeats the prompt for
each row reads the prompt's keys and values G times per decode step; here the scores are
split into two parts and the output is their exact softmax combination:

- the shared part: the queries of all G rows (and of the heads that share a key-value head)
  against the group's prompt keys, as one matrix product per group and key-value head:
  ``[G·R, d] @ [d, P]``, so each prompt key is read once per group;
- the per-row part: each row's queries against its own completion keys.

With scores s_p (prompt) and s_c (completion) of one query, its output is
softmax([s_p, s_c]) @ [V_p; V_c] = w_p · softmax(s_p) @ V_p + w_c · softmax(s_c) @ V_c with
w_x = exp(lse(s_x) - lse([s_p, s_c])): the two partial attentions combined by their
log-sum-exps (FlashInfer's cascade attention, Ye et al. 2024; Hydragen, Juravsky et al. 2024).
:func:`combine_partials` is that combination; :func:`shared_prefix_attention` takes the
log-sum-exp over the concatenated scores in one softmax, which is the same sum computed in
one pass (fewer small kernels, which is what a decode step on a CPU pays for).

Layouts (grouped, so nothing is copied per row): B groups, Hkv key-value heads, G rows per
group, R queries per row and key-value head (query heads per key-value head x query tokens),
P prompt keys, S completion keys, d head size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shared_prefix_attention(query: Tensor, prefix_key: Tensor, prefix_value: Tensor, prefix_bias: Tensor | None,
                            suffix_key: Tensor, suffix_value: Tensor, suffix_bias: Tensor | None,
                            scale: float) -> Tensor:
    """Attention of each row's queries over its group's prefix keys and its own suffix keys. -> [B, Hkv, G, R, d]

    ``query`` [B, Hkv, G, R, d]; ``prefix_key``/``prefix_value`` [B, Hkv, P, d] (once per group);
    ``prefix_bias`` additive, broadcastable to [B, Hkv, G, R, P] (0 kept, -inf masked: the prompt's
    left padding), or None; ``suffix_key``/``suffix_value`` [B, Hkv, G, S, d]; ``suffix_bias``
    broadcastable to [B, Hkv, G, R, S] (a causal mask in a teacher-forced pass), or None.
    Every query must keep at least one key.
    """
    B, Hkv, G, R, d = query.shape
    P = prefix_key.shape[2]
    scores_prefix = torch.matmul(query.reshape(B, Hkv, G * R, d), prefix_key.transpose(-1, -2))  # [B, Hkv, G R, P]
    scores_prefix = scores_prefix.view(B, Hkv, G, R, P)
    scores_suffix = torch.matmul(query, suffix_key.transpose(-1, -2))  # [B, Hkv, G, R, S]
    scores = torch.cat([scores_prefix, scores_suffix], dim=-1).mul_(scale)  # [B, Hkv, G, R, P + S]
    if prefix_bias is not None:
        scores[..., :P] += prefix_bias
    if suffix_bias is not None:
        scores[..., P:] += suffix_bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # [B, Hkv, G, R, P + S]
    out = torch.matmul(probs[..., :P].reshape(B, Hkv, G * R, P), prefix_value).view(B, Hkv, G, R, d)  # shared part
    return out.add_(torch.matmul(probs[..., P:], suffix_value))  # [B, Hkv, G, R, d]


def partial_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention over one key set and its log-sum-exp. [..., R, d], [..., K, d] -> [..., R, d], [..., R]

    A query with every key masked gets output 0 and log-sum-exp -inf (it then weighs 0 in :func:`combine_partials`).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale  # [..., R, K]
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)  # [..., R]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))  # [..., R, K]: 0 where masked
    return torch.matmul(probs.to(value.dtype), value), lse


def combine_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Two partial attentions of the same queries over disjoint key sets -> attention over their union.

    out = exp(lse_a - lse) · out_a + exp(lse_b - lse) · out_b, lse = log(exp(lse_a) + exp(lse_b)). [..., R, d]
    """
    lse = torch.logaddexp(lse_a, lse_b)  # [..., R]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)  # [..., R, 1]
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return (weight_a * out_a.float() + weight_b * out_b.float()).to(out_a.dtype)


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Keep/drop mask [..., K] (1 kept) -> additive bias [..., K]: 0 where kept, -inf where dropped."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, -math.inf)
