"""The callback contract: the hook points of a rollout, what a callback declares, what it may read.

A rollout callback subclasses :class:`RolloutCallback` (an ordinary Lightning ``Callback``
with five more hooks, no-ops by default). ``DAPOModule`` calls the hooks, in the order of
``trainer.callbacks``, for every train and validation rollout (``rollout.stage``), in this
order:

0. ``generation_recorder(trainer, pl_module, prompts, settings, stage, requested_by)`` -> a
   :class:`PassRecorder` or None. Asked only when this project's shared-prompt decoder samples;
   entered around generation. Recording here needs no second forward.
1. ``teacher_forced_recorder(trainer, pl_module, rollout)`` -> a :class:`PassRecorder` or None,
   entered around the module's no-grad teacher-forced pass over prompt + completion (the pass
   that also yields the old log-probs), so any generator's rollouts can be recorded. Each
   recorder's ``finish(rollout)`` runs after its pass: it attaches what it recorded as annotations.
2. ``on_rollout_generated(trainer, pl_module, rollout)``: completions exist, rewards do not.
   Attach per-row annotations for rewards (``rollout.annotations``) or change ``rollout.reward_weights``.
3. ``on_rollout_scored(trainer, pl_module, rollout)``: rewards and advantages exist, the loss has
   not run. Move groups (``groups.py``), set ``rollout.token_weights``, write logs.
4. ``on_rollout_update_end(trainer, pl_module, rollout, result)``: after the optimizer step(s)
   (train only), with the step's :class:`~dapo_lightning.update.UpdateResult`.

A callback may ask for extra rollouts with ``pl_module.make_rollout(batch, stage, requested_by=...)``
(dynamic sampling's rounds, the modality probe's variants). The hooks run for those too;
``rollout.is_extra`` tells them apart from the step's own, and a callback that acts once per
step returns early on them.

What a callback declares (class attributes, checked by :func:`check_callbacks` at set-up):

- ``provides``: names of the annotations it attaches (``"vgr"``), or of an effect other
  callbacks order themselves by (``"group_selection"``);
- ``needs``: annotation names it reads; a callback providing each must be configured
  (``provider_hint`` says which to add);
- ``runs_after``: names that, when some callback provides them, must be provided by a callback
  listed before this one;
- ``needs_old_logps``: the module computes ``rollout.old_logps`` in the teacher-forced pass;
- ``alternative_reward_weights``: ``{config key: weights}`` it may switch the rewards to
  (a reward with a non-zero weight in any set must have its inputs provided).

What a callback may read of the module is :class:`RolloutModule`, and nothing else
(``tests/test_architecture.py`` checks every callback's source).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch import Callback
from torch import Tensor

if TYPE_CHECKING:
    from dapo_lightning.batch import PromptBatch, RolloutBatch
    from dapo_lightning.generation import SamplingSettings
    from dapo_lightning.rewards.registry import RewardSpec
    from dapo_lightning.update import UpdateResult


class RolloutModule(Protocol):
    """The part of ``DAPOModule`` a callback may use (its hooks receive it as ``pl_module``)."""

    policy: torch.nn.Module  # the trained model (a recorder installs its attention kernel on it)
    tokenizer: Any  # the policy's tokenizer
    pad_token_id: int  # completion padding (groups are re-padded with it)
    policy_dtype: torch.dtype  # parameter dtype (stored image features use it)
    reward_names: list[str]  # model.rewards.reward_funcs, in order
    num_generations: int  # G of training rollouts
    warmup_ratio: float  # model.optim.warmup_ratio
    needed_annotations: frozenset[str]  # annotations a configured reward or callback reads

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (``trainer.max_steps``, or the estimate from epochs)."""
        ...

    def make_rollout(self, batch: PromptBatch, stage: str, requested_by: str | None = None) -> RolloutBatch:
        """Sample and score ``batch``; the hooks run on the result (``requested_by`` marks an extra rollout)."""
        ...

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        """Lightning's ``LightningModule.log``."""
        ...

    def log_dict(self, dictionary: dict[str, Any], **kwargs: Any) -> None:
        """Lightning's ``LightningModule.log_dict``."""
        ...


class PassRecorder(AbstractContextManager, Protocol):
    """Watches the policy's forward passes over one rollout's rows; entered as a context around them.

    A recorder made for generation gets ``before_generation`` once, then ``before_decode_step``
    before each decode forward; one made for the teacher-forced pass gets ``before_chunk`` before
    each chunk's forward. After the pass the module calls ``finish(rollout)``.
    """

    def before_generation(self, prompts: PromptBatch, num_generations: int) -> None: ...

    def before_decode_step(self, step: int, attention_mask: Tensor) -> None:
        """The next forward feeds completion token ``step``; ``attention_mask`` is [N, P + step + 1]."""
        ...

    def before_chunk(self, rows: list[int], inputs: dict[str, Tensor]) -> None:
        """The next forward covers ``rows``; ``inputs`` is ``RolloutBatch.model_inputs(rows)``."""
        ...

    def finish(self, rollout: RolloutBatch) -> None:
        """The pass is over: attach what was recorded to ``rollout.annotations``."""
        ...


