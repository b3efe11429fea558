"""Unusable rows dropped with ``data.on_bad_row=skip``: counted per stage and kind, summarised once an epoch.

The collator drops such rows and lists them in the batch (``PromptBatch.skipped``); it may run
in DataLoader worker processes, so the counting happens where every batch arrives, in the
trainer's process (``VisualMCQDataModule.on_before_batch_transfer``), and each epoch's tally is
reported by ``VisualMCQDataModule.report_skipped_rows``, summed over processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from dapo_lightning import distributed
from dapo_lightning.data import rows as mcq

OTHER = "other"  # a BadRow kind that is not one of rows.KINDS
_ORDER = (*mcq.KINDS, OTHER)


class SkippedRows:
    """Rows skipped since the last ``take``, per stage ("train", "val"): counts by kind and the first message."""

    def __init__(self):
        self._counts: dict[str, Counter] = {}
        self._first: dict[str, str] = {}

    def add(self, stage: str, dropped: Sequence[mcq.BadRow]) -> None:
        counts = self._counts.setdefault(stage, Counter())
        for error in dropped:
            counts[error.kind if error.kind in mcq.KINDS else OTHER] += 1
            self._first.setdefault(stage, str(error))

    def take(self, stage: str) -> tuple[dict[str, int], str | None]:
        """(rows per kind, the first one's message) of ``stage`` since the last call; counting starts again."""
        return dict(self._counts.pop(stage, {})), self._first.pop(stage, None)


def summed_over_processes(counts: dict[str, int], device: torch.device | str) -> dict[str, int]:
    """``counts`` summed over every process (a collective: every process calls it; one all-reduce)."""
    local = torch.tensor([float(counts.get(kind, 0)) for kind in _ORDER], device=device)  # [kinds]
    total = distributed.global_sum(local).tolist()
    return {kind: int(n) for kind, n in zip(_ORDER, total) if n}


def summary(stage: str, epoch: int, counts: dict[str, int], first: str | None) -> str | None:
    """The epoch's one line about skipped rows, or None when none was skipped.

    ``"val epoch 2: 3 unusable rows skipped (data.on_bad_row=skip): 2 solution not a letter, 1 unreadable image;
    the first: a.parquet: row 1: ...; python -m dapo_lightning.data_prep validate lists every unusable row"``
    """
    total = sum(counts.values())
    if not total:
        return None
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    rows = f"{total} unusable row{'s' if total > 1 else ''}"
    line = f"{stage} epoch {epoch}: {rows} skipped (data.on_bad_row=skip): {kinds}"
    if first is not None:
        line += f"; the first: {first}"
    return line + "; python -m dapo_lightning.data_prep validate lists every unusable row"


__all__ = ["SkippedRows", "summary", "summed_over_processes"]
