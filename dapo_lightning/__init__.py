"""dapo-lightning: DAPO reinforcement learning for vision-language models on PyTorch Lightning.

The public API, for notebooks and scripts (``docs/architecture.md`` has the map)::

    from dapo_lightning import DAPOModule, VisualMCQDataModule, PolicyConfig, RolloutConfig, RewardConfig
    from dapo_lightning.callbacks import AttentionMetrics, MarkdownRolloutLog

Names are imported on first use, so ``import dapo_lightning.data_prep...`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DAPOModule": "dapo_lightning.module",
    "VisualMCQDataModule": "dapo_lightning.data",
    "SyntheticData": "dapo_lightning.data",
    "PolicyConfig": "dapo_lightning.config",
    "LoraSettings": "dapo_lightning.config",
    "RolloutConfig": "dapo_lightning.config",
    "RewardConfig": "dapo_lightning.config",
    "LossConfig": "dapo_lightning.config",
    "OptimConfig": "dapo_lightning.config",
    "RolloutCallback": "dapo_lightning.hooks",
    "RolloutBatch": "dapo_lightning.batch",
    "PromptBatch": "dapo_lightning.batch",
    "RowValues": "dapo_lightning.annotations",
    "register_reward": "dapo_lightning.rewards",
    "GracefulShutdown": "dapo_lightning.shutdown",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dapo_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
