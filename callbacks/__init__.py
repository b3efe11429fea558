"""Callbacks that take part in rollouts (see ``dapo_lightning.hooks``); each can be removed from a YAML."""

from callbacks.attention_metrics import AttentionMetrics
from callbacks.dynamic_sampling import DynamicSampling
from callbacks.graceful_shutdown import GracefulShutdown
from callbacks.markdown_log import MarkdownRolloutLog
from callbacks.modality_probe import ModalityProbe
from callbacks.replay_buffer import ReplayBuffer
from callbacks.reward_warmup import RewardWeightWarmup
from callbacks.token_weights import TokenWeights

__all__ = [
    "AttentionMetrics",
    "DynamicSampling",
    "GracefulShutdown",
    "MarkdownRolloutLog",
    "ModalityProbe",
    "ReplayBuffer",
    "RewardWeightWarmup",
    "TokenWeights",
]
