"""Reward functions by name, in TRL's calling convention.

A reward is ``fn(completions: list[str], **kwargs) -> list[float | None]``. The
keyword arguments are the dataset columns of each row (``solution``, ...), the
rollout's ``prompts``, ``completion_ids`` and ``num_generations``, the values
callbacks attach (``vgr``), and the outputs of the rewards listed before it under
their names (``accuracy``), so a reward written for TRL's ``GRPOTrainer`` works
here unchanged. ``None`` or NaN means "no value" and counts as 0 in the total.

Built-in rewards register themselves with :func:`register_reward`; a config can
also name any importable function by its dotted path (``my_pkg.rewards.brevity``
or ``my_pkg.rewards:brevity``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

RewardFn = Callable[..., list]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    needs: tuple[str, ...] = ()  # annotations a callback must provide, read under their names (e.g. "vgr")
    provider_hint: str = ""  # what to add to the config when ``needs`` is missing
    reads_rewards: tuple[str, ...] = ()  # earlier rewards whose outputs it reads by name (listed before it)


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(
    name: str, *, needs: tuple[str, ...] = (), provider_hint: str = "", reads_rewards: tuple[str, ...] = ()
) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available to configs as ``name``."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"reward {name!r} is already registered to {_REGISTRY[name].fn.__module__}")
        _REGISTRY[name] = RewardSpec(name, fn, tuple(needs), provider_hint, tuple(reads_rewards))
        return fn

    return decorate


def register_reward_object(fn: RewardFn) -> str:
    """Register a function given as an object (``RewardConfig(reward_funcs=[my_reward])``) under its dotted path.

    Its ``reward_needs``/``reward_provider_hint``/``reward_reads`` attributes declare what it reads,
    as for a function named by its path. Returns the name.
    """
    name = f"{fn.__module__}.{fn.__qualname__}"
    existing = _REGISTRY.get(name)
    if existing is None or existing.fn is not fn:
        _REGISTRY[name] = RewardSpec(name, fn, tuple(getattr(fn, "reward_needs", ())),
                                     getattr(fn, "reward_provider_hint", ""), tuple(getattr(fn, "reward_reads", ())))
    return name


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward_spec(name: str) -> RewardSpec:
    """The registered reward ``name``, or the function at a dotted import path."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    module_name, sep, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if sep and module_name:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"reward {name!r}: cannot import it ({error})") from error
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return RewardSpec(name, fn, tuple(getattr(fn, "reward_needs", ())), getattr(fn, "reward_provider_hint", ""),
                          tuple(getattr(fn, "reward_reads", ())))
    raise ValueError(f"reward {name!r} is not registered; available: {', '.join(available_rewards())}, or a dotted path")


def get_reward(name: str) -> RewardFn:
    return get_reward_spec(name).fn
