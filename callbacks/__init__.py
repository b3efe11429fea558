"""Callbacks that take part in rollouts (see ``dapo_lightning.hooks``); each can be removed from a YAML."""

from callbacks.attention_metrics import AttentionMetrics
from callbacks.markdown_log import MarkdownRolloutLog
from callbacks.token_weights import TokenWeights

__all__ = ["AttentionMetrics", "MarkdownRolloutLog", "TokenWeights"]
