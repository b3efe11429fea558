"""AdamW and the learning-rate schedule over optimizer steps (``model.optim``)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dapo_lightning.config import OptimConfig


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The learning rate's multiplier at optimizer step ``step``: linear warm-up over ``warmup`` steps, then
    ``cosine`` or ``linear`` decay to 0 at ``total``, or ``constant``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def build_optimizer(parameters: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW and a per-step ``LambdaLR``."""
    optimizer = torch.optim.AdamW(
        list(parameters), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    total = max(total_steps, 1)
    warmup = int(total * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg.lr_scheduler))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
