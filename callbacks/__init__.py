"""Callbacks: one concern each, listed under ``trainer.callbacks`` by class path and removable from a config."""

from callbacks.dynamic_sampling import DynamicSampling
from callbacks.modality_probe import ModalityProbe
from callbacks.replay_buffer import ReplayBuffer
from callbacks.reward_warmup import RewardWeightWarmup

__all__ = ["DynamicSampling", "ModalityProbe", "ReplayBuffer", "RewardWeightWarmup"]
