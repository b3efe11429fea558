"""What a checkpoint needs beyond Lightning's own: random-number states, per-rank callback state, config checks.

Lightning restores the model, the optimizer, the scheduler, the loops and each
callback's ``state_dict``; it saves none of the random-number generators, and it
writes only rank 0's copy of everything. Resuming a run exactly needs both:

- :func:`capture_rng` / :func:`restore_rng`: torch (CPU and every CUDA device), numpy and
  Python ``random`` as plain tensors, ints and lists, so that Lightning's
  ``weights_only=True`` loader reads them back. Sampling in ``generate`` draws from
  torch's generator of the device it runs on.
- ``distributed.gather_per_rank`` / ``distributed.rank_share``: state that differs between
  processes (each rank's replay buffer, its generators) is gathered to rank 0 when saved and
  handed back by rank on load, also when the world size changed.
- :func:`check_same_config`: resuming from a checkpoint of another configuration is an
  error naming the key, for the settings the saved state depends on (a model folder is the
  same model however it is spelled: paths are compared resolved).
- :func:`warn_if_nothing_left_to_train`: resuming a checkpoint already at or past
  ``trainer.max_steps`` warns (the fit would end at once, silently).
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dapo_lightning import distributed

# --- random-number generators -------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's generator states, as checkpoint-safe plain values."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64), "gauss_next": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


class GeneratorStates:
    """Every process's random-number generators: saved in checkpoints, restored on resume, kept out of validation.

    Restoring on resume: when the checkpoint closed an epoch, the next epoch's loader draws its
    order from these states, as the uninterrupted run's did, so they are restored at once;
    mid-epoch, the loader is re-created on resume (the uninterrupted run's is not), so they are
    restored after it, at train start (:meth:`restore_pending`). Validation samples from the same
    generators; isolating it keeps training's draws independent of the evaluation cadence (and
    a resumed run, which skips the sanity check, equal to an uninterrupted one).
    """

    def __init__(self) -> None:
        self._pending: dict | None = None
        self._before_validation: dict | None = None

    def save(self, checkpoint: dict) -> None:
        # Lightning saves no generator state and only rank 0's copy: gather every rank's (index = rank).
        checkpoint["rng_states"] = distributed.gather_per_rank(capture_rng())

    def load(self, checkpoint: dict, rank: int) -> None:
        states = checkpoint.get("rng_states") or []
        self._pending = states[rank] if rank < len(states) else None
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        if progress.get("is_last_batch"):
            self.restore_pending()

    def restore_pending(self) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None

    def enter_validation(self) -> None:
        self._before_validation = capture_rng()

    def leave_validation(self) -> None:
        if self._before_validation is not None:
            restore_rng(self._before_validation)
            self._before_validation = None


# --- configuration ------------------------------------------------------------------------------------

# Settings the saved model, optimizer and callback state depend on (module hyper-parameters).
STRUCTURAL_KEYS = (
    ("policy", "model_name_or_path"),
    ("policy", "lora"),
    ("policy", "freeze_vision_tower"),
    ("rollout", "num_generations"),
    ("rewards", "reward_funcs"),
)


MODEL_PATH = ("policy", "model_name_or_path")


def same_model(a: Any, b: Any) -> bool:
    """Whether two ``model_name_or_path`` values name the same model: the same text, or the same local folder
    (a relative path resolved against the working folder, symbolic links followed)."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:  # either is not a local path (a hub name) or does not exist here
        return False


