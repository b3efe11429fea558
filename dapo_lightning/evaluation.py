"""``dapo-lightning test``: a validation epoch over ``data.test_path``, reported under ``test/``.

Testing scores held-out questions exactly as validation does, so it reuses validation rather
than repeating it: ``DAPOModule.test_step`` is its ``validation_step`` (greedy or sampled by the
``model.rollout.eval_*`` keys, every question scored once over the processes), the epoch's end is
its ``on_validation_epoch_end`` (``metrics.ValidationMetrics``: accuracy, total reward, each
reward's mean, accuracy per ``source``, skipped rows), and every ``val/`` name logged while
Lightning tests, by the module or by a callback, is logged as ``test/`` (:func:`metric_name`).

Rollout callbacks that keep validation statistics (``AttentionMetrics``: ``val/attention/...``)
collect them in ``on_validation_epoch_start``/``_end``, hooks Lightning does not call while
testing. A rollout callback that has no test-epoch hooks of its own gets those two hooks at the
test epoch's start and end (:func:`start_test_epoch`, :func:`end_test_epoch`): the test's rollouts
are validation rollouts (``rollout.stage == "val"``), so the callback's statistics describe them and
its ``val/`` names come out as ``test/``. Batch-level validation hooks are not repeated: a callback
that works per validation batch (``ModalityProbe``) reports nothing at test time.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from dapo_lightning.hooks import rollout_callbacks

VALIDATION, TEST = "val/", "test/"


def metric_name(trainer, name: str) -> str:
    """``name`` as logged now: ``val/...`` becomes ``test/...`` while ``trainer`` tests."""
    if trainer is not None and trainer.testing and name.startswith(VALIDATION):
        return TEST + name[len(VALIDATION):]
    return name


def _without_own_hook(trainer, hook: str) -> list[Callback]:
    """The rollout callbacks that do not override ``hook`` (a test-epoch hook) themselves."""
    return [c for c in rollout_callbacks(trainer) if getattr(type(c), hook) is getattr(Callback, hook)]


def start_test_epoch(trainer, pl_module) -> None:
    """``on_validation_epoch_start`` of each rollout callback without its own ``on_test_epoch_start``."""
    for callback in _without_own_hook(trainer, "on_test_epoch_start"):
        callback.on_validation_epoch_start(trainer, pl_module)


def end_test_epoch(trainer, pl_module) -> None:
    """``on_validation_epoch_end`` of each rollout callback without its own ``on_test_epoch_end``, then the module's."""
    for callback in _without_own_hook(trainer, "on_test_epoch_end"):
        callback.on_validation_epoch_end(trainer, pl_module)
    pl_module.on_validation_epoch_end()


__all__ = ["end_test_epoch", "metric_name", "start_test_epoch"]
