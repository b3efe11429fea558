"""Preference shaping within correct answers (SPEC section 9): which completions are paired, the term over one
update, and its set-up checks.

Among a group's correct completions (the ``accuracy`` reward's column equal to 1) that have
a usable VGR (finite; smaller = more attention on the image), the i-th most grounded is
paired with the i-th least grounded, for i = 1 .. K with K = min(``pairs_per_group``,
floor(n / 2)), so no row is in two pairs. A pair whose two VGR values are equal states no
preference and is dropped. Pairs are made in the update, on the rollout that is trained:
replayed groups and the groups dynamic sampling kept carry their rewards and ``vgr``
annotation with them (``groups.py``).

The loss of a pair is ``loss.preference_pair_loss`` of the rows' sequence log-ratios d. A
pair's rows may be trained in different micro-batches or optimizer steps, so each row's
backward carries a linear surrogate ``c_i * d_i`` (``loss.preference_surrogate``), c_i the pair
loss's derivative with respect to d_i at the optimizer step's parameters (:class:`PreferenceTerm`);
``update.py`` measures the d it needs and normalises by the step's pairs over all processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dapo_lightning.batch import RolloutBatch
from dapo_lightning.loss import PreferenceSettings, preference_coefficients, preference_pair_loss, preference_surrogate
from dapo_lightning.rewards.vgr import PROVIDER

KEY = "model.loss.preference_weight"


@dataclass(frozen=True)
class Pairs:
    """The preference pairs of one rollout, by row (each row in at most one pair)."""

    top: tuple[int, ...]  # [M] the more grounded completion of each pair (smaller VGR)
    bottom: tuple[int, ...]  # [M] its less grounded partner, in the same group

    def __len__(self) -> int:
        return len(self.top)

    def rows(self) -> set[int]:
        """Every row in a pair."""
        return set(self.top) | set(self.bottom)


def pair_rows(correct: Sequence[bool], vgr: Sequence[float], num_generations: int, pairs_per_group: int) -> Pairs:
    """Pair each group's most grounded correct completions with its least grounded ones (see the module docstring).

    ``correct`` and ``vgr`` have one entry per row; rows ``g*G .. g*G+G-1`` are group g. A
    non-finite VGR leaves its row out; rows after the last whole group are left out. Equal VGR
    values keep row order (the sort is stable), so the pairs do not depend on anything else.
    """
    if len(correct) != len(vgr):
        raise ValueError(f"pair_rows: {len(correct)} accuracy values but {len(vgr)} VGR values")
    G = int(num_generations)
    top, bottom = [], []
    for start in range(0, len(vgr) - G + 1, G):
        candidates = [r for r in range(start, start + G) if correct[r] and math.isfinite(float(vgr[r]))]
        ranked = sorted(candidates, key=lambda r: float(vgr[r]))  # most grounded first
        n = len(ranked)
        for i in range(min(pairs_per_group, n // 2)):
            best, worst = ranked[i], ranked[n - 1 - i]
            if float(vgr[best]) < float(vgr[worst]):  # equal values state no preference
                top.append(best)
                bottom.append(worst)
    return Pairs(tuple(top), tuple(bottom))


def rollout_pairs(rollout: RolloutBatch, pairs_per_group: int, eligible: Sequence[bool] | None = None) -> Pairs:
    """The pairs of a scored rollout: its ``accuracy`` column and its ``vgr`` annotation (one host sync).

    ``eligible`` [N] leaves rows out (truncated completions when they are masked from the loss).
    A rollout without a ``vgr`` annotation has no pairs.
    """
    if "accuracy" not in rollout.reward_names:
        raise ValueError(f"{KEY}: the preference term pairs correct completions; add the accuracy reward to "
                         f"model.rewards.reward_funcs (got {', '.join(rollout.reward_names)})")
    annotation = rollout.annotations.get("vgr")
    if annotation is None:
        return Pairs((), ())
    accuracy = rollout.rewards_per_func[:, rollout.reward_names.index("accuracy")].tolist()  # [N], NaN: no value
    correct = [a == 1.0 and (eligible is None or bool(e))
               for a, e in zip(accuracy, eligible if eligible is not None else accuracy, strict=True)]
    return pair_rows(correct, annotation.tolist(), rollout.num_generations, pairs_per_group)


# --- the term over one update -------------------------------------------------------------------------


@dataclass
class PreferenceTerm:
    """The preference term over one update: the rollout's pairs, and each paired row's d in the first pass."""

    settings: PreferenceSettings
    top: Tensor  # [M] the more grounded row of each pair
    bottom: Tensor  # [M] its partner
    partner: dict[int, int]  # row -> the other row of its pair
    fresh: set[int]  # rows the current policy sampled (not replayed)
    d_first: Tensor  # [N] float32: each paired row's d from its forward in the first pass (0 elsewhere)

    @classmethod
    def of(cls, rollout: RolloutBatch, settings: PreferenceSettings | None,
           kept: Tensor | None) -> PreferenceTerm | None:
        """The term of a scored rollout (None when ``settings`` is None: off); ``kept`` [N] rows in the loss."""
        if settings is None:
            return None
        pairs = rollout_pairs(rollout, settings.pairs_per_group, None if kept is None else kept.tolist())
        device = rollout.completion_ids.device
        replayed = set() if rollout.replayed is None else set(rollout.replayed.nonzero().flatten().tolist())
        return cls(settings=settings, top=torch.tensor(pairs.top, dtype=torch.long, device=device),
                   bottom=torch.tensor(pairs.bottom, dtype=torch.long, device=device),
                   partner={**dict(zip(pairs.top, pairs.bottom)), **dict(zip(pairs.bottom, pairs.top))},
                   fresh=set(range(rollout.num_rows)) - replayed,
                   d_first=torch.zeros(rollout.num_rows, dtype=torch.float32, device=device))

    def rows_to_measure(self, rows: Sequence[int], *, first_step: bool, stored_old: bool) -> list[int]:
        """The rows of the pairs of ``rows`` (an optimizer step's) whose d at the step's parameters is not known.

        d is 0 where the policy is the one that sampled: always without stored old log-probs (the
        loss's old log-probs are then the current ones, detached), and at the rollout's first
        optimizer step for the rows it sampled. Replayed rows, and every row at a later step, are measured.
        """
        if not stored_old:
            return []
        paired = [r for r in rows if r in self.partner]
        rows_of_pairs = sorted({*paired, *(self.partner[r] for r in paired)})
        return [r for r in rows_of_pairs if not (first_step and r in self.fresh)]

    def coefficients(self, d: Tensor, rows: Sequence[int]) -> Tensor:
        """[N] each of ``rows``' derivative of its pair's loss with respect to its d, ``d`` [N] holding the d of every
        row of their pairs; 0 for rows in no pair and outside ``rows`` (a partner there gets its own in its step)."""
        s = self.settings
        coefficients = preference_coefficients(d, self.top, self.bottom, s.beta, s.margin)  # [N]
        in_step = torch.zeros_like(coefficients, dtype=torch.bool)  # [N]
        in_step[list(rows)] = True
        return torch.where(in_step, coefficients, torch.zeros_like(coefficients))  # [N]

    def surrogate(self, rows: Sequence[int], d: Tensor, coefficients: Tensor, normalizer: Tensor, *,
                  first_pass: bool) -> Tensor:
        """A micro-batch's share of the term (``loss.preference_surrogate``), ``d`` [n] its rows' d with gradients;
        the first pass keeps them for :meth:`metrics`."""
        index = torch.tensor(list(rows), device=coefficients.device)  # [n]
        if first_pass:
            self.d_first.index_copy_(0, index, d.detach().float())
        return preference_surrogate(d, coefficients[index].to(d.dtype), self.settings.weight, normalizer)

    def metrics(self, pairs_over_processes: Tensor) -> dict[str, Tensor]:
        """``pairs`` (this process's, summed over processes when logged), ``loss`` (weight x the mean pair loss) and
        ``margin`` (the mean beta (d_top - d_bottom)) of the first pass, each sum divided by the pairs of all
        processes / W, so that the mean over processes is the mean over every pair (no pairs: loss 0, margin NaN)."""
        s = self.settings
        d_top, d_bottom = self.d_first[self.top], self.d_first[self.bottom]  # [M]
        count = torch.as_tensor(pairs_over_processes, dtype=torch.float32, device=self.d_first.device)
        per = count.clamp(min=1e-8)
        losses = preference_pair_loss(d_top, d_bottom, s.beta, s.margin)  # [M]
        return {"pairs": torch.tensor(float(len(self.top)), device=count.device),
                "loss": torch.where(count > 0, s.weight * losses.sum() / per, torch.zeros_like(count)),
                "margin": torch.where(count > 0, (s.beta * (d_top - d_bottom)).sum() / per,
                                      torch.full_like(count, math.nan))}


# --- set-up checks ------------------------------------------------------------------------------------


def check_rewards(weight: float, reward_names: Sequence[str]) -> None:
    """Before anything loads: the term is off, or the ``accuracy`` reward (which rows are correct) is configured."""
    if weight > 0 and "accuracy" not in reward_names:
        raise ValueError(f"{KEY}: {weight} needs the accuracy reward in model.rewards.reward_funcs (the preference "
                         f"term pairs correct completions); got [{', '.join(reward_names)}]")


def needed_annotations(weight: float, callbacks: Sequence[Any]) -> frozenset[str]:
    """The annotations the term reads (``vgr`` when it is on), after checking that a callback provides them.

    Added to the module's ``needed_annotations`` so the provider records every training rollout.
    """
    if weight <= 0:
        return frozenset()
    provided = {name for callback in callbacks for name in getattr(callback, "provides", ())}
    if "vgr" not in provided:
        raise ValueError(f"{KEY}: {weight} needs per-sample vgr values that no callback provides; add {PROVIDER} to "
                         "trainer.callbacks (or set it to 0)")
    return frozenset({"vgr"})
