"""The hook points a callback can use to read and annotate a rollout.

A callback is an ordinary ``lightning.pytorch.Callback``; it takes part in rollouts
by defining any of the methods of :class:`RolloutCallback`. ``DAPOModule`` calls them,
in this order, for every train and validation rollout (``rollout.stage`` says which).
A callback may ask for extra rollouts with ``module.make_rollout(batch, stage, tag=...)``
(dynamic sampling's extra rounds, the modality probe's variants); the hooks run for
those too, with ``rollout.tag`` set, and a callback that acts once per step (a replay
buffer, a log writer) returns early when ``rollout.tag`` is not None:

0. ``generation_capture(trainer, module, prompts, settings, stage, tag)`` -> a context
   manager or None. Asked only when this project's shared-prompt decoder samples; entered
   around generation, with ``before_generation(prompts, G)`` and ``before_decode_step(t,
   attention_mask)`` called on it. A capture made here needs no second forward.
1. ``teacher_forced_capture(trainer, module, rollout)`` -> a context manager or None.
   Entered around the module's no-grad teacher-forced pass over prompt + completion
   (the pass that also yields the old log-probs). Attention statistics are captured
   here, from any generator, in one forward. Its optional ``before_forward(rows, inputs)``
   method is called before each chunk's forward with the rows it covers.
2. ``on_rollout_generated(trainer, module, rollout)``: completions exist, rewards do not.
   Attach per-row values for rewards in ``rollout.extras`` (e.g. ``extras["vgr"]``), or
   change ``rollout.reward_weights``.
3. ``on_rollout_scored(trainer, module, rollout)``: rewards and advantages exist, the
   loss has not run. Replace groups, set ``rollout.token_weights``, write logs.
4. ``on_rollout_update_end(trainer, module, rollout, metrics)``: after the optimizer
   step(s) (train only), with the step's scalar metrics.

Class attributes that declare needs:
- ``needs_old_logps = True``: the module computes ``rollout.old_logps`` in the teacher-forced pass.
- ``provides = ("vgr",)``: the ``extras`` keys this callback fills; a reward that needs
  a key no callback provides is a configuration error at fit start.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dapo_lightning.batch import RolloutBatch

HOOK_NAMES = ("on_rollout_generated", "on_rollout_scored", "on_rollout_update_end")


class RolloutCallback(Protocol):
    needs_old_logps: bool
    provides: tuple[str, ...]

    def generation_capture(self, trainer, module, prompts, settings, stage: str, tag: str | None): ...

    def teacher_forced_capture(self, trainer, module, rollout: RolloutBatch) -> AbstractContextManager | None: ...

    def on_rollout_generated(self, trainer, module, rollout: RolloutBatch) -> None: ...

    def on_rollout_scored(self, trainer, module, rollout: RolloutBatch) -> None: ...

    def on_rollout_update_end(self, trainer, module, rollout: RolloutBatch, metrics: dict[str, Any]) -> None: ...


def callbacks_of(trainer) -> list:
    return list(getattr(trainer, "callbacks", None) or [])


def call_hook(trainer, name: str, *args) -> None:
    """Call ``name`` on every callback that defines it, in the trainer's callback order."""
    for callback in callbacks_of(trainer):
        method = getattr(callback, name, None)
        if method is not None:
            method(trainer, *args)


def captures(trainer, module, rollout: RolloutBatch) -> list[AbstractContextManager]:
    out = []
    for callback in callbacks_of(trainer):
        method = getattr(callback, "teacher_forced_capture", None)
        if method is not None:
            capture = method(trainer, module, rollout)
            if capture is not None:
                out.append(capture)
    return out


def generation_captures(trainer, module, prompts, settings, stage: str, tag: str | None) -> list:
    """Captures callbacks want active during generation (only asked when this project's decoder samples)."""
    out = []
    for callback in callbacks_of(trainer):
        method = getattr(callback, "generation_capture", None)
        if method is not None:
            capture = method(trainer, module, prompts, settings, stage, tag)
            if capture is not None:
                out.append(capture)
    return out


def any_needs_old_logps(trainer) -> bool:
    return any(getattr(callback, "needs_old_logps", False) for callback in callbacks_of(trainer))


def provided_extras(trainer) -> set[str]:
    keys: set[str] = set()
    for callback in callbacks_of(trainer):
        keys.update(getattr(callback, "provides", ()) or ())
    return keys
