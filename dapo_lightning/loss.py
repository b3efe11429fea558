"""The DAPO policy loss as pure tensor functions (SPEC section 5).

Shapes: N rows (completions), T completion tokens (right-padded). ``mask`` is 1 on a
row's valid completion tokens (up to and including EOS) and 0 on padding.

How this departs from plain GRPO (each switch is a config key of ``LossConfig``):
- clip-higher: the ratio is clipped to ``[1 - epsilon_low, 1 + epsilon_high]`` with
  ``epsilon_high`` (0.28) above ``epsilon_low`` (0.2), so low-probability tokens with
  positive advantage can grow (DAPO paper, section 3.1). Set both to 0.2 for GRPO.
- token-level normalisation: ``loss_type="dapo"`` divides the summed per-token loss
  by the number of valid completion tokens of the whole optimizer step (all
  gradient-accumulation micro-batches, all processes), so long and short answers
  weigh per token, not per sequence (DAPO section 3.3). ``grpo``, ``bnpo`` and
  ``dr_grpo`` are the other normalisers.
- sequence-level importance sampling (GSPO) with ``importance_sampling_level="sequence"``.
- an optional KL penalty to a frozen reference when ``beta > 0`` (DAPO uses none).
- per-token advantage multipliers (``advantages`` of shape [N, T]), used by the
  attention token weights (SPEC section 4).
- an optional preference term among a group's correct completions (the Debias-DAPO paper's
  Eq. 6, SPEC section 9), off unless ``preference_weight`` > 0. As printed, the paper's term
  compares no-grad attention scores and gives the policy no gradient; here a pair compares the
  completions' sequence log-ratios d = sum_t (logp - old_logp), DPO-style, so it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass
class LossOutput:
    """The differentiable loss and its detached diagnostics (token-weighted means over valid tokens)."""

    loss: Tensor  # scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)  # scalars, detached
    num_tokens: Tensor | None = None  # scalar: valid tokens these metrics average over


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def importance_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """pi_theta / pi_old per token, or the geometric mean over the row broadcast to its tokens (GSPO)."""
    log_ratio = logps - old_logps  # [N, T]
    if level == "token":
        return log_ratio.exp()  # [N, T]
    if level == "sequence":
        seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
        return seq.exp().unsqueeze(-1).expand_as(logps)  # [N, T]
    raise ValueError(f"importance_sampling_level: unknown {level!r}; choose from {IMPORTANCE_LEVELS}")


def kl_penalty(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """The k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1 with d = ref - logp."""
    delta = ref_logps - logps  # [N, T]
    return delta.exp() - delta - 1  # [N, T]


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    loss_type: str = "dapo",
    *,
    normalizer: Tensor | float | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss [N, T] to a scalar by ``loss_type`` (SPEC section 5).

    For ``dapo``, ``normalizer`` is (valid tokens of the whole optimizer step, summed over
    micro-batches and processes) / (number of processes): DDP then averages gradients over
    processes, which makes the step's gradient the mean over every valid token. Without a
    normalizer it falls back to this batch's own token count (``bnpo``).
    """
    masked = per_token * mask  # [N, T]
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return masked.sum() / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        if normalizer is None:
            return masked.sum() / mask.sum().clamp(min=1)
        return masked.sum() / torch.as_tensor(normalizer, dtype=masked.dtype, device=masked.device).clamp(min=1e-8)
    raise ValueError(f"loss_type: unknown {loss_type!r}; choose from {LOSS_TYPES}")


@dataclass(frozen=True)
class PreferenceSettings:
    """The preference term's constants (SPEC 9).

    The term: ``weight`` x the mean over pairs of -log sigmoid(``beta`` (d_top - d_bottom) - ``margin``).
    """

    weight: float  # lambda
    beta: float = 0.1  # scale of the log-ratio difference
    margin: float = 0.0  # m: beta * (d_top - d_bottom) should exceed it
    pairs_per_group: int = 2  # K


@dataclass(frozen=True)
class PolicyLossSettings:
    """The objective's constants: ``LossConfig`` and the completion length, fixed for a run."""

    epsilon_low: float = 0.2  # ratio >= 1 - epsilon_low
    epsilon_high: float = 0.28  # ratio <= 1 + epsilon_high (clip-higher)
    importance_sampling_level: str = "token"  # or "sequence" (GSPO)
    loss_type: str = "dapo"  # the normaliser, see ``aggregate``
    beta: float = 0.0  # KL penalty weight (needs ``ref_logps``)
    max_completion_length: int | None = None  # the ``dr_grpo`` constant
    mask_truncated: bool = False  # truncated completions (no EOS) take no part in the loss (see ``update.py``)
    preference: PreferenceSettings | None = None  # the preference term among correct completions (None: off)