class RolloutCallback(Callback):
    """A Lightning callback that takes part in rollouts; override the hooks it needs (see the module docstring)."""

    provides: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    runs_after: tuple[str, ...] = ()
    needs_old_logps: bool = False
    provider_hint: str = ""  # what to add to trainer.callbacks when ``needs`` is not provided

    @property
    def alternative_reward_weights(self) -> dict[str, list[float]]:
        """``{config key: one weight per reward}`` this callback may switch the rewards to (none by default)."""
        return {}

    def generation_recorder(self, trainer, pl_module: RolloutModule, prompts: PromptBatch,
                            settings: SamplingSettings, stage: str, requested_by: str | None) -> PassRecorder | None:
        return None

    def teacher_forced_recorder(self, trainer, pl_module: RolloutModule, rollout: RolloutBatch) -> PassRecorder | None:
        return None

    def on_rollout_generated(self, trainer, pl_module: RolloutModule, rollout: RolloutBatch) -> None:
        pass

    def on_rollout_scored(self, trainer, pl_module: RolloutModule, rollout: RolloutBatch) -> None:
        pass

    def on_rollout_update_end(self, trainer, pl_module: RolloutModule, rollout: RolloutBatch,
                              result: UpdateResult) -> None:
        pass


HOOKS = ("generation_recorder", "teacher_forced_recorder", "on_rollout_generated", "on_rollout_scored",
         "on_rollout_update_end")


def rollout_callbacks(trainer) -> list[RolloutCallback]:
    return [c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, RolloutCallback)]


# --- the checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackPlan:
    """What the configured callbacks and rewards require of every rollout."""

    needed_annotations: frozenset[str]  # read by a listed reward or a callback: providers record every rollout
    needs_old_logps: bool  # a callback keeps rollouts (the replay buffer)


def check_callbacks(
    callbacks: Sequence[Any], specs: Sequence[RewardSpec], reward_weights: Sequence[float]
) -> CallbackPlan:
    """Validate what the callbacks and rewards declare; raise ``ValueError`` naming the config key.

    Checked, in order: every callback that defines a rollout hook is a ``RolloutCallback``;
    each callback's alternative reward weights have one weight per reward; the rewards read
    earlier rewards listed before them and no reward's output shadows an annotation a later
    reward reads; every callback's ``needs`` and every weighted reward's inputs are provided
    (a weight counts in any set: the regular one or a callback's alternative one); and
    ``runs_after`` order.
    """
    names = [spec.name for spec in specs]
    for callback in callbacks:
        if not isinstance(callback, RolloutCallback) and any(hasattr(callback, hook) for hook in HOOKS):
            raise ValueError(
                f"trainer.callbacks: {type(callback).__name__} defines rollout hooks but is not a "
                "dapo_lightning.hooks.RolloutCallback; subclass it so the module calls them"
            )
    mine = [c for c in callbacks if isinstance(c, RolloutCallback)]
    weight_sets = {"model.rewards.reward_weights": list(reward_weights)}
    for callback in mine:
        for key, weights in callback.alternative_reward_weights.items():
            if len(weights) != len(names):
                raise ValueError(f"{key}: has {len(weights)} weights but model.rewards.reward_funcs has "
                                 f"{len(names)} rewards ({', '.join(names)})")
            weight_sets[key] = list(weights)
    _check_reward_order(specs)
    provided = {name for callback in mine for name in callback.provides}
    for callback in mine:
        missing = [key for key in callback.needs if key not in provided]
        if missing:
            hint = f"; add {callback.provider_hint} to trainer.callbacks" if callback.provider_hint else ""
            raise ValueError(f"{type(callback).__name__} needs {', '.join(missing)} that no callback provides{hint}")
    for k, spec in enumerate(specs):
        missing = [key for key in spec.needs if key not in provided]
        weighted = [(key, weights[k]) for key, weights in weight_sets.items() if weights[k] != 0]
        if missing and weighted:
            key, weight = weighted[0]
            where = f"weight {weight}" if key == "model.rewards.reward_weights" else f"weight {weight} in {key}"
            hint = f"; add {spec.provider_hint} to trainer.callbacks" if spec.provider_hint else ""
            raise ValueError(f"model.rewards.reward_funcs: reward {spec.name!r} ({where}) needs per-sample "
                             f"{', '.join(missing)} values that no callback provides{hint}")
    for i, callback in enumerate(mine):
        for name in callback.runs_after:
            later = [c for c in mine[i + 1 :] if name in c.provides]
            if later:
                raise ValueError(
                    f"trainer.callbacks: list {type(later[0]).__name__} before {type(callback).__name__} "
                    f"({type(callback).__name__} runs after what provides {name!r})"
                )
    needed = {key for callback in mine for key in callback.needs} | {key for spec in specs for key in spec.needs}
    return CallbackPlan(needed_annotations=frozenset(needed),
                        needs_old_logps=any(callback.needs_old_logps for callback in mine))


def _check_reward_order(specs: Sequence[RewardSpec]) -> None:
    names = [spec.name for spec in specs]
    for i, spec in enumerate(specs):
        for name in spec.reads_rewards:
            if name not in names[:i]:
                raise ValueError(f"model.rewards.reward_funcs: {spec.name} reads each row's {name}; list the "
                                 f"{name} reward before it")
        shadowed = [n for n in names[:i] if n in spec.needs]  # an earlier reward's output has the input's keyword
        if shadowed:
            raise ValueError(
                f"model.rewards.reward_funcs: {spec.name!r} is listed after {shadowed[0]!r}, whose output replaces "
                f"the per-sample {shadowed[0]} values under the same keyword; list only one of them"
            )
