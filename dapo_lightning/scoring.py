"""Rollout -> rewards -> advantages (SPEC section 2)."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dapo_lightning.advantages import combine_rewards, group_advantages, normalize_then_sum
from dapo_lightning.batch import RolloutBatch, SourceRow
from dapo_lightning.guards import Fault
from dapo_lightning.rewards.registry import RewardSpec


ON_REWARD_ERROR = ("raise", "zero")
PREVIEW_CHARS = 80


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the message names the reward and the samples."""

    def __init__(self, message: str, reward: str, rows: Sequence[int] = ()):
        super().__init__(message)
        self.reward, self.rows = reward, list(rows)


@dataclass
class RewardTable:
    """Every reward's value for every completion."""

    values: Tensor  # [N, K] NaN where a reward gave no value (returned None, or its inputs were absent)
    nonfinite: Tensor  # [N, K] bool: the reward returned NaN or inf (a fault: the training step is skipped)
    errors: dict[str, list[int]] = field(default_factory=dict)  # reward -> rows it raised on, scored 0


def reward_table(
    specs: Sequence[RewardSpec],
    completions: list[str],
    kwargs: dict[str, Any],
    *,
    on_error: str = "raise",
    dataset_rows: Sequence[SourceRow] | Sequence[int] | None = None,
) -> RewardTable:
    """Call each reward in order on all completions.

    Each reward sees the outputs of the rewards before it under their names, so
    ``vgr_hard_negative`` can read ``accuracy``. A reward whose declared inputs
    (``RewardSpec.needs``) are absent gets no value; the module refuses that at fit
    start for rewards with a non-zero weight.

    When a reward raises (or returns a value that is not a number), it is called again
    one group of ``num_generations`` rows at a time, then, for a reward without declared
    inputs, one sample at a time, to find the samples it fails on; group rewards (those
    with ``needs``, like ``vgr``, whose value depends on the whole group) are only called
    per group, so a failure names the group's rows. ``on_error="raise"`` raises
    :class:`RewardError` naming the reward, the sample, its question's parquet file and row
    (``dataset_rows``: one ``SourceRow`` per completion, or positions) and an escaped preview
    of the completion; ``"zero"`` scores the failing samples 0, keeps every other sample's
    value, and lists the rows in ``errors``.
    """
    if on_error not in ON_REWARD_ERROR:
        raise ValueError(f"on_error: choose from {ON_REWARD_ERROR}, got {on_error!r}")
    kwargs = dict(kwargs)
    n = len(completions)
    columns, nonfinite, errors = [], [], {}
    for spec in specs:
        if any(key not in kwargs for key in spec.needs):  # e.g. no attention capture this step: no value
            values: list[float | None] = [None] * n
        else:
            try:
                values = _call(spec, completions, kwargs)
            except RewardError:
                raise
            except Exception as error:
                values, failed = _locate_failures(spec, completions, kwargs, error, on_error, dataset_rows)
                errors[spec.name] = failed
        nonfinite.append([v is not None and not math.isfinite(v) for v in values])
        column = [math.nan if v is None else v for v in values]
        kwargs[spec.name] = column
        columns.append(column)
    return RewardTable(
        values=torch.tensor(columns, dtype=torch.float32).reshape(len(specs), n).T.contiguous(),  # [N, K]
        nonfinite=torch.tensor(nonfinite, dtype=torch.bool).reshape(len(specs), n).T.contiguous(),  # [N, K]
        errors=errors,
    )


def _call(spec: RewardSpec, completions: list, kwargs: dict[str, Any]) -> list[float | None]:
    if _names_completions(spec.fn):  # by keyword, as TRL calls it: ``def f(prompts, completions, **kwargs)`` works
        values = list(spec.fn(completions=completions, **kwargs))
    else:  # the first positional parameter, whatever its name (``def f(texts, **kwargs)``)
        values = list(spec.fn(completions, **kwargs))
    if len(values) != len(completions):
        raise RewardError(f"reward {spec.name!r} returned {len(values)} values for {len(completions)} completions",
                          spec.name)
    return [None if v is None else float(v) for v in values]  # float() of anything else raises: located below


