"""``AttentionMetrics``: how much generated tokens attend to the image (SPEC section 3).

It records, per layer and generation row, the attention mass on text and on vision keys
(``dapo_lightning.attention.recorders``) either while this project's decoder samples (no
second forward) or in the module's teacher-forced pass over prompt + completion (any
generator), then computes VGR, AEI and the text/vision ratios of every row for the
early/middle/late/all layer segments (``dapo_lightning.attention.metrics``). It attaches to
the rollout (``rollout.annotations``, moved with their groups):

- ``"vgr"``: a :class:`~dapo_lightning.annotations.RowValues`, the value the ``vgr`` and
  ``vgr_hard_negative`` rewards read;
- ``"attention"``: an :class:`~dapo_lightning.attention.AttentionReport` (per-row metrics, skip reasons);
- ``"attention_tokens"``: the :class:`~dapo_lightning.attention.CapturedAttention` (per-token masses, for
  ``TokenWeights``),

and logs ``<stage>/attention/<segment>/{vgr,aei_text,aei_vision,vision_ratio}`` (means over
usable rows) and ``<stage>/attention/skipped/<reason>`` (row counts) for train and val.

After each captured training step it also logs how much signal the ``vgr`` reward (SPEC 2) can
give the batch that was trained on, over every process's rows (:func:`vgr_reward_health`; logged
whether or not that reward is configured):

- ``train/vgr_reward/gate_closed_groups``: the fraction of groups whose VGR values cannot rank them
  (``rewards.vgr.group_statistics`` is None: fewer than 3 usable values or a spread below the IQR
  gate), in which the reward gives every row 0.5 and so no advantage;
- ``train/vgr_reward/accuracy_spearman``: Spearman's rank correlation of VGR and accuracy over the
  rows with a finite VGR (ties take their mean rank); negative when the more image-grounded rows (lower
  VGR) are the correct ones, so the reward agrees with accuracy. Not logged (absent) at a step where it
  is undefined: fewer than two such rows, or all of them equally correct or of equal VGR.

Capture runs on every ``every_n_steps``-th training rollout and on every validation
rollout (``on_validation``), and on every rollout of both stages, extra ones included, when a
configured reward or callback reads what it provides (``pl_module.needed_annotations``: the
``vgr`` rewards, ``TokenWeights``). Remove the callback from ``trainer.callbacks`` to turn all
of this off.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dapo_lightning import distributed
from dapo_lightning.annotations import RowValues
from dapo_lightning.attention import (
    DEFAULT_CHUNK_ELEMENTS,
    SEGMENTS,
    SKIP_REASONS,
    VARIANTS,
    AttentionReport,
    CapturedAttention,
    DecodeRecorder,
    SpecialTokens,
    TeacherForcedRecorder,
    attention_report,
)
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import row_accuracy
from dapo_lightning.rewards.vgr import group_statistics

LOGGED_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")


class VGRRewardHealth(NamedTuple):
    gate_closed_groups: float  # fraction of groups the vgr reward gives 0.5 on every row (NaN without groups)
    accuracy_spearman: float  # rank correlation of VGR and accuracy over rows with a finite VGR (NaN: undefined)


def average_ranks(values: Tensor) -> Tensor:
    """[n] -> [n] float64 ranks from 1, tied values sharing the mean of their positions."""
    ordered, order = values.sort()  # [n]
    _, block, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)  # [n], [U]
    ends = counts.cumsum(0).double()  # [U] the last position of each block of ties
    ranks = torch.empty(values.shape[0], dtype=torch.float64)
    ranks[order] = (ends - (counts.double() - 1) / 2)[block]  # [n]
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` [n] (Pearson's of their average ranks); NaN when fewer than two
    values or either is constant."""
    if x.numel() < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)  # [n]
    dx, dy = rx - rx.mean(), ry - ry.mean()  # [n]
    norm = float((dx.square().sum() * dy.square().sum()).sqrt())
    return float((dx * dy).sum()) / norm if norm > 0 else math.nan


def vgr_reward_health(vgr: Tensor, accuracy: Tensor, num_generations: int) -> VGRRewardHealth:
    """The ``vgr`` reward's gate and its agreement with accuracy over ``vgr``, ``accuracy`` [W, N]: each process's
    N rows are its groups of ``num_generations`` consecutive rows, as the reward sees them (SPEC 2)."""
    G = num_generations
    groups = [row[start : start + G].tolist() for row in vgr for start in range(0, vgr.shape[1] - G + 1, G)]
    closed = sum(group_statistics(group) is None for group in groups)
    vgr, accuracy = vgr.reshape(-1), accuracy.reshape(-1)  # [W * N]
    usable = torch.isfinite(vgr)
    return VGRRewardHealth(closed / len(groups) if groups else math.nan, spearman(vgr[usable], accuracy[usable]))


