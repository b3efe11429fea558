"""One training step's update: the optimizer steps of the DAPO loss over a rollout (SPEC 5).

``num_iterations`` passes over the rollout; each pass splits its N rows into
``steps_per_generation`` consecutive mini-batches and takes one optimizer step per
mini-batch (so mu x S steps in all, each over N/S rows: TRL's meaning of both settings).
A mini-batch runs in micro-batches of ``micro_batch_size`` completions, a forward (the
policy's log-probs) and a backward each. Nothing in the micro-batch loop waits for the
device: the loss, its metrics and the non-finite checks stay tensors until the optimizer
step, where one all-reduce and one host synchronisation decide whether the step is skipped
(:class:`UpdateResult` keeps the rest on the device for the step's single metric
reduction, ``metrics.py``). After the first optimizer step the policy is no longer the
one that sampled, so with mu or S above 1 the module keeps the sampling policy's log-probs.

Non-finite values (``guards.py``) skip the step: no optimizer step, gradients dropped, and
no scheduler step either, so the learning-rate schedule follows the optimizer steps
actually taken (Lightning's ``global_step`` counts those too, so a skipped step does not
count towards ``max_steps``). The decision is all-reduced, so every process skips together
(DDP would otherwise diverge).

With ``model.loss.preference_weight`` > 0 the step's loss also holds the preference term among
correct completions (SPEC 9, pairs from ``preference.py``). A pair's two rows may lie in
different micro-batches, mini-batches or (never: pairs are within a group) processes, so the
term enters each row's backward as a linear surrogate ``c_i * d_i`` whose coefficient is the
pair loss's derivative with respect to that row's d, taken at the optimizer step's parameters:
d = 0 where the policy is still the one that sampled (no stored old log-probs, or the
rollout's first optimizer step for its own, not replayed, rows); otherwise a no-grad forward of
the pair's rows at the start of the step. The step's gradient is then exactly that of
``weight`` x the mean pair loss over the step's pairs (all processes), however it is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from dapo_lightning import distributed, guards, preference
from dapo_lightning.batch import RolloutBatch
from dapo_lightning.logprobs import LogProbs
from dapo_lightning.loss import PolicyLossSettings, dapo_policy_loss, micro_batch_scale, sequence_log_ratio

PER_STEP = ("loss", "grad_norm")  # metrics that are not per-token means


class TrainingHost(Protocol):
    """What the update needs of the LightningModule."""

    device: torch.device

    def completion_logps(self, rollout: RolloutBatch, rows: list[int], *, with_entropy: bool = False,
                         width: int | None = None) -> LogProbs: ...

    def manual_backward(self, loss: Tensor) -> None: ...

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...

    def step_optimizer(self) -> Tensor:
        """Clip, step the optimizer and the scheduler, drop the gradients; the norm before clipping (NaN if unknown)."""
        ...

    def discard_gradients(self) -> None: ...


class LightningHost:
    """The ``TrainingHost`` of a LightningModule in manual optimisation (``DAPOModule``).

    Its log-probs and backward are the module's own (looked up at call time, so a test can patch
    them); the optimizer step clips the gradient norm (``max_grad_norm``, None: measured only),
    steps the optimizer and the learning-rate scheduler and drops the gradients.
    """

    def __init__(self, module, max_grad_norm: float | None):
        self.module, self.max_grad_norm = module, max_grad_norm

    @property
    def device(self) -> torch.device:
        return self.module.device

    def completion_logps(self, rollout, rows, *, with_entropy=False, width=None) -> LogProbs:
        return self.module.completion_logps(rollout, rows, with_entropy=with_entropy, width=width)

    def manual_backward(self, loss: Tensor) -> None:
        self.module.manual_backward(loss)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.module.policy.named_parameters() if p.requires_grad]

    @property
    def lockstep(self) -> bool:  # parameters sharded over processes (Actor.lockstep): each forward is a collective
        return bool(getattr(self.module.actor, "lockstep", False))

    def step_optimizer(self) -> Tensor:
        optimizer, scheduler = self.module.optimizers(), self.module.lr_schedulers()
        norm = self.clip_gradients(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return norm

    def discard_gradients(self) -> None:
        self.module.optimizers().zero_grad(set_to_none=True)

    def clip_gradients(self, optimizer) -> Tensor:
        """Clip to ``max_grad_norm``; the norm before clipping (NaN where the strategy does not report it)."""
        strategy = self.module.trainer.strategy
        if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            # gradients are already averaged over processes here, so every rank computes the same norm
            params = [p for p in self.module.policy.parameters() if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
        if self.max_grad_norm is not None and type(strategy).__name__ != "DeepSpeedStrategy":  # DeepSpeed: its JSON
            self.module.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        return torch.tensor(math.nan)


@dataclass(frozen=True)
class UpdateSettings:
    loss: PolicyLossSettings
    num_iterations: int = 1  # passes over the rollout (mu)
    steps_per_generation: int = 1  # optimizer steps per pass, over consecutive mini-batches of the rows
    micro_batch_size: int | None = None  # completions per forward/backward (None: the whole mini-batch)


@dataclass
class UpdateResult:
    """What one step's update did. Tensors stay on the device until the step's metrics are reduced."""

    skipped: bool  # no optimizer step was taken (or not all of them): a non-finite value was found
    faults: list[guards.Fault] = field(default_factory=list)  # what was found, with its rows or parameters
    loss: Tensor | None = None  # the first pass's loss (micro-batch losses, scaled and summed over its steps)
    sums: dict[str, Tensor] = field(default_factory=dict)  # token-weighted sums of the loss's metrics, "entropy"
    tokens: Tensor | None = None  # the valid completion tokens those sums are over
    grad_norm: Tensor | None = None  # the first optimizer step's gradient norm before clipping
    preference: dict[str, Tensor] = field(default_factory=dict)  # the preference term's first pass (when it is on)

    def metrics(self) -> dict[str, Tensor]:
        """``loss``, ``grad_norm``, the per-token means (clip ratios, ratio, entropy, kl) that were computed and,
        with the preference term on, ``preference/{pairs,loss,margin}``."""
        out = {} if self.loss is None else {"loss": self.loss}
        out.update({key: value / self.tokens.clamp(min=1.0) for key, value in self.sums.items()})
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update({f"preference/{key}": value for key, value in self.preference.items()})
        return out


def row_chunks(num_rows: int, micro_batch_size: int | None) -> list[list[int]]:
    """The rows of each micro-batch, in order."""
    size = micro_batch_size or num_rows
    return [list(range(i, min(i + size, num_rows))) for i in range(0, num_rows, size)]


def micro_batches_on_busiest_process(count: int, device: torch.device) -> int:
    """The most micro-batches any process has this step (rows skipped by the data module make them differ)."""
    return int(distributed.global_max(torch.tensor(float(count), device=device)))


def mini_batches(num_rows: int, steps: int) -> list[list[int]]:
    """The rows of each optimizer step of a pass: ``steps`` consecutive parts of near-equal size (none empty)."""
    return [part.tolist() for part in torch.arange(num_rows).tensor_split(min(steps, num_rows))]


@dataclass(frozen=True)
class _StepPlan:
    """One optimizer step's micro-batches and the constants of its loss."""

    chunks: list[list[int]]  # rows of each micro-batch
    widths: list[int]  # each micro-batch's longest completion (T')
    padding: int  # zero-loss backward passes to match the busiest process
    scale: float  # factor on each micro-batch's loss (micro_batch_scale)
    normalizer: Tensor  # dapo: the step's loss tokens over all processes / W
    pair_normalizer: Tensor | None = None  # preference: the step's pairs over all processes / W (None: term off)


