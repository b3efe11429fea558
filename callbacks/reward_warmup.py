"""``RewardWeightWarmup``: early reward weights, then the regular ones (SPEC section 2).

The original trainer first weighs format and length more (so a model learns to answer in
the expected shape) and accuracy or the attention reward less, then switches to the
regular weights. The rule, with S the run's optimizer steps (``trainer.max_steps``, or
the estimate from epochs): the early weights apply while

    global_step < int(S * warmup_ratio)   if warmup_ratio > 0
    global_step < int(S * 0.1)            otherwise

``warmup_ratio`` defaults to the learning-rate warm-up ratio (``model.optim.warmup_ratio``):
the original read both from one ``TrainingArguments.warmup_ratio``. The regular weights
are ``model.rewards.reward_weights``. The switch is applied to every rollout, train and
validation, before scoring; the module logs the active weights per reward
(``train/reward_weights/<name>``) and this callback logs ``train/reward_warmup/early``.
The boundary step is saved in checkpoints and a resumed run keeps it.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn

from dapo_lightning.hooks import RolloutCallback

DEFAULT_FRACTION = 0.1


def early_phase_end(max_steps: int, warmup_ratio: float) -> int:
    """First optimizer step that uses the regular weights."""
    return int(max_steps * (warmup_ratio if warmup_ratio > 0 else DEFAULT_FRACTION))


class RewardWeightWarmup(RolloutCallback):

    def __init__(self, early_reward_weights: list[float], warmup_ratio: float | None = None):
        """
        Args:
            early_reward_weights: One weight per reward of ``model.rewards.reward_funcs``, same order, used
                during the early phase.
            warmup_ratio: Fraction of the optimizer steps in the early phase; 0 means the first 10%; None takes
                ``model.optim.warmup_ratio`` (as the original did).
        """
        super().__init__()
        weights = list(early_reward_weights) if early_reward_weights is not None else []
        if not weights:
            raise ValueError("RewardWeightWarmup.early_reward_weights: give one weight per reward (got none)")
        for w in weights:
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ValueError(f"RewardWeightWarmup.early_reward_weights: weights must be finite numbers, got {w!r}")
        if warmup_ratio is not None and not 0 <= warmup_ratio < 1:
            raise ValueError(f"RewardWeightWarmup.warmup_ratio: must be in [0, 1), got {warmup_ratio}")
        self.early_reward_weights = [float(w) for w in weights]
        self.warmup_ratio = warmup_ratio
        self.boundary: int | None = None
        self._reward_names: list[str] = []
        self._loaded: dict | None = None

    @property
    def alternative_reward_weights(self) -> dict[str, list[float]]:
        # hooks.check_callbacks: one weight per reward, and a reward weighted here must have its inputs
        return {"RewardWeightWarmup.early_reward_weights": self.early_reward_weights}

    def on_fit_start(self, trainer, pl_module) -> None:
        # Before the sanity validation: the boundary is known before anything is generated.
        self._reward_names = list(pl_module.reward_names)
        ratio = self.warmup_ratio if self.warmup_ratio is not None else pl_module.warmup_ratio
        self.boundary = early_phase_end(pl_module.total_optimizer_steps(), ratio)
        if self._loaded is not None:  # restored before fit start (all strategies but DeepSpeed)
            self._install(self._loaded)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._loaded is not None:  # DeepSpeed restores callbacks after fit start
            self._install(self._loaded)

    def early(self, global_step: int) -> bool:
        return self.boundary is not None and global_step < self.boundary

    def on_rollout_generated(self, trainer, pl_module, rollout) -> None:
        if self.early(trainer.global_step):
            rollout.reward_weights = torch.tensor(
                self.early_reward_weights, dtype=torch.float32, device=rollout.reward_weights.device
            )
        if rollout.stage == "train" and not rollout.is_extra:
            pl_module.log("train/reward_warmup/early", float(self.early(trainer.global_step)), on_step=True,
                       on_epoch=False, batch_size=1)

    # --- checkpoint -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"early_reward_weights": list(self.early_reward_weights), "reward_names": list(self._reward_names),
                "boundary": self.boundary}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = dict(state_dict)

    def _install(self, state: dict) -> None:
        self._loaded = None
        if state.get("reward_names") and self._reward_names and state["reward_names"] != self._reward_names:
            raise ValueError(
                f"model.rewards.reward_funcs: the checkpoint's reward-weight warm-up was for {state['reward_names']}, "
                f"this configuration has {self._reward_names}"
            )
        if [float(w) for w in state["early_reward_weights"]] != self.early_reward_weights:
            raise ValueError(
                f"RewardWeightWarmup.early_reward_weights: the checkpoint was trained with "
                f"{state['early_reward_weights']}, this configuration has {self.early_reward_weights}"
            )
        saved = state.get("boundary")
        if saved is not None:
            if self.boundary is not None and saved != self.boundary:
                rank_zero_warn(
                    f"RewardWeightWarmup: the checkpoint switches to the regular weights at step {saved}; this "
                    f"configuration would switch at {self.boundary}; keeping the checkpoint's step {saved}"
                )
            self.boundary = saved
