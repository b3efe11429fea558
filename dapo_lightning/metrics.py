"""Every number reported about a rollout and a step, in one place.

The module's ``train/*`` and ``val/*`` scalars, the callbacks' statistics and the Markdown
log's tables all come from here, so a rate or a mean means the same thing everywhere.
Per-rollout functions return 0-dim tensors on the rollout's device; the step's scalars are
stacked and reduced over processes in one gather (:func:`reduce_across_processes`), the
step's only host synchronisation for its metrics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from dapo_lightning import distributed
from dapo_lightning.advantages import frac_zero_std
from dapo_lightning.batch import RolloutBatch
from dapo_lightning.rewards.accuracy import accuracy as accuracy_reward
from dapo_lightning.rewards.format import format_reward

SUMMED = ("skipped_rows", "resized_rows", "reward_errors/", "preference/pairs")  # counts: summed over processes


def reward_column(rollout: RolloutBatch, name: str) -> Tensor | None:
    """[N] the configured reward ``name``'s values (NaN where it gave none), or None when it is not configured."""
    if name not in rollout.reward_names:
        return None
    return rollout.rewards_per_func[:, rollout.reward_names.index(name)]


def row_accuracy(rollout: RolloutBatch) -> Tensor:
    """[N] float32 in {0, 1}: the ``accuracy`` reward's column (no value counts 0), else computed (NaN without a
    ``solution`` column)."""
    column = reward_column(rollout, "accuracy")
    if column is not None:
        return column.float().nan_to_num(0.0)
    solution = rollout.row_columns().get("solution")
    values = accuracy_reward(rollout.completions, solution=solution) if solution is not None else \
        [math.nan] * rollout.num_rows
    return torch.tensor(values, dtype=torch.float32, device=rollout.completion_ids.device)


def row_format(rollout: RolloutBatch) -> Tensor:
    """[N] float32 in {0, 1}: the ``format`` reward's column (no value counts 0), else computed."""
    column = reward_column(rollout, "format")
    if column is not None:
        return column.float().nan_to_num(0.0)
    return torch.tensor(format_reward(rollout.completions), dtype=torch.float32, device=rollout.completion_ids.device)


def rate_columns(rollout: RolloutBatch) -> dict[str, Tensor]:
    """Per-row accuracy, format and success (both) in {0, 1}, on the CPU (the Markdown tables' rates)."""
    accuracy, fmt = row_accuracy(rollout).cpu(), row_format(rollout).cpu()
    return {"accuracy": accuracy, "format": fmt, "success": ((accuracy == 1) & (fmt == 1)).float()}