def _plan(rows: list[int], lengths: list[int], tokens: Tensor, settings: UpdateSettings, device,
          paired: dict[int, int] | None = None) -> _StepPlan:
    size = settings.micro_batch_size or len(rows)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    # DDP all-reduces every backward, so every process must make the same number of them even when its rollout has
    # fewer rows (skipped bad rows): the missing micro-batches back-propagate a zero loss.
    padding = micro_batches_on_busiest_process(len(chunks), device) - len(chunks)
    # SPEC 5: dapo divides by the step's loss tokens over all micro-batches and processes, per process.
    pair_normalizer = None
    if paired is None:
        normalizer = distributed.global_sum(tokens[rows].sum().float()) / distributed.rank_and_world()[1]
    else:  # SPEC 9 in the same all-reduce: the step's pairs, one whose rows lie in two steps counting half in each
        halves = torch.tensor(sum(r in paired for r in rows) / 2, device=tokens.device)
        both = distributed.global_sum(torch.stack([tokens[rows].sum().float(), halves]))  # [2]
        normalizer, pair_normalizer = (both / distributed.rank_and_world()[1]).unbind()
    return _StepPlan(chunks=chunks, widths=[max(max(lengths[r] for r in chunk), 1) for chunk in chunks],
                     padding=padding, scale=micro_batch_scale(settings.loss.loss_type, len(chunks)),
                     normalizer=normalizer, pair_normalizer=pair_normalizer)


