"""Non-finite values found before they reach the weights: which tensor, which rows.

``DAPOModule.update`` checks, in order, every tensor a step's update is made of:

- the rewards, as each reward function returned them (``None`` means "no value" and is
  not a fault; a returned NaN or inf is), found while scoring (``scoring.py``);
- the total rewards, the advantages, the token weights, the sampling and reference
  log-probs of the rollout (valid completion tokens only);
- the log-probs and the loss of each micro-batch;
- the gradients, after the backward passes and before clipping.

A step with any fault is skipped (see ``DAPOModule.update`` for what that means) and
each fault is logged with the rows it was found in. The functions here are pure: they
take tensors and return :class:`Fault` records, or nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

SHOWN = 8  # rows or parameter names listed in a message


@dataclass(frozen=True)
class Fault:
    """A NaN or inf in ``tensor``: at rollout ``rows`` (prompts ``dataset_rows``), or in the gradients of ``names``."""

    tensor: str
    rows: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    dataset_rows: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line: the tensor, then its rows (and the dataset rows of their prompts) or its parameters."""
        if self.names:
            return f"{self.tensor} of {_listing(self.names)}"
        text = f"{self.tensor} at rows {_listing(self.rows)}"
        return text + (f" (dataset rows {_listing(self.dataset_rows)})" if self.dataset_rows else "")

    def located(self, index: Sequence[int], num_generations: int) -> Fault:
        """This fault with the dataset rows of its rows' prompts (``index`` [B]: dataset row of each prompt)."""
        if not index or not self.rows:
            return self
        prompts = sorted({int(index[r // num_generations]) for r in self.rows if r // num_generations < len(index)})
        return replace(self, dataset_rows=tuple(prompts))


def _listing(items: Sequence) -> str:
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return f"[{shown}{f', ... {len(items) - SHOWN} more' if len(items) > SHOWN else ''}]"


def nonfinite_rows(values: Tensor, mask: Tensor | None = None) -> list[int]:
    """Indices of the rows of ``values`` [N, ...] holding a NaN or inf, counting only where ``mask`` is set."""
    if values.numel() == 0:
        return []
    bad = ~torch.isfinite(values)  # [N, ...]
    if mask is not None:
        bad = bad & mask.bool()
    return bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()


def row_fault(name: str, values: Tensor | None, mask: Tensor | None = None, rows: Sequence[int] | None = None) -> list[Fault]:
    """``[Fault(name, rows)]`` when ``values`` has non-finite rows, else ``[]``; ``rows`` maps local to rollout rows."""
    if values is None:
        return []
    if mask is not None and mask.dim() < values.dim():
        mask = mask.reshape(*mask.shape, *([1] * (values.dim() - mask.dim())))
    if mask is not None:
        width = min(values.shape[1], mask.shape[1]) if values.dim() > 1 else None
        if width is not None:
            values, mask = values[:, :width], mask[:, :width]
    bad = nonfinite_rows(values, mask)
    if not bad:
        return []
    return [Fault(name, tuple(rows[i] for i in bad) if rows is not None else tuple(bad))]


def rollout_faults(rollout) -> list[Fault]:
    """Non-finite rewards, advantages, token weights and sampling/reference log-probs of a scored rollout."""
    mask = rollout.completion_mask
    faults = []
    faults += row_fault("rewards", rollout.rewards)
    faults += row_fault("advantages", rollout.advantages)
    faults += row_fault("token_weights", rollout.token_weights, mask)
    faults += row_fault("old_logps", rollout.old_logps, mask)
    faults += row_fault("ref_logps", rollout.ref_logps, mask)
    return [f.located(rollout.prompts.index, rollout.num_generations) for f in faults]


def gradient_fault(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> Fault | None:
    """``Fault("gradients", names=...)`` naming the parameters whose gradient holds a NaN or inf, or None.

    One norm per gradient (no copy) and a single device synchronisation. A gradient so large
    that its float32 norm overflows counts too (clipping could not rescue it). Parameters
    without a gradient (frozen, or partitioned away by ZeRO) are not checked.
    """
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for _, g in named])  # [P]
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return Fault("gradients", names=tuple(named[i][0] for i in (~finite).nonzero().flatten().tolist()))
