"""Token-level advantage weights from attention grounding (SPEC 4), as pure functions.

Inputs are the per-generation-row masses of a
:class:`~dapo_lightning.attention.captured.CapturedAttention` (``token_masses()``): N rows,
R generation rows; outputs are [N, width] multipliers of the per-token advantage, where
weight r belongs to completion token r (the completion's last token has no generation row
and gets 1). ``TokenWeights`` (``callbacks/token_weights.py``) applies them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gaussian_smooth(values: Tensor, lengths: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of each row's first ``lengths[i]`` values, replicate-padded at both ends. [N, R] -> [N, R]

    Kernel half-width max(1, int(3 sigma)), weights exp(-x^2 / (2 sigma^2)) normalised
    to sum 1 (SPEC 4). Positions at or past a row's length are returned unchanged.
    """
    if sigma <= 0 or values.shape[1] == 0:
        return values
    half = max(1, int(3 * sigma))
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=values.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(values.dtype)  # [2h+1]
    N, R = values.shape
    positions = torch.arange(R, device=values.device)
    # replicate padding on the right of each row's valid prefix: position p reads min(p, length - 1)
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)  # [N, 1]
    padded_index = torch.minimum(torch.arange(-half, R + half, device=values.device).clamp(min=0).unsqueeze(0), last)
    padded = values.gather(1, padded_index)  # [N, R + 2h]
    smoothed = torch.nn.functional.conv1d(padded.unsqueeze(1), kernel.view(1, 1, -1)).squeeze(1)  # [N, R]
    return torch.where(positions.unsqueeze(0) < lengths.unsqueeze(-1), smoothed, values)


def token_vgr(text: Tensor, vision: Tensor, num_text: Tensor, num_vision: Tensor) -> Tensor:
    """The per-token VGR of SPEC 4: (a_T/|T|) / (a_V/|V| + 1e-6), 1 where that is non-finite or <= 0. -> [N, R] float64

    ``text``/``vision`` [N, R] are a_T[r], a_V[r] (layer-averaged masses of generation row r),
    ``num_text``/``num_vision`` [N]. The +1e-6 keeps a token that attends to no vision key
    finite (the per-row VGR of ``metrics`` instead calls such a row invalid). Used only by
    :func:`token_vgr_weights`.
    """
    a_t, a_v = text.double(), vision.double()
    text_density = a_t / num_text.double().unsqueeze(-1)  # [N, R]
    vision_density = a_v / num_vision.double().unsqueeze(-1) + 1e-6  # [N, R]
    vgr = text_density / vision_density
    return torch.where(torch.isfinite(vgr) & (vgr > 0), vgr, torch.ones_like(vgr))  # [N, R]


def token_vgr_weights(
    text: Tensor,
    vision: Tensor,
    rows: Tensor,
    num_text: Tensor,
    num_vision: Tensor,
    width: int,
    *,
    smooth_sigma: float = 0.0,
    clip: tuple[float, float] | None = (0.2, 3.0),
    topk_ratio: float | None = None,
) -> Tensor:
    """SPEC 4 per-token advantage multipliers from inverse per-token VGR. -> [N, width] float32

    ``text``/``vision`` [N, R] are a_T[r], a_V[r] (layer-averaged masses of generation
    row r), ``rows`` [N, R] marks the rows that exist. Weight r belongs to completion
    token r; the completion's last token, padding, and every token of a row without
    vision keys get 1. Steps per row: vgr_tok = :func:`token_vgr`; w = 1/(vgr_tok + 1e-6);
    optional Gaussian smoothing; w / mean(w) over the row's valid tokens; clamp to ``clip``;
    with ``topk_ratio`` only the top max(1, int(ratio * n)) weights of a row are kept and the
    rest are set to 1.
    """
    N, R = text.shape
    out = torch.ones(N, width, dtype=torch.float32, device=text.device)
    if R == 0 or N == 0:
        return out
    valid = rows.bool()  # [N, R]
    lengths = valid.sum(-1)  # [N]
    weights = 1.0 / (token_vgr(text, vision, num_text, num_vision) + 1e-6)  # [N, R]
    weights = gaussian_smooth(weights, lengths, smooth_sigma)
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    mean = weights.sum(-1, keepdim=True) / lengths.clamp(min=1).unsqueeze(-1)  # [N, 1]
    weights = weights / mean.clamp(min=torch.finfo(torch.float64).tiny)
    if clip is not None:
        weights = weights.clamp(clip[0], clip[1])
    if topk_ratio is not None:
        weights = _keep_top(weights, valid, lengths, topk_ratio)
    weights = torch.where(valid & (num_vision > 0).unsqueeze(-1), weights, torch.ones_like(weights))
    k = min(R, width)
    out[:, :k] = weights[:, :k].float()
    return out


def _keep_top(weights: Tensor, valid: Tensor, lengths: Tensor, ratio: float) -> Tensor:
    """Each row's top max(1, int(ratio * n)) valid weights stay; the others become 1. [N, R] -> [N, R]"""
    ranked = torch.where(valid, weights, torch.full_like(weights, -math.inf))
    order = ranked.argsort(dim=-1, descending=True, stable=True)  # [N, R]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(weights.shape[1], device=weights.device).expand_as(order))  # [N, R]
    keep = torch.clamp((ratio * lengths.double()).floor().long(), min=1).unsqueeze(-1)  # [N, 1]
    return torch.where(rank < keep, weights, torch.ones_like(weights))


def token_vision_share_weights(
    text: Tensor,
    vision: Tensor,
    rows: Tensor,
    num_vision: Tensor,
    lengths: Tensor,
    width: int,
    *,
    smooth_sigma: float = 0.0,
) -> Tensor:
    """The paper's variant of SPEC 4: w = vision share of each token's attention, summing to 1 over the completion.

    share[r] = a_V / (a_T + a_V) for the C - 1 generation rows (0 when both are 0); the
    last token, which has no row, gets the mean share of its completion; w = share / Σ share
    over the C tokens (1/C each when Σ = 0). Padding and completions without vision keys
    get 1. ``lengths`` [N] are the completion lengths C. -> [N, width] float32
    """
    N, R = text.shape
    out = torch.ones(N, width, dtype=torch.float32, device=text.device)
    valid = rows.bool()  # [N, R]
    total = text.double() + vision.double()
    share = torch.where(total > 0, vision.double() / total, torch.zeros_like(total))  # [N, R]
    share = gaussian_smooth(share, valid.sum(-1), smooth_sigma)
    share = torch.where(valid, share, torch.zeros_like(share))
    for i in range(N):
        C = int(lengths[i])
        if C <= 0 or int(num_vision[i]) <= 0:
            continue
        values = share[i, : C - 1]  # [C - 1]
        last = values.mean() if C > 1 else torch.zeros((), dtype=share.dtype, device=share.device)
        token_shares = torch.cat([values, last.reshape(1)])  # [C]
        s = token_shares.sum()
        row = token_shares / s if s > 0 else torch.full_like(token_shares, 1.0 / C)
        out[i, :C] = row[:width].float()
    return out
