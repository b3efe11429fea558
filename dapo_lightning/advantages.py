"""Group statistics -> advantages (SPEC section 2, "The total and the advantages").

Rows are grouped in consecutive blocks of ``num_generations`` (G): the completions
of one prompt. Each completion's advantage is its reward relative to its group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

SCALE_MODES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
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


def normalize_then_sum(
    rewards_per_func: Tensor, weights: Tensor, num_generations: int, *,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """GDPO's decoupled advantages (TRL's ``multi_objective_aggregation="normalize_then_sum"``). [N, K] -> [N]

    Each reward is centred on its group's mean and divided by its group's std + 1e-4 (NaN, no
    value, is left out of both and counts 0), the normalised rewards are summed with their
    weights, and the sum is centred and scaled by the batch: (s - mean) / (std + 1e-4).
    ``gather`` [N] -> [W * N] gives every process's sums for that last step (None: this process's).
    """
    G = num_generations
    if G < 2:
        raise ValueError(f"num_generations must be >= 2 for group advantages, got {G}")
    K = rewards_per_func.shape[-1]
    grouped = rewards_per_func.view(-1, G, K)  # [B, G, K]
    valid = ~grouped.isnan()
    count = valid.sum(dim=1, keepdim=True)  # [B, 1, K]
    values = grouped.nan_to_num(0.0)
    mean = values.sum(dim=1, keepdim=True) / count  # [B, 1, K] NaN where a reward gave the group no value
    squares = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values)).sum(dim=1, keepdim=True)
    std = (squares / (count - 1)).sqrt()  # [B, 1, K] unbiased
    normalised = ((grouped - mean) / (std + STD_EPS)).reshape(-1, K)  # [N, K]
    summed = (normalised.nan_to_num(0.0) * weights.unsqueeze(0)).sum(-1)  # [N]
    batch = summed if gather is None else gather(summed)  # [N] or [W * N]
    return (summed - batch.mean()) / (batch.std() + STD_EPS)  # [N]
