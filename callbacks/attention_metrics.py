"""``AttentionMetrics``: how much generated tokens attend to the image (SPEC section 3).

During the module's teacher-forced pass over prompt + completion it captures, per layer
and generation row, the attention mass on text and on vision keys
(``dapo_lightning.attention_capture``), then computes VGR, AEI and the text/vision
ratios of every row for the early/middle/late/all layer segments
(``dapo_lightning.attention``). It attaches to the rollout:

- ``extras["vgr"]``: [N] floats, the value the ``vgr`` and ``vgr_hard_negative`` rewards read;
- ``extras["attention"]``: an :class:`~dapo_lightning.attention.AttentionReport` (per-row metrics, skip reasons);
- ``extras["attention_tokens"]``: the :class:`~dapo_lightning.attention.CapturedAttention` (per-token masses, for
  ``TokenWeights``),

and logs ``<stage>/attention/<segment>/{vgr,aei_text,aei_vision,vision_ratio}`` (means over
usable rows) and ``<stage>/attention/skipped/<reason>`` (row counts) for train and val.

Capture runs on every ``every_n_steps``-th training rollout and on every validation
rollout (``on_validation``), and on every rollout of both stages when a configured
reward or callback needs its values (the ``vgr`` rewards, ``TokenWeights``).
Remove the callback from ``trainer.callbacks`` to turn all of this off.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback

from dapo_lightning.attention import SEGMENTS, SKIP_REASONS, VARIANTS, SpecialTokens, attention_report
from dapo_lightning.attention_capture import DEFAULT_CHUNK_ELEMENTS, AttentionCapture

LOGGED_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")


class AttentionMetrics(Callback):
    needs_old_logps = False
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
        self.forced_by: list[str] = []  # what needs a capture on every rollout
        self.train_rollouts = 0  # training rollouts seen (checkpointed, so every_n_steps survives a resume)
        self._pending: tuple[Any, AttentionCapture] | None = None
        self._val_totals: torch.Tensor | None = None
        self._special: SpecialTokens | None = None

    # --- set-up ----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.forced_by = []
        specs = getattr(pl_module, "reward_specs", [])
        names = [spec.name for spec in specs]
        for spec in specs:
            if any(key in self.provides for key in spec.needs):
                self.forced_by.append(f"reward {spec.name}")
        for callback in trainer.callbacks:
            needs = getattr(callback, "needs", ())
            if callback is not self and any(key in self.provides for key in needs):
                self.forced_by.append(type(callback).__name__)
        if "vgr_hard_negative" in names and "accuracy" not in names[: names.index("vgr_hard_negative")]:
            raise ValueError(
                "model.rewards.reward_funcs: vgr_hard_negative reads each row's accuracy; "
                "list the accuracy reward before it"
            )
        if "vgr" in names:
            later = [n for n in names[names.index("vgr") + 1 :] if "vgr" in _needs(specs, n)]
            if later:
                raise ValueError(
                    f"model.rewards.reward_funcs: {later[0]!r} is listed after 'vgr', whose output replaces the "
                    "per-sample VGR under the same keyword; list only one of vgr and vgr_hard_negative "
                    "(SPEC 2 uses one or the other)"
                )

    @property
    def forced(self) -> bool:
        return bool(self.forced_by)

    def should_capture(self, stage: str) -> bool:
        if self.forced:
            return True
        if stage == "train":
            return self.train_rollouts % self.every_n_steps == 0
        return self.on_validation

    # --- hooks -----------------------------------------------------------------------------------

    def _wants(self, stage: str, tag: str | None) -> bool:
        # Extra rollouts (dynamic-sampling rounds, probes: ``tag``) are captured only when a reward needs VGR.
        return self.forced if tag is not None else self.should_capture(stage)

    def _new_capture(self, pl_module, num_rows: int, width: int, device) -> AttentionCapture:
        if self._special is None:
            self._special = SpecialTokens.from_tokenizer(pl_module.tokenizer)
        return AttentionCapture(
            pl_module.policy,
            self._special,
            num_rows,
            width,
            variant=self.variant,
            chunk_elements=self.chunk_elements,
            device=device,
        )

    def generation_capture(self, trainer, pl_module, prompts, settings, stage: str, tag: str | None):
        if not (self.capture_during_generation and self._wants(stage, tag)):
            return None
        capture = self._new_capture(
            pl_module, len(prompts) * settings.num_generations, settings.max_new_tokens, prompts.input_ids.device
        )
        self._pending = ("generation", capture)
        return capture

    def teacher_forced_capture(self, trainer, pl_module, rollout) -> AttentionCapture | None:
        if self._pending is not None and self._pending[0] == "generation":
            return None  # this rollout's rows were captured while it was generated
        if not self._wants(rollout.stage, rollout.tag):
            return None
        capture = self._new_capture(pl_module, rollout.num_rows, rollout.completion_ids.shape[1],
                                    rollout.completion_ids.device)
        self._pending = (rollout, capture)
        return capture

    def on_rollout_generated(self, trainer, pl_module, rollout) -> None:
        pending, self._pending = self._pending, None
        if rollout.stage == "train" and rollout.tag is None:
            self.train_rollouts += 1
        if pending is None:
            return
        owner, capture = pending
        if owner == "generation":
            capture.finish_generation(rollout.completion_mask)
        elif owner is not rollout:
            return
        if capture.result is None:
            return
        captured = capture.result
        report = attention_report(captured)
        rollout.extras["vgr"] = report.reward_vgr.tolist()
        rollout.extras["attention"] = report
        rollout.extras["attention_tokens"] = captured
        if rollout.tag is None:  # the curves describe the step's own rollouts, not extra rounds or probe variants
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
    def sums_and_counts(report) -> torch.Tensor:
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

    def _log(self, trainer, pl_module, stage: str, report) -> None:
        totals = self.sums_and_counts(report)  # [2, M]
        if stage == "train":
            self._emit(trainer, pl_module, stage, totals, on_step=True)
        else:
            self._val_totals = totals if self._val_totals is None else self._val_totals + totals

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_totals = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not (self.on_validation or self.forced):
            return
        totals = self._val_totals if self._val_totals is not None else torch.zeros(2, len(self.metric_names("val")))
        if self._val_totals is None:
            totals[1, -len(SKIP_REASONS) :] = -1.0
        self._val_totals = None
        self._emit(trainer, pl_module, "val", totals, on_step=False)

    def _emit(self, trainer, pl_module, stage: str, totals: torch.Tensor, *, on_step: bool) -> None:
        if trainer.world_size > 1:  # one gather for every value: exact means over all processes' rows
            gathered = pl_module.all_gather(totals.to(pl_module.device)).cpu()  # [W, 2, M]
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


def _needs(specs, name: str) -> tuple[str, ...]:
    for spec in specs:
        if spec.name == name:
            return spec.needs
    return ()


__all__ = ["AttentionMetrics", "LOGGED_METRICS"]
