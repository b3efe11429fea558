"""What is checked before a fit spends time: output folders, the DeepSpeed config, the export folder.

The callbacks' and rewards' declarations are checked by ``hooks.check_callbacks`` (at set-up,
before the model loads); the checks here need the trainer's loggers and strategy and run at
fit start. Each error names the folder or the config key.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from dapo_lightning import storage
from dapo_lightning.config import OptimConfig


def check_output_folders(trainer, policy) -> None:
    """Probe-write every folder this run writes to (rank 0 writes them all); an error names the folder.

    Every process raises the same error (a broadcast), so none waits forever for a dead rank 0.
    """
    problem = None
    log_dir = trainer.log_dir if trainer.loggers else None  # a collective under DDP: every process asks
    if trainer.is_global_zero:
        folders = {"output folder (trainer.default_root_dir)": trainer.default_root_dir}
        if log_dir:
            folders["log folder"] = log_dir
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                folders["checkpoint folder"] = callback.dirpath
        try:
            for what, folder in folders.items():
                storage.probe_writable(folder, what)
        except OSError as error:
            problem = (error.errno, error.strerror)
        free = storage.free_bytes(trainer.default_root_dir) if problem is None else None
        need = storage.checkpoint_bytes(policy) if policy is not None else 0
        if trainer.checkpoint_callbacks and free is not None and free < need:
            rank_zero_warn(f"{free / 2**30:.1f} GiB free where this run writes; a checkpoint of this model "
                           f"takes about {need / 2**30:.1f} GiB (and is written beside the previous one)")
    problem = trainer.strategy.broadcast(problem)
    if problem is not None:
        raise OSError(*problem)


def check_strategy(trainer, optim: OptimConfig) -> None:
    """Refuse a DeepSpeed config that would train on the wrong gradient (see :func:`deepspeed_accumulation_problem`)."""
    if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
        problem = deepspeed_accumulation_problem(getattr(trainer.strategy, "config", None), optim)
        if problem:
            raise ValueError(problem)


def deepspeed_accumulation_problem(config: dict | None, optim: OptimConfig) -> str | None:
    """Why a DeepSpeed config would train on the wrong gradient with this module's micro-batches, or None.

    The update calls backward once per micro-batch and steps once. With DeepSpeed's managed
    accumulation and gradient_accumulation_steps 1 (what Lightning sets), every backward is an
    accumulation boundary, and ZeRO-2 resets its gradient partition there: only the last
    micro-batch's gradient reaches the optimizer. ``"managed_gradient_accumulation": false``
    (DeepSpeed >= 0.19) makes ``step()`` the boundary instead.
    """
    if not config or optim.micro_batch_size is None:
        return None  # one backward per optimizer step: any accumulation mode is right
    if config.get("managed_gradient_accumulation", True) is not False:
        return (
            'trainer.strategy: the DeepSpeed config must set "managed_gradient_accumulation": false when '
            "model.optim.micro_batch_size splits a step into several backward passes (with managed accumulation "
            "ZeRO keeps only the last micro-batch's gradient); see configs/deepspeed_zero2.json"
        )
    import deepspeed.runtime.config as ds_config

    if not hasattr(ds_config, "get_managed_gradient_accumulation"):
        return (
            'trainer.strategy: this DeepSpeed ignores "managed_gradient_accumulation"; install a DeepSpeed that '
            "supports it (0.19.8 does) or set model.optim.micro_batch_size: null"
        )
    return None


def free_folder(path: Path) -> Path:
    """``path`` if it is absent or empty, else the first free ``path-1``, ``path-2``, ... (never overwrite)."""
    candidate, n = path, 0
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
