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

Capture runs on every ``every_n_steps``-th training rollout and on every validation
rollout (``on_validation``), and on every rollout of both stages, extra ones included, when a
configured reward or callback reads what it provides (``pl_module.needed_annotations``: the
``vgr`` rewards, ``TokenWeights``). Remove the callback from ``trainer.callbacks`` to turn all
of this off.
"""

from __future__ import annotations

from typing import Any

import torch

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

LOGGED_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")


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
        report = rollout.annotations.get("attention")
        if report is not None and not rollout.is_extra:  # the curves describe the step's own rollouts
            self._log(trainer, pl_module, rollout.stage, report)

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


__all__ = ["AttentionMetrics", "LOGGED_METRICS"]