def dapo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: PolicyLossSettings = PolicyLossSettings(),
    *,
    normalizer: Tensor | float | None = None,
    ref_logps: Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate loss with clip-higher, aggregated by ``settings.loss_type``.

    ``advantages`` is [N] (one per row) or [N, T] (per token, e.g. A_i * w_it); ``normalizer``
    is the ``dapo`` step's token count (see ``aggregate``); ``ref_logps`` [N, T] when beta > 0.
    """
    epsilon_low, epsilon_high, beta = settings.epsilon_low, settings.epsilon_high, settings.beta
    mask = mask.to(logps.dtype)  # [N, T]
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, T]
    ratio = importance_ratio(logps, old_logps, mask, settings.importance_sampling_level)  # [N, T]
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)  # [N, T]
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T]
    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (log-probs of the reference model)")
        kl = kl_penalty(logps, ref_logps)  # [N, T]
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, settings.loss_type, normalizer=normalizer,
                     max_completion_length=settings.max_completion_length)

    with torch.no_grad():
        adv_full = adv.expand_as(ratio)  # [N, T]
        low = ((ratio < 1 - epsilon_low) & (adv_full < 0)).to(mask.dtype)  # [N, T]
        high = ((ratio > 1 + epsilon_high) & (adv_full > 0)).to(mask.dtype)  # [N, T]
        metrics = {
            "clip_ratio/low_mean": masked_mean(low, mask),
            "clip_ratio/high_mean": masked_mean(high, mask),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask),
            "ratio_mean": masked_mean(ratio.detach(), mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
    return LossOutput(loss=loss, metrics=metrics, num_tokens=mask.sum().detach())


# --- the preference term among correct completions (SPEC 9) ------------------------------------------------------


def sequence_log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """d: each row's log pi_theta / pi_old of its whole completion, summed over its valid tokens."""
    return ((logps - old_logps) * mask.to(logps.dtype)).sum(-1)  # [N]


def preference_pair_loss(d_top: Tensor, d_bottom: Tensor, beta: float, margin: float) -> Tensor:
    """-log sigmoid(beta * (d_top - d_bottom) - margin) per pair, written as a softplus (stable for large margins)."""
    return torch.nn.functional.softplus(margin - beta * (d_top - d_bottom))  # [M]


def preference_coefficients(d: Tensor, top: Tensor, bottom: Tensor, beta: float, margin: float) -> Tensor:
    """Each row's derivative of its pair's loss with respect to its own d (0 for rows in no pair), detached.

    For the pair loss l = softplus(margin - beta * (d_top - d_bottom)), with
    w = sigmoid(margin - beta * (d_top - d_bottom)): dl/d d_top = -beta * w and dl/d d_bottom = +beta * w.
    ``d`` [N] holds the rows' d where the gradient is taken; ``top``/``bottom`` [M] are row indices.
    """
    d = d.detach()
    w = torch.sigmoid(margin - beta * (d[top] - d[bottom]))  # [M]
    coefficients = torch.zeros_like(d)  # [N]
    coefficients.index_add_(0, top, -beta * w)
    coefficients.index_add_(0, bottom, beta * w)
    return coefficients  # [N]


def preference_surrogate(d: Tensor, coefficients: Tensor, weight: float, normalizer: Tensor | float) -> Tensor:
    """A scalar whose gradient is ``weight / normalizer * sum_i coefficients_i * grad d_i``, and whose value is 0.

    Linear in each row's d, so rows in different micro-batches (and processes) contribute
    separately; with ``coefficients`` taken where d is (``preference_coefficients``) and
    ``normalizer`` the pairs of the optimizer step (over all processes, / W), the step's gradient
    is that of ``weight`` x the mean pair loss. The term's value is ``preference_pair_loss``'s.
    """
    linear = (coefficients.detach() * (d - d.detach())).sum()  # 0, with the gradient of sum c_i d_i
    return weight * linear / torch.as_tensor(normalizer, dtype=d.dtype, device=d.device).clamp(min=1e-8)


def micro_batch_scale(loss_type: str, num_micro_batches: int) -> float:
    """Factor on each micro-batch's loss so accumulated gradients match one big batch.

    ``dapo`` already divides by the step's global token count, so its micro-batch losses
    are summed as they are; the per-batch normalisers are averaged over micro-batches.
    """
    return 1.0 if loss_type == "dapo" else 1.0 / num_micro_batches
