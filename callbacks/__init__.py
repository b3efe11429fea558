"""Callbacks that take part in rollouts (see ``dapo_lightning.hooks``); each can be removed from a YAML."""

from dapo_lightning.callbacks.attention_metrics import AttentionMetrics
from dapo_lightning.callbacks.dynamic_sampling import DynamicSampling
from dapo_lightning.callbacks.markdown_log import MarkdownRolloutLog
from dapo_lightning.callbacks.modality_probe import ModalityProbe
from dapo_lightning.callbacks.replay_buffer import ReplayBuffer
from dapo_lightning.callbacks.reward_warmup import RewardWeightWarmup
from dapo_lightning.callbacks.text_bias import TextBiasMetrics
from dapo_lightning.callbacks.token_weights import TokenWeights

__all__ = [
    "AttentionMetrics",
    "DynamicSampling",
    "MarkdownRolloutLog",
    "ModalityProbe",
    "ReplayBuffer",
    "RewardWeightWarmup",
    "TextBiasMetrics",
    "TokenWeights",
]
