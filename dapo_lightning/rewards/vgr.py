"""VGR rewards: prefer completions whose attention is more grounded in the image (SPEC section 2).

Both read each row's VGR (SPEC 3, late segment falling back to all; text density over
vision density, so smaller means more attention on the image) from the keyword ``vgr``,
which the ``AttentionMetrics`` callback attaches to the rollout. NaN or inf marks a row
without a usable VGR (|T| <= 0, |V| <= 0 or A_V/|V| <= 1e-6).

Per group of G = ``num_generations`` consecutive rows, over the n valid values sorted
as s: q = (0.25, 0.75) if n < 10 else (0.10, 0.90); q_lo = s[int(q0·n)],
q_hi = s[int(q1·n)], iqr = q_hi - q_lo, median = s[n // 2]. The statistics are unusable
when G <= 1, n < 3, iqr < max(5.0, 0.10·median) or iqr <= 1e-6. A row's score is
clip((q_hi - vgr) / iqr, 0, 1).

- ``vgr``: the score for valid rows, 0.5 for invalid rows, for every row of a group with
  unusable statistics and for rows past the last full group.
- ``vgr_hard_negative``: score - 0.5 (in [-0.5, 0.5]) only for rows with accuracy 1 in a
  group with at least 2 such rows and usable statistics (computed over all the group's
  valid rows); 0 everywhere else. It reads ``accuracy`` (the accuracy reward listed
  before it) per row.

These are the original ``vgr_reward`` and ``vgr_hard_negative`` (``attention_rewards.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dapo_lightning.rewards.registry import register_reward

PROVIDER = "dapo_lightning.callbacks.AttentionMetrics"


ABSOLUTE_FLOOR = 5.0  # SPEC 2's gate: no ranking when iqr < max(ABSOLUTE_FLOOR, 0.10 x median)


def group_statistics(values: Sequence[float], absolute_floor: float = ABSOLUTE_FLOOR) -> tuple[float, float] | None:
    """(q_hi, iqr) of a group's VGR values, or None when they cannot rank the group (SPEC 2).

    ``absolute_floor``: the gate's absolute part (SPEC 2's 5.0; a variant for small models may lower it)."""
    valid = sorted(v for v in values if _is_valid(v))
    n = len(valid)
    if n < 3:
        return None
    q_low, q_high = (0.25, 0.75) if n < 10 else (0.10, 0.90)
    low, high = valid[int(q_low * n)], valid[int(q_high * n)]
    iqr = high - low
    median = valid[n // 2]
    if iqr < max(absolute_floor, 0.10 * median) or iqr <= 1e-6:
        return None
    return high, iqr


def grounding_score(vgr: float, q_high: float, iqr: float) -> float:
    """clip((q_hi - vgr) / iqr, 0, 1): 1 for the most vision-grounded rows of the group."""
    return min(1.0, max(0.0, (q_high - vgr) / iqr))


def _is_valid(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _check(name: str, completions: list, vgr: Sequence[float] | None, num_generations: int) -> int:
    if vgr is None:
        raise ValueError(
            f"{name} reward needs per-sample VGR values (keyword vgr); add {PROVIDER} to trainer.callbacks"
        )
    if len(vgr) != len(completions):
        raise ValueError(f"{name} reward: {len(completions)} completions but {len(vgr)} VGR values")
    return int(num_generations)


@register_reward("vgr", needs=("vgr",), provider_hint=PROVIDER)
def vgr_reward(
    completions: list, vgr: Sequence[float] | None = None, num_generations: int = 1, **kwargs: Any
) -> list[float]:
    """SPEC 2 ``vgr`` reward per completion, in [0, 1]."""
    return grounding_scores(vgr, _check("vgr", completions, vgr, num_generations))


def grounding_scores(vgr: Sequence[float], num_generations: int, absolute_floor: float = ABSOLUTE_FLOOR) -> list[float]:
    """The ``vgr`` reward of each row: its group's score where the group's statistics rank it (``group_statistics``
    with ``absolute_floor``) and the row's VGR is valid, else 0.5 (rows past the last full group too)."""
    G = int(num_generations)
    out = [0.5] * len(vgr)
    if G <= 1:
        return out
    for start in range(0, len(vgr) - G + 1, G):
        group = list(vgr[start : start + G])
        stats = group_statistics(group, absolute_floor)
        if stats is None:
            continue
        for offset, value in enumerate(group):
            if _is_valid(value):
                out[start + offset] = grounding_score(float(value), *stats)
    return out


@register_reward("vgr_hard_negative", needs=("vgr",), provider_hint=PROVIDER, reads_rewards=("accuracy",))
def vgr_hard_negative_reward(
    completions: list,
    vgr: Sequence[float] | None = None,
    num_generations: int = 1,
    accuracy: Sequence[float] | None = None,
    **kwargs: Any,
) -> list[float]:
    """SPEC 2 ``vgr_hard_negative`` reward per completion, in [-0.5, 0.5]."""
    G = _check("vgr_hard_negative", completions, vgr, num_generations)
    if accuracy is None:
        raise ValueError("vgr_hard_negative reward needs per-sample accuracy: list the accuracy reward before it")
    if len(accuracy) != len(completions):
        raise ValueError(
            f"vgr_hard_negative reward: {len(completions)} completions but {len(accuracy)} accuracy values"
        )
    out = [0.0] * len(completions)
    if G <= 1:
        return out
    for start in range(0, len(completions) - G + 1, G):
        group = list(vgr[start : start + G])
        correct = [
            offset
            for offset in range(G)
            if _is_valid(accuracy[start + offset]) and float(accuracy[start + offset]) == 1.0
        ]
        if len(correct) < 2:
            continue
        stats = group_statistics(group)
        if stats is None:
            continue
        for offset in correct:
            if _is_valid(group[offset]):
                out[start + offset] = grounding_score(float(group[offset]), *stats) - 0.5
    return out