class AttentionMetrics(RolloutCallback):
    provides = ("vgr", "attention", "attention_tokens")

    def __init__(
        self,
        every_n_steps: int = 1,
        on_validation: bool = True,
        variant: str = "original",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        capture_during_generation: bool = True,
    ):
        """
        Args:
            every_n_steps: Capture every n-th training rollout (every one when a reward or callback needs the values).
            on_validation: Capture validation rollouts too (always when a reward needs the values).
            variant: ``original`` (the original code: head average, sink zeroed, renormalised over prompt keys,
                VGR = text density / vision density) or ``paper`` (per-head normalisation within text and vision
                keys, VGR = vision density / text density; the rewards still read text over vision).
            chunk_elements: Most attention scores recomputed at once per layer (bounds the extra memory).
            capture_during_generation: When this project's decoder samples (``model.rollout.shared_prompt``), capture
                each decode step's row as it is generated, with no second forward; else (and with ``false``) in the
                teacher-forced pass, which works with any generator. Both give the same numbers (tested).
        """
        if every_n_steps < 1:
            raise ValueError(f"AttentionMetrics.every_n_steps: must be >= 1, got {every_n_steps}")
        if variant not in VARIANTS:
            raise ValueError(f"AttentionMetrics.variant: choose from {VARIANTS}, got {variant!r}")
        if chunk_elements < 1:
            raise ValueError(f"AttentionMetrics.chunk_elements: must be >= 1, got {chunk_elements}")
        self.every_n_steps = every_n_steps
        self.on_validation = on_validation
        self.variant = variant
        self.chunk_elements = chunk_elements
        self.capture_during_generation = capture_during_generation
        self.train_rollouts = 0  # training rollouts seen (checkpointed, so every_n_steps survives a resume)
        self._captured_step = False  # whether the latest training step's own rollout was captured
        self._val_totals: torch.Tensor | None = None
        self._special: SpecialTokens | None = None

    # --- when to capture -------------------------------------------------------------------------------

    def forced(self, pl_module) -> bool:
        """Whether a configured reward or callback reads what this callback provides: then every rollout is captured."""
        return bool(set(self.provides) & set(pl_module.needed_annotations))

    def should_capture(self, pl_module, stage: str) -> bool:
        """Whether the step's own rollout of ``stage`` is captured."""
        if self.forced(pl_module):
            return True
        if stage == "train":
            return self.train_rollouts % self.every_n_steps == 0
        return self.on_validation

    def _wants(self, pl_module, stage: str, requested_by: str | None) -> bool:
        # Extra rollouts (dynamic-sampling rounds, probes) are captured only when a reward or callback needs the values.
        return self.forced(pl_module) if requested_by is not None else self.should_capture(pl_module, stage)

    # --- recorders -------------------------------------------------------------------------------------

    def _special_tokens(self, pl_module) -> SpecialTokens:
        if self._special is None:
            self._special = SpecialTokens.from_tokenizer(pl_module.tokenizer)
        return self._special

    def generation_recorder(self, trainer, pl_module, prompts, settings, stage: str,
                            requested_by: str | None) -> DecodeRecorder | None:
        if not (self.capture_during_generation and self._wants(pl_module, stage, requested_by)):
            return None
        return DecodeRecorder(pl_module.policy, self._special_tokens(pl_module),
                              len(prompts) * settings.num_generations, settings.max_new_tokens, variant=self.variant,
                              chunk_elements=self.chunk_elements, device=prompts.input_ids.device,
                              on_finish=self._attach)

    def teacher_forced_recorder(self, trainer, pl_module, rollout) -> TeacherForcedRecorder | None:
        if "attention" in rollout.annotations:
            return None  # this rollout's rows were captured while it was generated
        if not self._wants(pl_module, rollout.stage, rollout.requested_by):
            return None
        return TeacherForcedRecorder(pl_module.policy, self._special_tokens(pl_module), rollout.num_rows,
                                     rollout.completion_ids.shape[1], variant=self.variant,
                                     chunk_elements=self.chunk_elements, device=rollout.completion_ids.device,
                                     on_finish=self._attach)

    @staticmethod
    def _attach(rollout, captured: CapturedAttention) -> None:
        """A recorder's result, attached as the three annotations this callback provides."""
        report = attention_report(captured)
        rollout.annotations["vgr"] = RowValues(report.reward_vgr)
        rollout.annotations["attention"] = report
        rollout.annotations["attention_tokens"] = captured

    def on_rollout_generated(self, trainer, pl_module, rollout) -> None:
        if rollout.stage == "train" and not rollout.is_extra:
            self.train_rollouts += 1
            # the same on every process (captured by rule, not by data): the health's collective runs on all or none
            self._captured_step = "attention" in rollout.annotations
        report = rollout.annotations.get("attention")
        if report is not None and not rollout.is_extra:  # the curves describe the step's own rollouts
            self._log(trainer, pl_module, rollout.stage, report)

    def on_rollout_update_end(self, trainer, pl_module, rollout, result) -> None:
        """The ``vgr`` reward's health over the trained batch (its groups as the loss saw them, replayed ones too)."""
        if rollout.is_extra or not self._captured_step or "vgr" not in rollout.annotations:
            return
        rows = torch.stack([rollout.annotations["vgr"].values.double().to(rollout.completion_ids.device),
                            row_accuracy(rollout).double()])  # [2, N]
        gathered = distributed.gather(rows.to(trainer.strategy.root_device)).cpu()  # [W, 2, N]
        health = vgr_reward_health(gathered[:, 0], gathered[:, 1], rollout.num_generations)
        for name, value in health._asdict().items():
            if not math.isnan(value):  # undefined at this step: not logged
                pl_module.log(f"train/vgr_reward/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    # --- logging ---------------------------------------------------------------------------------
    # Each logged value is a sum over usable rows and a row count (or, for skips, a count alone), reduced over
    # processes in one gather. Training logs every step (every process runs every step); validation accumulates
    # over the epoch and reduces once at its end, since processes may see different numbers of batches.

    @staticmethod
    def metric_names(stage: str) -> list[str]:
        names = [f"{stage}/attention/{segment}/{metric}" for segment in SEGMENTS for metric in LOGGED_METRICS]
        return names + [f"{stage}/attention/skipped/{reason}" for reason in SKIP_REASONS]

    @staticmethod
    def sums_and_counts(report: AttentionReport) -> torch.Tensor:
        """[2, M] float64 in the order of ``metric_names``: sums over usable finite rows and their counts
        (for skip reasons: the number of rows and -1)."""
        usable = report.usable  # [N]
        sums, counts = [], []
        for segment in SEGMENTS:
            for name in LOGGED_METRICS:
                values = getattr(report.segments[segment], name).cpu()  # [N]; NaN for an empty segment
                keep = usable & torch.isfinite(values)
                sums.append(float(values[keep].sum()) if keep.any() else 0.0)
                counts.append(float(keep.sum()))
        skipped = report.skip_counts()
        for reason in SKIP_REASONS:
            sums.append(float(skipped[reason]))
            counts.append(-1.0)
        return torch.tensor([sums, counts], dtype=torch.float64)

    def _log(self, trainer, pl_module, stage: str, report: AttentionReport) -> None:
        totals = self.sums_and_counts(report)  # [2, M]
        if stage == "train":
            self._emit(trainer, pl_module, stage, totals, on_step=True)
        else:
            self._val_totals = totals if self._val_totals is None else self._val_totals + totals

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_totals = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not (self.on_validation or self.forced(pl_module)):
            return
        totals = self._val_totals if self._val_totals is not None else torch.zeros(2, len(self.metric_names("val")))
        if self._val_totals is None:
            totals[1, -len(SKIP_REASONS) :] = -1.0
        self._val_totals = None
        self._emit(trainer, pl_module, "val", totals, on_step=False)

    def _emit(self, trainer, pl_module, stage: str, totals: torch.Tensor, *, on_step: bool) -> None:
        # one gather for every value: exact means over all processes' rows (the identity on one process)
        gathered = distributed.gather(totals.to(trainer.strategy.root_device)).cpu()  # [W, 2, M]
        totals = torch.stack([gathered[:, 0].sum(0), torch.where(totals[1] < 0, totals[1], gathered[:, 1].sum(0))])
        for key, total, count in zip(self.metric_names(stage), *totals.tolist(), strict=True):
            if count < 0:  # a count of rows
                pl_module.log(key, total, on_step=on_step, on_epoch=not on_step, batch_size=1)
            elif count > 0:  # a mean over rows (segments without layers have none)
                pl_module.log(key, total / count, on_step=on_step, on_epoch=not on_step, batch_size=1)

    # --- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"train_rollouts": self.train_rollouts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_rollouts = int(state_dict.get("train_rollouts", 0))


__all__ = ["AttentionMetrics", "LOGGED_METRICS", "VGRRewardHealth", "spearman", "vgr_reward_health"]