def _masked_mean_std(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (NaN when no value is valid) and unbiased std (0 below two values) of ``values[valid]``, without a sync."""
    count = valid.sum()
    kept = torch.where(valid, values, torch.zeros_like(values))
    mean = kept.sum() / count  # NaN when count = 0
    squares = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values)).sum()
    std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(mean))
    return mean, std


def rollout_metrics(rollout: RolloutBatch) -> dict[str, Tensor]:
    """What a scored rollout looks like: rewards, accuracy, completion lengths, per-reward means and weights."""
    lengths = rollout.completion_lengths.float()  # [N]
    metrics = {
        "reward_mean": rollout.rewards.mean(),
        "reward_std": rollout.rewards.std() if rollout.num_rows > 1 else torch.zeros((), device=lengths.device),
        "accuracy": row_accuracy(rollout).mean(),
        "completion_length/mean": lengths.mean(),
        "completion_length/min": lengths.min(),
        "completion_length/max": lengths.max(),
        "completion_length/clipped_ratio": rollout.truncated.float().mean(),
    }
    if rollout.num_generations >= 2:
        metrics["frac_reward_zero_std"] = frac_zero_std(rollout.rewards, rollout.num_generations)
    for k, name in enumerate(rollout.reward_names):
        column = rollout.rewards_per_func[:, k]  # [N]
        mean, std = _masked_mean_std(column, ~column.isnan())
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = mean, std
        metrics[f"reward_weights/{name}"] = rollout.reward_weights[k]
    return metrics


def sampled_metrics(rollout: RolloutBatch) -> dict[str, Tensor]:
    """What the policy did on the step's fresh prompts (``train/sampled/*``), before groups were moved.

    ``train/reward_mean`` and ``train/accuracy`` describe the batch that was trained on, into
    which the replay buffer and dynamic sampling swap groups (kept for their high or varied
    rewards); these do not, so their curves compare across those ablations.
    """
    if rollout.sampled_rewards is None:
        return {}
    metrics = {"reward_mean": rollout.sampled_rewards.mean(), "accuracy": rollout.sampled_accuracy.mean()}
    if rollout.num_generations >= 2:
        metrics["frac_reward_zero_std"] = frac_zero_std(rollout.sampled_rewards, rollout.num_generations)
    return metrics


def token_weight_stats(rollout: RolloutBatch) -> dict[str, Tensor] | None:
    """Mean, std, min, max and the fractions above and below 1 of the weighted tokens (valid, not replayed).

    None without token weights or weighted tokens. float64 on the CPU; ``count`` is the number of tokens.
    """
    if rollout.token_weights is None:
        return None
    valid = rollout.completion_mask.bool()
    if rollout.replayed is not None:
        valid = valid & ~rollout.replayed.bool().unsqueeze(-1)
    values = rollout.token_weights[valid].double().cpu()
    if values.numel() == 0:
        return None
    return {
        "mean": values.mean(),
        "std": values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64),
        "min": values.min(),
        "max": values.max(),
        "frac_above_1": (values > 1).double().mean(),
        "frac_below_1": (values < 1).double().mean(),
        "count": torch.tensor(float(values.numel()), dtype=torch.float64),
    }


def step_metrics(rollout: RolloutBatch, update: dict[str, Tensor], *, learning_rate: float, skipped_rows: int,
                 bad_steps: int, resized_rows: int = 0) -> dict[str, Tensor]:
    """Every ``train/*`` scalar of a training step (before the reduction over processes), float32 on the CPU device
    of the rollout."""
    device = rollout.completion_ids.device

    def scalar(value) -> Tensor:
        return torch.as_tensor(value, dtype=torch.float32, device=device).detach().reshape(())

    metrics = {k: scalar(v) for k, v in rollout_metrics(rollout).items()}
    metrics.update({f"sampled/{k}": scalar(v) for k, v in sampled_metrics(rollout).items()})
    metrics.update({k: scalar(v) for k, v in update.items()})
    metrics["bad_steps"] = scalar(float(bad_steps))
    step_time = rollout.timings.get("step", math.nan)
    tokens = rollout.completion_mask.sum().float()
    metrics["completion_tokens_per_second"] = tokens / step_time if step_time > 0 else scalar(math.nan)
    metrics["learning_rate"] = scalar(learning_rate)
    metrics["skipped_rows"] = scalar(float(skipped_rows))
    metrics["resized_rows"] = scalar(float(resized_rows))  # images the data module shrank to fit the prompt limit
    for name in rollout.reward_names:
        metrics[f"reward_errors/{name}"] = scalar(float(rollout.reward_errors.get(name, 0)))
    for phase, seconds in rollout.timings.items():
        metrics[f"time/{phase}"] = scalar(seconds)
    return metrics


def reduce_across_processes(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """One gather for every scalar: min of mins, max of maxes, sum of counts, NaN-mean of the rest. CPU tensors."""
    keys = sorted(metrics)
    stacked = torch.stack([metrics[k].float() for k in keys])  # [M]
    gathered = distributed.gather(stacked).cpu()  # [W, M]: the step's one host sync for its metrics
    out = {}
    for i, key in enumerate(keys):
        column = gathered[:, i]
        if key.endswith("/min"):
            out[key] = column.min()
        elif key.endswith("/max"):
            out[key] = column.max()
        elif key.startswith(SUMMED):
            out[key] = column.sum()
        else:
            out[key] = column.nanmean()
    return out


def source_name(value) -> str:
    """A row's ``source`` as a metric name (a missing or blank one is ``(none)``)."""
    return str(value).strip() if value is not None and str(value).strip() else "(none)"


def metric_key(name: str) -> str:
    """A reward name as a ``ModuleDict`` key (no dots or colons)."""
    return name.replace(".", "_").replace(":", "_")


class ValidationMetrics(nn.Module):
    """Accuracy, total reward and each reward's mean over a validation epoch, exact over processes (torchmetrics);
    and, when the data has a ``source`` column, the accuracy of each source (``val/accuracy/<source>``)."""

    def __init__(self, reward_names: list[str]):
        super().__init__()
        self.reward_names = list(reward_names)
        self.accuracy = MeanMetric()
        self.reward = MeanMetric()
        self.rewards = nn.ModuleDict({metric_key(name): MeanMetric() for name in self.reward_names})
        self.by_source: dict[str, list[float]] = {}  # source -> [correct, rows] of this process

    def update(self, rollout: RolloutBatch) -> None:
        accuracy = row_accuracy(rollout)  # [N]
        self.accuracy.update(accuracy)
        self.reward.update(rollout.rewards)
        for k, name in enumerate(self.reward_names):
            column = rollout.rewards_per_func[:, k]
            if (~column.isnan()).any():
                self.rewards[metric_key(name)].update(column[~column.isnan()])
        sources = rollout.row_columns().get("source")
        if sources is not None:
            for source, value in zip(sources, accuracy.tolist(), strict=True):
                totals = self.by_source.setdefault(source_name(source), [0.0, 0.0])
                totals[0] += value
                totals[1] += 1.0

    def compute(self) -> dict[str, float]:
        """``val/*`` values (every process computes every metric: ``compute`` synchronises), then reset."""
        values = {"val/accuracy": float(self.accuracy.compute()), "val/reward_mean": float(self.reward.compute())}
        for name in self.reward_names:
            value = float(self.rewards[metric_key(name)].compute())
            if not math.isnan(value):
                values[f"val/rewards/{name}/mean"] = value
        values.update(self._source_accuracy())
        for metric in (self.accuracy, self.reward, *self.rewards.values()):
            metric.reset()
        self.by_source = {}
        return values

    def _source_accuracy(self) -> dict[str, float]:
        """``val/accuracy/<source>`` over every process's rows (processes may have seen different sources)."""
        names = sorted({name for seen in distributed.gather_objects(sorted(self.by_source)) for name in seen})
        if not names:
            return {}
        totals = torch.tensor([self.by_source.get(name, [0.0, 0.0]) for name in names], dtype=torch.float64)
        totals = distributed.global_sum(totals.to(self.accuracy.device)).cpu()  # [S, 2]
        return {f"val/accuracy/{name}": correct / rows for name, (correct, rows) in zip(names, totals.tolist())
                if rows > 0}