@functools.lru_cache(maxsize=256)
def _names_completions(fn) -> bool:
    """Whether ``fn`` has a parameter called ``completions`` (then it is passed by that name)."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or a callable without a signature: positional
        return False


def _rows_of(kwargs: dict[str, Any], start: int, stop: int, n: int) -> dict[str, Any]:
    """``kwargs`` with every per-row value (a list, tuple or tensor of length n) cut to rows [start, stop)."""
    return {k: v[start:stop] if isinstance(v, (list, tuple, Tensor)) and len(v) == n else v for k, v in kwargs.items()}


def preview(text: Any, limit: int = PREVIEW_CHARS) -> str:
    """The start of an untrusted text as an escaped Python literal (quotes, newlines, controls escaped)."""
    text = str(text)
    return repr(text[:limit]) + (f" (+{len(text) - limit} characters)" if len(text) > limit else "")


def _locate_failures(spec, completions, kwargs, error, on_error, dataset_rows) -> tuple[list[float | None], list[int]]:
    n = len(completions)
    G = int(kwargs.get("num_generations") or 1)
    G = G if G >= 1 and n % G == 0 else max(n, 1)
    values: list[float | None] = [None] * n
    failed: list[tuple[int, int, BaseException]] = []  # (first row, last row + 1, what it raised)
    for start in range(0, n, G):
        try:
            values[start : start + G] = _call(spec, completions[start : start + G], _rows_of(kwargs, start, start + G, n))
            continue
        except Exception as group_error:
            if spec.needs:  # a group reward: its value for one sample depends on the others
                failed.append((start, start + G, group_error))
                continue
        for i in range(start, start + G):
            try:
                values[i] = _call(spec, completions[i : i + 1], _rows_of(kwargs, i, i + 1, n))[0]
            except Exception as sample_error:
                failed.append((i, i + 1, sample_error))
    what = f"reward {spec.name!r} raised {type(error).__name__}: {error}"
    if not failed:  # only the whole batch fails: the reward depends on more than a group
        if on_error == "raise":
            raise RewardError(f"{what} on the batch of {n} completions, but on no group or sample alone", spec.name,
                              range(n)) from error
        return [0.0] * n, list(range(n))
    if on_error == "raise":
        start, stop, first = failed[0]
        question = dataset_rows[start] if dataset_rows is not None and start < len(dataset_rows) else None
        source = "" if question is None else f"from {question}" if isinstance(question, SourceRow) else \
            f"dataset row {question}"
        if stop - start == 1:
            where = f"sample {start}" + (f" ({source})" if source else "")
        else:
            where = f"samples {start}-{stop - 1} (the group{f', {source}' if source else ''}; {spec.name!r} scores " \
                "whole groups)"
        also = f"; {len(failed) - 1} more failing" if len(failed) > 1 else ""
        raise RewardError(
            f"reward {spec.name!r} raised {type(first).__name__}: {first} on {where}{also}; completion "
            f"{preview(completions[start])}. Fix the reward, or set model.rewards.on_reward_error: zero to score such "
            "samples 0 and go on",
            spec.name, [r for a, b, _ in failed for r in range(a, b)],
        ) from first
    rows = [r for a, b, _ in failed for r in range(a, b)]
    for r in rows:
        values[r] = 0.0
    return values, rows


def score(
    rollout: RolloutBatch,
    specs: Sequence[RewardSpec],
    *,
    scale_rewards: str,
    aggregation: str = "sum_then_normalize",
    extra_kwargs: dict[str, Any] | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    on_reward_error: str = "raise",
    conversational: bool = False,
) -> RolloutBatch:
    """Fill ``rewards_per_func``, ``rewards`` and ``advantages`` of ``rollout`` (in place; returns it).

    ``rewards`` is always the weighted sum (NaN counted 0). The advantages follow
    ``aggregation``: ``sum_then_normalize`` centres that sum per group and scales it by
    ``scale_rewards``; ``normalize_then_sum`` normalises each reward per group first
    (``advantages.normalize_then_sum``). ``gather`` [N] -> [W * N] gives every process's values
    for the batch-wide statistics (None: this process's). Rewards that returned NaN or inf are
    recorded in ``rollout.faults``; samples a reward raised on and that scored 0
    (``on_reward_error="zero"``) are counted in ``rollout.reward_errors``. ``conversational``
    passes each completion as TRL does for chat data, ``[{"role": "assistant", "content": text}]``
    (the built-in rewards read either shape).
    """
    kwargs = {**rollout.reward_kwargs(), **(extra_kwargs or {})}
    completions = rollout.completions
    if conversational:  # TRL's shape for chat datasets: each completion a list of one assistant message
        completions = [[{"role": "assistant", "content": text}] for text in completions]
    device = rollout.completion_ids.device
    G = rollout.num_generations
    where = rollout.prompts.locations()  # [B] each prompt's parquet file and row (or its position)
    dataset_rows = [where[i // G] for i in range(rollout.num_rows)] if len(where) * G == rollout.num_rows else None
    table = reward_table(specs, completions, kwargs, on_error=on_reward_error, dataset_rows=dataset_rows)
    per_func = table.values.to(device)  # [N, K]
    for k, spec in enumerate(specs):
        rows = table.nonfinite[:, k].nonzero().flatten().tolist()
        if rows:
            rollout.faults.append(Fault(f"rewards/{spec.name}", tuple(rows)).located(where, G))
    rollout.reward_errors = {name: len(rows) for name, rows in table.errors.items()}
    weights = rollout.reward_weights.to(device=device, dtype=per_func.dtype)  # [K]
    rewards = combine_rewards(per_func, weights)  # [N]
    rollout.rewards_per_func = per_func
    rollout.rewards = rewards
    if rollout.num_generations < 2:  # greedy validation: one completion per prompt, no group to compare with
        rollout.advantages = torch.zeros_like(rewards)
    elif aggregation == "normalize_then_sum":
        rollout.advantages = normalize_then_sum(per_func, weights, G, gather=gather)
    else:
        std = gather(rewards).std() if (gather is not None and scale_rewards == "batch") else None
        rollout.advantages = group_advantages(rewards, G, scale_rewards, batch_std=std)
    return rollout
