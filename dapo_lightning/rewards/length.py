"""Length reward: DAPO's soft overlong punishment (SPEC section 2).

With L = ``max_completion_length``, C = ``soft_punish_cache`` (default 50) and n
the completion's length in tokens counting its EOS token:

    0                 if n <= L - C
    ((L - C) - n) / C if L - C < n <= L   (from 0 down to -1, linear)
    -1                if n > L

It is the soft overlong punishment of the DAPO paper (Yu et al. 2025, "Overlong Reward Shaping") and the
original ``soft_overlong_punishment_reward``. The caller passes each row's
``completion_ids`` trimmed to its valid tokens (EOS included when generated), or
the lengths directly as ``completion_lengths``. C = 0 leaves only the hard cut
at L.
"""

from __future__ import annotations

import operator
from typing import Any

from dapo_lightning.rewards.registry import register_reward


def overlong_penalty(n: int, max_completion_length: int, soft_punish_cache: int) -> float:
    """SPEC section 2 length reward of one completion of ``n`` tokens, in [-1, 0]."""
    safe_length = max_completion_length - soft_punish_cache
    if n <= safe_length:
        return 0.0
    if n <= max_completion_length:
        return (safe_length - n) / soft_punish_cache
    return -1.0


def _checked_int(name: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"length reward: {name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"length reward: {name} must be >= {minimum}, got {number}")
    return number


@register_reward("length")
def length_reward(
    completions: list,
    completion_ids: list | None = None,
    completion_lengths: list[int] | None = None,
    max_completion_length: int | None = None,
    soft_punish_cache: int = 50,
    **kwargs: Any,
) -> list[float]:
    """SPEC section 2 length reward per completion, in [-1, 0].

    The length of row i is ``completion_lengths[i]`` when given, else
    ``len(completion_ids[i])``. ``max_completion_length`` is required.
    """
    if max_completion_length is None:
        raise ValueError("length reward needs max_completion_length (the generation limit L of SPEC section 2)")
    limit = _checked_int("max_completion_length", max_completion_length, 1)
    cache = _checked_int("soft_punish_cache", soft_punish_cache, 0)
    if completion_lengths is not None:
        lengths = [_checked_int("completion_lengths", n, 0) for n in completion_lengths]
    elif completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        raise ValueError("length reward needs completion_ids or completion_lengths")
    if len(lengths) != len(completions):
        raise ValueError(f"length reward: {len(completions)} completions but {len(lengths)} lengths")
    return [overlong_penalty(n, limit, cache) for n in lengths]
