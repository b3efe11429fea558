"""Rewards: the registry and the built-in reward functions (SPEC section 2)."""

from dapo_lightning.rewards.registry import RewardSpec, available_rewards, get_reward, get_reward_spec, register_reward

# Built-in rewards register themselves on import.
from dapo_lightning.rewards import accuracy, format, length, vgr  # noqa: E402,F401  isort: skip

__all__ = ["RewardSpec", "available_rewards", "get_reward", "get_reward_spec", "register_reward"]
