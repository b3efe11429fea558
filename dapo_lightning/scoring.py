"""Rollout -> rewards -> advantages (SPEC section 2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dapo_lightning.advantages import combine_rewards, group_advantages
from dapo_lightning.batch import RolloutBatch
from dapo_lightning.rewards.registry import RewardSpec


def compute_rewards(specs: Sequence[RewardSpec], completions: list[str], kwargs: dict[str, Any]) -> Tensor:
    """Call each reward in order; returns [N, K] with NaN where a reward gave no value.

    Each reward sees the outputs of the rewards before it under their names, so
    ``vgr_hard_negative`` can read ``accuracy``. A reward whose declared inputs
    (``RewardSpec.needs``) are absent gets no value; the module refuses that at fit
    start for rewards with a non-zero weight.
    """
    kwargs = dict(kwargs)
    columns = []
    for spec in specs:
        if any(key not in kwargs for key in spec.needs):  # e.g. no attention capture this step: no value
            column = [math.nan] * len(completions)
            kwargs[spec.name] = column
            columns.append(column)
            continue
        try:
            values = spec.fn(completions, **kwargs)
        except Exception as error:
            raise RuntimeError(f"reward {spec.name!r} raised {type(error).__name__}: {error}") from error
        values = list(values)
        if len(values) != len(completions):
            raise RuntimeError(f"reward {spec.name!r} returned {len(values)} values for {len(completions)} completions")
        column = [math.nan if v is None else float(v) for v in values]
        kwargs[spec.name] = column
        columns.append(column)
    return torch.tensor(columns, dtype=torch.float32).T.contiguous()  # [N, K]


def score(
    rollout: RolloutBatch,
    specs: Sequence[RewardSpec],
    *,
    scale_rewards: str,
    extra_kwargs: dict[str, Any] | None = None,
    batch_std: Callable[[Tensor], Tensor] | None = None,
) -> RolloutBatch:
    """Fill ``rewards_per_func``, ``rewards`` and ``advantages`` of ``rollout`` (in place; returns it)."""
    kwargs = {**rollout.reward_kwargs(), **(extra_kwargs or {})}
    device = rollout.completion_ids.device
    per_func = compute_rewards(specs, rollout.completions, kwargs).to(device)  # [N, K]
    weights = rollout.reward_weights.to(device=device, dtype=per_func.dtype)  # [K]
    rewards = combine_rewards(per_func, weights)  # [N]
    std = batch_std(rewards) if (batch_std is not None and scale_rewards == "batch") else None
    rollout.rewards_per_func = per_func
    rollout.rewards = rewards
    if rollout.num_generations >= 2:
        rollout.advantages = group_advantages(rewards, rollout.num_generations, scale_rewards, batch_std=std)
    else:  # greedy validation: one completion per prompt, no group to compare with
        rollout.advantages = torch.zeros_like(rewards)
    return rollout
