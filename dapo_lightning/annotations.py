"""Per-row annotations: what callbacks attach to a rollout, moved with their groups.

A callback that computes something per completion (the attention statistics, a VGR
value for the rewards) attaches it to ``RolloutBatch.annotations`` under the name it
declares in ``provides``. Every annotation holds one entry per row and knows how to
take rows (``select``), how to join the annotations of several rollouts (``concat``),
and what a row without a value looks like (``blank``), so the replay buffer and dynamic
sampling carry it with its group: a group never arrives without its annotations, and
an annotation never describes another group's rows.

:class:`RowValues` is the plain kind: one number per row. The rewards receive every
``RowValues`` annotation under its name as a list of floats (TRL's keyword convention:
``vgr`` for the ``vgr`` reward); richer annotations (``attention``, ``attention_tokens``)
are read by callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor

A = TypeVar("A", bound="Annotation")


class Annotation(Protocol):
    """One entry per row of a rollout; the operations that let it travel with its groups."""

    @property
    def num_rows(self) -> int:
        """N, the rows it describes."""
        ...

    def select(self: A, rows: Tensor) -> A:
        """The annotation of ``rows`` [n] (rollout row indices, in order, repeats allowed)."""
        ...

    def blank(self: A, num_rows: int) -> A:
        """An annotation of the same kind for ``num_rows`` rows that have no value (e.g. NaN, "not captured")."""
        ...

    @classmethod
    def concat(cls: type[A], parts: Sequence[A]) -> A:
        """The parts' rows one after another (the parts are of this kind)."""
        ...


@dataclass(frozen=True)
class RowValues:
    """One number per row (NaN: no value); the rewards read it under its name as a list of floats."""

    values: Tensor  # [N] float64

    def __post_init__(self) -> None:
        values = torch.as_tensor(
            [math.nan if v is None else float(v) for v in self.values]
            if not isinstance(self.values, Tensor) else self.values,
            dtype=torch.float64,
        )
        if values.dim() != 1:
            raise ValueError(f"RowValues: one value per row, got shape {tuple(values.shape)}")
        object.__setattr__(self, "values", values)

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    def select(self, rows: Tensor) -> RowValues:
        return RowValues(self.values.index_select(0, rows.to(self.values.device)))

    def blank(self, num_rows: int) -> RowValues:
        return RowValues(torch.full((num_rows,), math.nan, dtype=torch.float64, device=self.values.device))

    @classmethod
    def concat(cls, parts: Sequence[RowValues]) -> RowValues:
        device = parts[0].values.device
        return cls(torch.cat([p.values.to(device) for p in parts]))

    def tolist(self) -> list[float]:
        """The values as the rewards receive them."""
        return self.values.tolist()


def select_all(annotations: dict[str, Annotation], rows: Tensor) -> dict[str, Annotation]:
    """Every annotation cut to ``rows`` [n]."""
    return {name: annotation.select(rows) for name, annotation in annotations.items()}


def concat_all(parts: Sequence[dict[str, Annotation]], sizes: Sequence[int]) -> dict[str, Annotation]:
    """Join the annotations of consecutive row blocks (``sizes[i]`` rows each); a block without one gets a blank."""
    out = {}
    for name in dict.fromkeys(name for part in parts for name in part):
        like = next(part[name] for part in parts if name in part)
        blocks = [part[name] if name in part else like.blank(size) for part, size in zip(parts, sizes, strict=True)]
        out[name] = type(like).concat(blocks)
    return out
