"""``TokenWeights``: per-token advantage multipliers from attention grounding (SPEC section 4).

For every training rollout (extra ones included) it turns the per-token attention masses that
``AttentionMetrics`` captured (the ``attention_tokens`` annotation, which travels with its
groups, so this callback may stand anywhere in ``trainer.callbacks``) into weights w [N, T]
and sets ``rollout.token_weights``; the loss then uses A_i · w_{i,t} in place of A_i
(``dapo_lightning.update``).

- ``variant="inverse_vgr"`` (the original code's, default): w = 1/(token VGR), optionally
  Gaussian-smoothed along the completion, divided by its mean over the completion's
  tokens and clipped to ``clip``; ``topk_ratio`` (default 0.4, SPEC 4) keeps only each
  completion's top fraction of weights and sets the rest to 1 (``null``: every token, as
  the original's final loss did).
- ``variant="vision_share"`` (the paper's): w = the token's vision share of attention,
  normalised to sum 1 over the completion (no clip, no top-k).

The completion's last token (it has no generation row), padding and replayed rows
(SPEC 6) get 1; so do completions whose prompt has no vision tokens and rows without
statistics (a group that arrived without them). Validation rollouts are not weighted
(they do not update). Without this callback ``rollout.token_weights`` stays None and the
loss is exactly the core loss.

Logs ``train/token_weights/{mean,std,min,max,frac_above_1,frac_below_1}`` over the
weighted (non-replayed, valid) tokens (``dapo_lightning.metrics.token_weight_stats``, the
numbers the Markdown log shows too) and, every ``histogram_every_n_steps`` rollouts,
a TensorBoard histogram ``train/token_weights``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from dapo_lightning.attention import token_vgr_weights, token_vision_share_weights
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import token_weight_stats

TOKEN_WEIGHT_VARIANTS = ("inverse_vgr", "vision_share")
DEFAULT_CLIP = (0.2, 3.0)
DEFAULT_TOPK_RATIO = 0.4


class TokenWeights(RolloutCallback):
    needs = ("attention_tokens",)
    provider_hint = "dapo_lightning.callbacks.AttentionMetrics"

    def __init__(
        self,
        variant: str = "inverse_vgr",
        smooth_sigma: float = 0.0,
        clip: tuple[float, float] | None = DEFAULT_CLIP,
        topk_ratio: float | None = DEFAULT_TOPK_RATIO,
        histogram_every_n_steps: int = 10,
    ):
        """
        Args:
            variant: ``inverse_vgr`` (inverse per-token VGR, the original code) or ``vision_share`` (the paper).
            smooth_sigma: Gaussian smoothing along the completion (0: none); kernel half-width max(1, int(3 sigma)).
            clip: Clamp of the mean-normalised weights, (low, high); None: no clamp. ``inverse_vgr`` only
                (``vision_share`` leaves the default unused and refuses another value).
            topk_ratio: Reweight only each completion's top fraction of tokens by weight, the rest get 1
                (None: every token, as the original's final loss did). ``inverse_vgr`` only (``vision_share``
                leaves the default unused and refuses another value).
            histogram_every_n_steps: Log a TensorBoard histogram of the weights every n training rollouts (0: never).
        """
        if variant not in TOKEN_WEIGHT_VARIANTS:
            raise ValueError(f"TokenWeights.variant: choose from {TOKEN_WEIGHT_VARIANTS}, got {variant!r}")
        if smooth_sigma < 0:
            raise ValueError(f"TokenWeights.smooth_sigma: must be >= 0, got {smooth_sigma}")
        if clip is not None:
            clip = (float(clip[0]), float(clip[1]))
            if not 0 <= clip[0] <= clip[1]:
                raise ValueError(f"TokenWeights.clip: need 0 <= low <= high, got {clip}")
        if topk_ratio is not None and not 0 < topk_ratio <= 1:
            raise ValueError(f"TokenWeights.topk_ratio: must be in (0, 1] or null, got {topk_ratio}")
        if variant == "vision_share" and (
            topk_ratio not in (None, DEFAULT_TOPK_RATIO) or (clip is not None and clip != DEFAULT_CLIP)
        ):
            raise ValueError(
                "TokenWeights: clip and topk_ratio apply to variant inverse_vgr; the paper's vision_share "
                "weights sum to 1 over a completion and are used as they are"
            )
        if histogram_every_n_steps < 0:
            raise ValueError(f"TokenWeights.histogram_every_n_steps: must be >= 0, got {histogram_every_n_steps}")
        self.variant = variant
        self.smooth_sigma = float(smooth_sigma)
        self.clip = clip
        self.topk_ratio = topk_ratio
        self.histogram_every_n_steps = histogram_every_n_steps
        self.train_rollouts = 0

    def weights(self, rollout) -> torch.Tensor:
        """The [N, T] multipliers of ``rollout`` (1 everywhere it has no statistics)."""
        captured = rollout.annotations.get("attention_tokens")
        N, T = rollout.completion_ids.shape
        device = rollout.completion_ids.device
        if captured is None:
            return torch.ones(N, T, dtype=torch.float32, device=device)
        text, vision = captured.token_masses()  # [N, R] averaged over all layers
        if self.variant == "inverse_vgr":
            weights = token_vgr_weights(
                text,
                vision,
                captured.rows,
                captured.num_text,
                captured.num_vision,
                T,
                smooth_sigma=self.smooth_sigma,
                clip=self.clip,
                topk_ratio=self.topk_ratio,
            )
        else:
            weights = token_vision_share_weights(
                text,
                vision,
                captured.rows,
                captured.num_vision,
                rollout.completion_lengths,
                T,
                smooth_sigma=self.smooth_sigma,
            )
        weights = weights.to(device)
        weights = torch.where(rollout.completion_mask.bool(), weights, torch.ones_like(weights))  # padding: 1
        if rollout.replayed is not None:
            weights[rollout.replayed.to(device).bool()] = 1.0  # SPEC 6: replayed rows are not reweighted
        return weights

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        if rollout.stage != "train":
            return
        weights = self.weights(rollout)  # [N, T]
        rollout.token_weights = weights
        self.train_rollouts += 1
        self._log(trainer, pl_module, rollout)

    def _log(self, trainer, pl_module, rollout) -> None:
        stats = token_weight_stats(rollout)  # float64 over the weighted tokens; None when there are none
        if stats is None:
            return
        count = int(stats.pop("count"))
        for name, value in stats.items():
            pl_module.log(f"train/token_weights/{name}", value, on_step=True, on_epoch=False, batch_size=count)
        n = self.histogram_every_n_steps
        if n and (self.train_rollouts - 1) % n == 0 and trainer.is_global_zero:
            valid = rollout.completion_mask.bool()
            if rollout.replayed is not None:
                valid = valid & ~rollout.replayed.bool().unsqueeze(-1)
            values = rollout.token_weights[valid].float().cpu()
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram("train/token_weights", values, global_step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"train_rollouts": self.train_rollouts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_rollouts = int(state_dict.get("train_rollouts", 0))