def update_policy(rollout: RolloutBatch, host: TrainingHost, settings: UpdateSettings) -> UpdateResult:
    """Run the step's optimizer steps on ``rollout``; see the module docstring.

    ``num_iterations`` passes over the rollout, each of ``steps_per_generation`` optimizer steps
    over consecutive mini-batches of its rows (TRL's meaning of both), each step in micro-batches
    of ``micro_batch_size`` completions. With ``mask_truncated`` a completion without EOS takes no
    part in the loss, its metrics or the token count.
    """
    lengths = rollout.completion_lengths.tolist()  # one sync: every micro-batch's width, [N]
    kept = ~rollout.truncated.bool() if settings.loss.mask_truncated else None  # [N] rows in the loss
    tokens = rollout.completion_mask.sum(-1) if kept is None else rollout.completion_mask.sum(-1) * kept  # [N]
    term = preference.PreferenceTerm.of(rollout, settings.loss.preference, kept)  # SPEC 9 (None: off)
    plans = [_plan(rows, lengths, tokens, settings, host.device, None if term is None else term.partner)
             for rows in mini_batches(rollout.num_rows, settings.steps_per_generation)]
    faults = [*rollout.faults, *guards.rollout_faults(rollout)]
    result = UpdateResult(skipped=distributed.any_process(bool(faults), host.device), faults=faults)
    for iteration in range(0 if result.skipped else settings.num_iterations):
        for step, plan in enumerate(plans):
            coefficients = None if term is None else \
                _step_coefficients(term, rollout, plan.chunks, host, lengths, kept, iteration == 0 and step == 0)
            checks = []  # per micro-batch: (rows, non-finite log-prob rows [n], finite loss [])
            for rows, width in zip(plan.chunks, plan.widths):
                out, logps, old = _micro_batch(rollout, rows, width, host, settings.loss, plan.normalizer, kept,
                                               iteration == 0)
                loss = out.loss * plan.scale
                if coefficients is not None and any(r in term.partner for r in rows):  # not scaled: a mean over pairs
                    loss = loss + term.surrogate(rows, sequence_log_ratio(logps.logps, old, logps.mask), coefficients,
                                                 plan.pair_normalizer, first_pass=iteration == 0)
                checks.append((rows, guards.nonfinite_row_mask(logps.logps.detach(), logps.mask),
                               torch.isfinite(loss.detach())))
                host.manual_backward(loss)
                if iteration == 0:
                    _accumulate(result, out, logps, plan.scale)
            for _ in range(plan.padding):
                host.manual_backward(_zero_loss(host, rollout))
            if _skip(result, checks, host, rollout):
                host.discard_gradients()
                result.skipped = True
                return result
            grad_norm = host.step_optimizer()
            if result.grad_norm is None:
                result.grad_norm = grad_norm
        if iteration == 0 and term is not None:
            result.preference = term.metrics(sum(plan.pair_normalizer for plan in plans))
    return result


def _micro_batch(rollout, rows, width, host, loss_settings, normalizer, kept, first_iteration):
    logps = host.completion_logps(rollout, rows, with_entropy=first_iteration, width=width)
    width = logps.logps.shape[1]
    index = torch.tensor(rows, device=rollout.completion_ids.device)
    if kept is not None:  # truncated completions leave the loss (mask_truncated_completions)
        logps = replace(logps, mask=logps.mask * kept[index].unsqueeze(-1).to(logps.mask.dtype))  # [n, T']
    old = rollout.old_logps[index, :width] if rollout.old_logps is not None else logps.logps.detach()  # [n, T']
    advantages = rollout.advantages[index]  # [n]
    if rollout.token_weights is not None:
        advantages = advantages.unsqueeze(-1) * rollout.token_weights[index, :width]  # [n, T']
    ref = None if rollout.ref_logps is None else rollout.ref_logps[index, :width]  # [n, T']
    out = dapo_policy_loss(logps.logps, old, advantages, logps.mask, loss_settings, normalizer=normalizer, ref_logps=ref)
    return out, logps, old


