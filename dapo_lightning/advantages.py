"""Group statistics -> advantages (SPEC section 2, "advantage").

Rows are grouped in consecutive blocks of ``num_generations`` (G): the completions
of one prompt. Each completion's advantage is its reward relative to its group.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_MODES = ("group", "batch", "none")
STD_EPS = 1e-4


def combine_rewards(rewards_per_func: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum over reward functions; NaN (no value) counts as 0."""
    return (rewards_per_func.nan_to_num(nan=0.0) * weights.unsqueeze(0)).sum(-1)  # [N]


def group_std(rewards: Tensor, num_generations: int) -> Tensor:
    """Unbiased standard deviation of each group's rewards."""
    return rewards.view(-1, num_generations).std(dim=1)  # [N // G]


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    *,
    batch_std: Tensor | None = None,
) -> Tensor:
    """(r - mean of its group) / (std + 1e-4), with the std of the group, of the batch, or none.

    ``batch_std`` overrides the local batch's std for ``scale_rewards="batch"`` (the
    caller passes the std over all processes' rewards under DDP).
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for group advantages, got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        std = rewards.std() if batch_std is None else batch_std
        centred = centred / (std + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards: unknown {scale_rewards!r}; choose from {SCALE_MODES}")
    return centred.reshape(-1)  # [N]


def frac_zero_std(rewards: Tensor, num_generations: int) -> Tensor:
    """Fraction of groups whose completions all got the same reward (no learning signal)."""
    std = group_std(rewards, num_generations)
    return torch.isclose(std, torch.zeros_like(std)).float().mean()
