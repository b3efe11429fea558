"""Non-finite values found before they reach the weights: which tensor, which rows.

``update.py`` checks, in order, every tensor a step's update is made of:

- the rewards, as each reward function returned them (``None`` means "no value" and is
  not a fault; a returned NaN or inf is), found while scoring (``scoring.py``);
- the total rewards, the advantages, the token weights, the sampling and reference
  log-probs of the rollout (valid completion tokens only);
- the log-probs and the loss of each micro-batch;
- the gradients, after the backward passes and before clipping.

A step with any fault is skipped (see ``update.py`` for what that means) and each fault is
logged with the rows it was found in and the parquet file and row of their questions
(``PromptBatch.source_rows``, numbered as ``data_prep validate`` numbers them). The faults
of a step are those of the groups it trains on: when dynamic sampling or the replay buffer
moves a group (``groups.py``), its faults move with it. The functions here are pure: they
take tensors and return :class:`Fault` records, or nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dapo_lightning.batch import SourceRow

SHOWN = 8  # rows or parameter names listed in a message


@dataclass(frozen=True)
class Fault:
    """A NaN or inf in ``tensor``: at rollout ``rows`` (questions ``dataset_rows``), or in the gradients of ``names``.

    ``dataset_rows`` holds the ``SourceRow`` (parquet file and row) of each question the rows
    belong to, or, located from a batch without them, the questions' positions in their dataset.
    """

    tensor: str
    rows: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    dataset_rows: tuple[SourceRow, ...] | tuple[int, ...] = ()

    def describe(self) -> str:
        """One line: the tensor, then its rows and the file rows of their questions, or its parameters.

        ``"rewards/x at rows [1, 5] (from a.parquet: rows [3]; b.parquet: rows [0, 7])"``; from
        positions: ``"... (dataset rows [40, 41])"``.
        """
        if self.names:
            return f"{self.tensor} of {_listing(self.names)}"
        text = f"{self.tensor} at rows {_listing(self.rows)}"
        return text + (f" ({_sources(self.dataset_rows)})" if self.dataset_rows else "")

    def touches(self, start: int, stop: int) -> bool:
        """Whether any of its rows is in ``[start, stop)``."""
        return any(start <= r < stop for r in self.rows)

    def within(self, start: int, stop: int) -> Fault:
        """The fault restricted to rows ``[start, stop)``, numbered from ``start`` (dataset rows to be located again)."""
        return replace(self, rows=tuple(r - start for r in self.rows if start <= r < stop), dataset_rows=())

    def shifted(self, offset: int) -> Fault:
        """The same fault with its rows numbered from ``offset`` (a group placed at row ``offset``)."""
        return replace(self, rows=tuple(r + offset for r in self.rows))

    def located(self, where: Sequence[SourceRow] | Sequence[int], num_generations: int) -> Fault:
        """This fault with the questions of its rows' prompts: ``where`` [B] holds each prompt's place in the data
        (``PromptBatch.locations()``: its ``SourceRow``, else its position)."""
        if not where or not self.rows:
            return self
        prompts = sorted({where[r // num_generations] for r in self.rows if r // num_generations < len(where)})
        return replace(self, dataset_rows=tuple(prompts))


def _listing(items: Sequence) -> str:
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return f"[{shown}{f', ... {len(items) - SHOWN} more' if len(items) > SHOWN else ''}]"


def _sources(located: Sequence[SourceRow] | Sequence[int]) -> str:
    """``"from a.parquet: rows [3]; b.parquet: rows [0, 7]"`` (sorted SourceRows), or ``"dataset rows [..]"``."""
    if not isinstance(located[0], SourceRow):
        return f"dataset rows {_listing(located)}"
    by_file: dict[str, list[int]] = {}
    for file, row in located:
        by_file.setdefault(file, []).append(row)
    return "from " + "; ".join(f"{file}: rows {_listing(rows)}" for file, rows in by_file.items())


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
    return [f.located(rollout.prompts.locations(), rollout.num_generations) for f in faults]


def nonfinite_row_mask(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """[N] bool: the rows of ``values`` [N, ...] holding a NaN or inf where ``mask`` is set (no device sync)."""
    bad = ~torch.isfinite(values)  # [N, ...]
    if mask is not None:
        bad = bad & mask.bool().reshape(*mask.shape, *([1] * (values.dim() - mask.dim())))
    return bad.reshape(bad.shape[0], -1).any(dim=1)


def gradient_norms(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> tuple[list[str], Tensor]:
    """The names of the parameters that have a gradient, and each gradient's float32 norm [P] (no device sync).

    A gradient so large that its float32 norm overflows is not finite either (clipping could not
    rescue it). Parameters without a gradient (frozen, or partitioned away by ZeRO) are left out.
    """
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named:
        return [], torch.zeros(0)
    return [name for name, _ in named], torch.stack(
        [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for _, g in named]
    )


def gradient_fault_of(names: Sequence[str], norms: Tensor) -> Fault | None:
    """``Fault("gradients", names=...)`` for the parameters whose gradient norm is not finite, or None (one sync)."""
    if norms.numel() == 0:
        return None
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return Fault("gradients", names=tuple(names[i] for i in (~finite).nonzero().flatten().tolist()))


def gradient_fault(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> Fault | None:
    """``Fault("gradients", names=...)`` naming the parameters whose gradient holds a NaN or inf, or None."""
    return gradient_fault_of(*gradient_norms(named_parameters))


def describe_all(faults: Sequence[Fault]) -> str:
    """The faults of a skipped step on one line ("on another process" when this one found none)."""
    return "; ".join(f.describe() for f in faults) or "on another process"


def too_many_bad_steps(consecutive: int, limit: int, faults: Sequence[Fault], saved_to) -> str:
    """The message of the error that stops a run after ``limit`` skipped steps in a row."""
    return (
        f"{consecutive} training steps in a row had non-finite values (model.optim.max_bad_steps={limit}); the last: "
        f"{describe_all(faults)}. Skipped steps leave the weights as they were: the state is saved to {saved_to}. "
        f"Find the cause (a reward returning NaN or inf, a too high model.optim.learning_rate, bfloat16 overflow), "
        f"then resume with --ckpt_path {saved_to}"
    )
