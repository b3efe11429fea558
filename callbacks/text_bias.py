"""``TextBiasMetrics``: whether validation answers follow a text cue or the image (docs/text_bias.md).

Made for the text-bias task (``python -m dapo_lightning.data_prep text-bias``), whose held-out
rows carry ``source``, their split (``aligned``: the question's caption names the right option,
``conflict``: it names a wrong one, ``no_cue``: there is no caption), and ``cue``, the letter of
the option the caption names ("" without one). At the end of each validation epoch it logs:

- ``val/text_reliance``: on the ``conflict`` rows, the fraction of answers that pick the cue's
  option. The answer is read by the accuracy reward's rules (``rewards.accuracy.extract_answer``);
  a completion with no answer counts as not following the cue. 1: the text decides, 0: it never does;
- ``val/vgr/<split>``: the mean over the split's rows of the ``vgr`` value ``AttentionMetrics``
  attaches (what the ``vgr`` rewards read: text attention density over image density, smaller is
  more grounded), rows without a finite value left out; logged only when ``AttentionMetrics``
  captured the validation rollouts (its ``on_validation``, the default).

Accuracy per split is the module's own ``val/accuracy/<source>`` (``metrics.ValidationMetrics``)
and dependence on the picture is ``ModalityProbe``'s ``val/probe/visual_reliance``; this callback
does not repeat them. Sums and row counts are kept over the epoch's batches and summed over
processes at its end, so the numbers are exact over the held-out set. Extra rollouts (the probe's
variants) are left out. A validation set without a ``cue`` or ``source`` column is refused at
set-up, before the model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dapo_lightning import distributed
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import source_name
from dapo_lightning.rewards.accuracy import extract_answer, normalize_letter
from dapo_lightning.rewards.completions import completion_text

CUE, SPLIT = "cue", "source"  # the held-out file's columns (data_prep/text_bias.py)
CONFLICT = "conflict"  # the split whose cue names a wrong option


@dataclass(frozen=True)
class TextBiasRows:
    """Per row of a validation rollout: what the text-bias numbers are made of (one entry per completion)."""

    splits: list[str]  # [N] the row's ``source``
    picks_cue: Tensor  # [N] float64: 1 the answer is the cue's option, 0 it is not, NaN the row has no cue
    vgr: Tensor  # [N] float64: the row's ``vgr`` annotation, NaN without one


def missing_columns(columns) -> list[str]:
    return [name for name in (CUE, SPLIT) if name not in columns]


def refusal(missing: list[str], where: str) -> ValueError:
    return ValueError(f"TextBiasMetrics: the validation set{where} has no {' or '.join(repr(m) for m in missing)} "
                      "column; it needs the text-bias task's held-out file (python -m dapo_lightning.data_prep "
                      "text-bias, or data.build_synthetic_if_missing with task: text_bias) as data.eval_path")


def picks_cue(completion, cue) -> float:
    """1.0 when the completion's answer is the cue's letter, 0.0 when it is not (or has none), NaN without a cue."""
    cue = normalize_letter(str(cue or ""))
    if not cue:
        return math.nan
    return 1.0 if extract_answer(completion_text(completion)) == cue else 0.0


def text_bias_rows(rollout) -> TextBiasRows:
    """The rollout's rows as ``TextBiasRows``; a ``ValueError`` naming the column if ``cue`` or ``source`` is missing."""
    columns = rollout.row_columns()
    missing = missing_columns(columns)
    if missing:
        raise refusal(missing, "")
    values = [picks_cue(text, cue) for text, cue in zip(rollout.completions, columns[CUE], strict=True)]
    annotation = rollout.annotations.get("vgr")  # absent when AttentionMetrics did not capture this rollout
    vgr = torch.full((rollout.num_rows,), math.nan, dtype=torch.float64) if annotation is None else \
        annotation.values.detach().double().cpu()
    return TextBiasRows([source_name(s) for s in columns[SPLIT]], torch.tensor(values, dtype=torch.float64), vgr)


def held_out_columns(trainer, stage: str) -> tuple[list[str], str] | None:
    """The column names of the questions ``stage`` validates and where they come from; None when unknown here
    (a data module other than ``VisualMCQDataModule``: the first validation rollout is checked instead)."""
    data = getattr(trainer, "datamodule", None)
    if stage == "test":  # test_path's questions, else the validation ones (VisualMCQDataModule.setup)
        scored = getattr(data, "scored", None)
        table, source = getattr(scored, "table", None), getattr(scored, "source", "")
    elif stage in ("fit", "validate"):
        table, source = getattr(data, "eval_table", None), getattr(data, "eval_source", "")
    else:
        return None
    names = getattr(table, "column_names", None)
    return (list(names), str(source)) if names is not None else None


class TextBiasMetrics(RolloutCallback):
    """``val/text_reliance`` and ``val/vgr/<split>`` over the text-bias task's held-out splits (module docstring)."""

    def __init__(self):
        super().__init__()
        self._conflict = torch.zeros(2, dtype=torch.float64)  # (answers picking the cue, conflict rows) of this process
        self._vgr: dict[str, list[float]] = {}  # split -> [sum of finite VGR, rows with one] of this process
        self.last: dict[str, float] = {}  # the latest epoch's values

    def setup(self, trainer, pl_module, stage: str) -> None:
        found = held_out_columns(trainer, stage)
        if found is not None and missing_columns(found[0]):
            raise refusal(missing_columns(found[0]), f" {found[1]}" if found[1] else "")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._conflict.zero_()
        self._vgr = {}

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        # the module's own validation rollouts; predict's rollouts are validation ones too, but no epoch end reports them
        if rollout.stage != "val" or rollout.is_extra or getattr(trainer, "predicting", False):
            return
        rows = text_bias_rows(rollout)
        conflict = torch.tensor([split == CONFLICT for split in rows.splits]) & ~rows.picks_cue.isnan()  # [N]
        self._conflict += torch.stack([rows.picks_cue[conflict].sum(), conflict.sum().double()])
        finite = torch.isfinite(rows.vgr)  # [N]
        for i, split in enumerate(rows.splits):
            totals = self._vgr.setdefault(split, [0.0, 0.0])
            if finite[i]:
                totals[0] += float(rows.vgr[i])
                totals[1] += 1.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # every process calls both collectives, in the same order (processes may have seen different splits)
        names = sorted({name for seen in distributed.gather_objects(sorted(self._vgr)) for name in seen})
        totals = torch.cat([self._conflict[None], torch.tensor([self._vgr.get(n, [0.0, 0.0]) for n in names],
                                                               dtype=torch.float64).reshape(-1, 2)])  # [1 + S, 2]
        totals = distributed.global_sum(totals.to(trainer.strategy.root_device)).cpu()
        values = {}
        followed, conflict_rows = totals[0].tolist()
        if conflict_rows > 0:
            values["val/text_reliance"] = followed / conflict_rows
        for name, (vgr_sum, vgr_rows) in zip(names, totals[1:].tolist()):
            if vgr_rows > 0:
                values[f"val/vgr/{name}"] = vgr_sum / vgr_rows
        self.last = values
        if values:
            summary = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in values.items())
            rank_zero_info(f"[text bias] step {trainer.global_step}: {summary}")
        if not trainer.sanity_checking and values:
            pl_module.log_dict(values, sync_dist=False, rank_zero_only=False)


__all__ = ["TextBiasMetrics", "TextBiasRows", "picks_cue", "text_bias_rows"]