def _log_ratios(rollout: RolloutBatch, rows: list[int], width: int, host: TrainingHost, kept) -> Tensor:
    """d of ``rows`` at the current parameters, without gradients (SPEC 9), [n]."""
    with torch.no_grad():
        logps = host.completion_logps(rollout, rows, width=width)
    index = torch.tensor(rows, device=rollout.completion_ids.device)
    width = logps.logps.shape[1]
    mask = logps.mask if kept is None else logps.mask * kept[index].unsqueeze(-1).to(logps.mask.dtype)  # [n, T']
    return sequence_log_ratio(logps.logps, rollout.old_logps[index, :width], mask)  # [n]


def _step_coefficients(term: preference.PreferenceTerm, rollout: RolloutBatch, chunks: list[list[int]],
                       host: TrainingHost, lengths: list[int], kept, first_step: bool) -> Tensor:
    """[N] the preference coefficients of this optimizer step's rows at its parameters (``PreferenceTerm``): the
    rows whose d is not known get a no-grad forward, in micro-batches of the step's size (padded to the busiest
    process's count when the parameters are sharded, ``host.lockstep``: every forward is then a collective)."""
    rows = [r for chunk in chunks for r in chunk]
    wanted = term.rows_to_measure(rows, first_step=first_step, stored_old=rollout.old_logps is not None)
    size = max(len(chunks[0]), 1)
    parts = [wanted[i : i + size] for i in range(0, len(wanted), size)]
    d = torch.zeros(rollout.num_rows, dtype=torch.float32, device=rollout.completion_ids.device)  # [N]
    for part in parts:
        d[part] = _log_ratios(rollout, part, max(max(lengths[r] for r in part), 1), host, kept).float()
    if getattr(host, "lockstep", False):
        for _ in range(micro_batches_on_busiest_process(len(parts), host.device) - len(parts)):
            _log_ratios(rollout, [0], max(lengths[0], 1), host, kept)
    return term.coefficients(d, rows)  # [N]


def _accumulate(result: UpdateResult, out, logps: LogProbs, scale: float) -> None:
    """Add a micro-batch's loss and token-weighted metrics to the result (on the device)."""
    n = out.num_tokens
    result.tokens = n if result.tokens is None else result.tokens + n
    loss = out.loss.detach() * scale
    result.loss = loss if result.loss is None else result.loss + loss
    weighted = {key: value * n for key, value in out.metrics.items()}
    weighted["entropy"] = (logps.entropy * logps.mask).sum()
    for key, value in weighted.items():
        result.sums[key] = result.sums[key] + value if key in result.sums else value


def _zero_loss(host: TrainingHost, rollout: RolloutBatch) -> Tensor:
    """A loss whose backward adds exactly zero to every trainable parameter's gradient; with sharded parameters
    (``host.lockstep``) one row's log-probs times zero, as a backward is then a collective of the layers run."""
    if getattr(host, "lockstep", False):
        return host.completion_logps(rollout, [0], width=1).logps.sum() * 0
    return sum((p * 0).sum() for _, p in host.trainable_parameters())


def _skip(result: UpdateResult, checks, host: TrainingHost, rollout: RolloutBatch) -> bool:
    """Whether any process found a non-finite log-prob, loss or gradient; the faults found here go in ``result``.

    One all-reduce of two flags and one host sync. A non-finite log-prob or loss is reported as such
    (the gradients it produced are not reported again); otherwise the gradients are checked.
    """
    names, norms = guards.gradient_norms(host.trainable_parameters())
    chunk_flags = torch.stack([bad.any() | ~finite for _, bad, finite in checks]).any() if checks else \
        torch.zeros((), dtype=torch.bool, device=host.device)
    gradient_flag = (~torch.isfinite(norms)).any() if norms.numel() else torch.zeros_like(chunk_flags)
    local = torch.stack([chunk_flags, gradient_flag]).float().to(host.device)  # [2]
    in_chunks, in_gradients = (distributed.global_max(local) > 0).tolist()
    if in_chunks:
        for rows, bad, finite in checks:
            found = [guards.Fault("logps", tuple(rows[i] for i in bad.nonzero().flatten().tolist()))] if bad.any() else []
            if not bool(finite):
                found.append(guards.Fault("loss", tuple(rows)))
            result.faults += [f.located(rollout.prompts.locations(), rollout.num_generations) for f in found]
        return True
    if in_gradients:
        fault = guards.gradient_fault_of(names, norms)
        result.faults += [fault] if fault is not None else []
        return True
    return False
