"""The original system's attention collection, kept as the reference the recorders are tested and benchmarked against.

The original collected its rows step by step from
``generate(output_attentions=True, return_dict_in_generate=True)``: every decode step's
attention of every layer and head (memory O(L·H·T·(P+T)) per row, eager attention while
generating). It also kept the decode steps ``generate`` runs for a row after that row's EOS
(padding steps), which inflated A_T for short rows (SPEC 3); this reference keeps only SPEC
3's generation rows (the queries at the completion's own tokens but its last), the
intended behaviour, which ``recorders.py`` records without the memory. This module
reproduces the original way of collecting, so restricted, for ``tests/attention`` and
``benchmarks/attention_overhead.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dapo_lightning.attention.masks import ModalityMasks, first_real_position, generation_rows


def generation_step_masses(
    step_attentions: Sequence[Sequence[Tensor]],
    prompt_attention_mask: Tensor,
    completion_mask: Tensor,
    masks: ModalityMasks,
    *,
    variant: str = "original",
) -> tuple[Tensor, Tensor]:
    """Per-layer masses from ``generate(output_attentions=True, return_dict_in_generate=True)``, the original way.

    ``step_attentions[s][l]`` is step s's attention of layer l, [N, H, q, K]: the prefill
    (q = P) at s = 0, then one query per decode step. As the original did, the prefill's
    last row is dropped and each decode step's last row appended, so step s >= 1 gives
    generation row s - 1; the rows are stacked into full [N, H, R, K] matrices per layer.
    ``prompt_attention_mask`` [N, P], ``completion_mask`` [N, T], ``masks`` over the P
    prompt keys. Returns text, vision [L, N, R] like ``CapturedAttention``.
    """
    num_layers = len(step_attentions[0])
    N, P = prompt_attention_mask.shape
    R = max(completion_mask.shape[1] - 1, 0)
    rows = generation_rows(completion_mask)  # [N, R]
    sink = first_real_position(prompt_attention_mask)  # [N]
    text_out = torch.zeros(num_layers, N, R)
    vision_out = torch.zeros(num_layers, N, R)
    for layer in range(num_layers):
        # the original's per-layer stack: every decode step's last query row, padded to the longest key width
        steps = [step_attentions[s][layer][:, :, -1, :].float() for s in range(1, R + 1)]  # each [N, H, P + s]
        if not steps:
            continue
        width = steps[-1].shape[-1]
        stacked = torch.stack(
            [torch.nn.functional.pad(a, (0, width - a.shape[-1])) for a in steps], dim=2
        )  # [N, H, R, K]
        prompt = stacked[..., :P].clone()  # [N, H, R, P]
        prompt[torch.arange(N), :, :, sink] = 0.0  # the attention sink: first real prompt token
        if variant == "paper":
            t = (prompt * masks.text[:, None, None, :]).sum(-1)  # [N, H, R]
            v = (prompt * masks.vision[:, None, None, :]).sum(-1)
            total = t + v
            safe = torch.where(total > 0, total, torch.ones_like(total))
            t = torch.where(total > 0, t / safe, torch.zeros_like(t)).mean(1)  # [N, R]
            v = torch.where(total > 0, v / safe, torch.zeros_like(v)).mean(1)
        else:
            g = prompt.mean(1)  # [N, R, P] head average
            total = g.sum(-1, keepdim=True)  # [N, R, 1]
            g = torch.where(total > 0, g / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(g))
            t = (g * masks.text[:, None, :]).sum(-1)  # [N, R]
            v = (g * masks.vision[:, None, :]).sum(-1)
        text_out[layer] = torch.where(rows, t, torch.zeros_like(t))
        vision_out[layer] = torch.where(rows, v, torch.zeros_like(v))
    return text_out, vision_out