def _lookup(hparams: Any, path: tuple[str, ...]) -> Any:
    value = hparams
    for key in path:
        if value is None:
            return None
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    if hasattr(value, "__dict__") and not isinstance(value, (str, int, float)):
        value = {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return _plain_structure(value)


def _plain_structure(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain_structure(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_structure(v) for k, v in value.items()}
    return value


def check_same_config(saved: Any, current: Any, *, source: str = "the checkpoint") -> None:
    """Raise ``ValueError`` naming the first ``model.*`` key of :data:`STRUCTURAL_KEYS` that differs."""
    if not saved:
        return
    for path in STRUCTURAL_KEYS:
        before, now = _lookup(saved, path), _lookup(current, path)
        if before != now and not (path == MODEL_PATH and same_model(before, now)):
            key = "model." + ".".join(path)
            raise ValueError(
                f"{key}: {source} was trained with {before!r}, this configuration has {now!r}; resume with the "
                f"configuration the checkpoint was made with, or start a new run"
            )


# Settings the optimizer's and the scheduler's saved states carry (AdamW's param groups, LambdaLR's base_lrs): a
# resume keeps the checkpoint's. The schedule's shape (lr_scheduler, warmup_ratio) is rebuilt from the configuration.
OPTIMIZER_STATE_KEYS = ("learning_rate", "adam_betas", "adam_epsilon", "weight_decay")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.learning_rate": ...}`` from nested dicts, dataclasses or jsonargparse namespaces."""
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict) or (prefix and not value):
        return {prefix: _plain_structure(value)} if prefix else {}
    out = {}
    for key, item in value.items():
        if not str(key).startswith("_"):
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_settings(saved: Any, current: Any, defaults: Any = None) -> list[tuple[str, Any, Any]]:
    """``(model.<key>, checkpoint's value, this configuration's value)`` for every setting that differs.

    A key the checkpoint lacks (a setting added since it was written) counts only when this
    configuration sets it to something other than its default (``defaults``: the hyper-parameters
    of a default configuration): the checkpoint was trained with that default.
    """
    if not saved:
        return []
    before, now, default = _flat(saved), _flat(current), _flat(defaults or {})
    changes = []
    for key in sorted(before.keys() | now.keys()):
        if key not in before and key in default and now.get(key) == default[key]:
            continue
        if key == ".".join(MODEL_PATH) and same_model(before.get(key), now.get(key)):
            continue
        if before.get(key) != now.get(key):
            changes.append((f"model.{key}", before.get(key), now.get(key)))
    return changes


def describe_changed_settings(changes: list[tuple[str, Any, Any]]) -> str | None:
    """The warning for a resume whose configuration differs from the checkpoint's (None: nothing differs)."""
    if not changes:
        return None
    lines = [f"{key}: {before!r} in the checkpoint, {now!r} now" for key, before, now in changes]
    kept = [key for key, _, _ in changes if key.split(".")[-1] in OPTIMIZER_STATE_KEYS and key.startswith("model.optim.")]
    message = "resuming with settings that differ from the checkpoint's (this configuration's are used):\n  " + \
        "\n  ".join(lines)
    if kept:
        message += (f"\n{', '.join(kept)}: the optimizer and learning-rate scheduler states restored from the checkpoint "
                    "keep the values they were saved with; start a new run from the exported weights to change them")
    return message


# --- how far the checkpoint got -----------------------------------------------------------------------


def nothing_left_to_train(checkpoint: dict, max_steps: int | None, source: str = "the checkpoint") -> str | None:
    """The warning for a checkpoint saved at or after ``max_steps`` (the fit would end at once), else None."""
    step = checkpoint.get("global_step")
    if step is None or max_steps is None or max_steps < 0 or step < max_steps:
        return None
    return (f"{source} was saved after step {step} and trainer.max_steps is {max_steps}: nothing is left to train "
            f"(the fit ends at once); raise trainer.max_steps above {step} to train further")


def warn_if_nothing_left_to_train(checkpoint: dict, trainer) -> None:
    """Warn (rank 0) when resuming ``checkpoint`` leaves no step to train under ``trainer.max_steps``."""
    if trainer is None:
        return  # loaded outside a fit (load_from_checkpoint)
    if message := nothing_left_to_train(checkpoint, trainer.max_steps, str(trainer.ckpt_path or "the checkpoint")):
        rank_zero_warn(message)
