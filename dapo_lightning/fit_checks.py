"""What is checked before a fit spends time: output folders, the strategy and its DeepSpeed config, the export folder.

The callbacks' and rewards' declarations are checked by ``hooks.check_callbacks`` (at set-up,
before the model loads); the checks here need the trainer's loggers and strategy and run at
fit start, except :func:`check_folders_before_loggers`, which runs before Lightning's loggers
write their first file (they do before any ``setup`` hook). Each error names the folder or the
config key.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from dapo_lightning import storage
from dapo_lightning.config import OptimConfig
from dapo_lightning.distributed import shards_parameters


def check_folders_before_loggers(trainer) -> None:
    """Probe-write the output folder, each logger's folder and each checkpoint folder, on this process.

    For the moment before Lightning's loggers first write (TensorBoard's writes its event file
    before any ``setup`` hook, and on a full disk dies in a writer thread with a bare ``OSError``),
    so the error names the folder instead. No collective (the processes may not be connected
    yet): every process probes, and on a shared folder every process raises the same error.
    Only for a fit; folders on object stores are left to their loggers.
    """
    if trainer.state.fn not in (None, "fit"):
        return
    folders = {"output folder (trainer.default_root_dir)": trainer.default_root_dir}
    for logger in trainer.loggers:
        folder = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
        if folder:
            folders.setdefault(f"log folder ({type(logger).__name__})", folder)
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            folders.setdefault("checkpoint folder", callback.dirpath)
    for what, folder in folders.items():
        if storage.is_local(folder):
            storage.probe_writable(folder, what)


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
    """Refuse a strategy this module cannot train with: a DeepSpeed config that would train on the wrong gradient
    (:func:`deepspeed_accumulation_problem`) or that shards the parameters (ZeRO-3, :func:`deepspeed_stage3_problem`),
    and, under parameter sharding, rows skipped as unusable (:func:`sharded_skip_problem`)."""
    if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
        config = getattr(trainer.strategy, "config", None)
        problem = deepspeed_stage3_problem(config) or deepspeed_accumulation_problem(config, optim)
        if problem:
            raise ValueError(problem)
    problem = sharded_skip_problem(trainer)
    if problem:
        raise ValueError(problem)


def deepspeed_stage3_problem(config: dict | None) -> str | None:
    """Why this DeepSpeed config is refused: ZeRO stage 3, which no run of this project has tested, or None.

    Decoding, the log-prob passes and the update run in lockstep under any sharding (``distributed.py``), but
    ZeRO-3 has further paths (the end-of-fit export gathers FSDP's parameters, not ZeRO-3's) that no machine has
    run: refused rather than risking a hang or a wrong export. ZeRO-2 (``configs/deepspeed_zero2.json``) or FSDP
    (``configs/strategies/fsdp.yaml``) shard the optimizer states and gradients, FSDP the parameters too.
    """
    stage = ((config or {}).get("zero_optimization") or {}).get("stage")
    if stage == 3:
        return ('trainer.strategy: DeepSpeed ZeRO stage 3 ("zero_optimization": {"stage": 3}) is not supported; '
                "use stage 2 (configs/deepspeed_zero2.json) or FSDP (configs/strategies/fsdp.yaml) to shard the "
                "parameters too")
    return None


def sharded_skip_problem(trainer) -> str | None:
    """Why ``data.on_bad_row: skip`` is refused under parameter sharding, or None.

    Every forward is then a collective: a validation batch whose rows were all unusable leaves its
    process out of the others' forwards (the probe's, the decoder's), which would wait for it forever.
    """
    hparams = getattr(getattr(trainer, "datamodule", None), "hparams", None) or {}
    if shards_parameters(trainer) and hparams.get("on_bad_row") == "skip":
        return ("data.on_bad_row: skip cannot be used when trainer.strategy shards the parameters (FSDP): a batch "
                "whose rows are all unusable would leave its process out of the other processes' forwards; check "
                "the files first (python -m dapo_lightning.data_prep validate FILE) and keep on_bad_row: error")
    return None


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


CLAIM_PREFIX = ".claim-"  # + "<pid>@<host>": the file that makes a folder this process's


def free_folder(path: Path) -> Path:
    """Claim the export folder: ``path``, else the first free ``path-1``, ``path-2``, ... (never overwrite).

    Chosen at fit start, written at fit end: the choice is a claim, so two fits sharing a root
    folder never export to the same one. A hidden folder holding a claim file
    (``.claim-<pid>@<host>``) is renamed onto the candidate, which succeeds only where nothing or
    an empty folder is (``rename`` is atomic: of two fits, one wins, the other takes the next
    name). A folder holding only the claim of a process of this machine that has ended (a run
    stopped before its export) is free again. Only rank 0 claims (it exports); the others get
    ``path`` back.
    """
    if rank_zero_only.rank != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 0
    while not _claim(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _claim(folder: Path) -> bool:
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.claiming")
    staging.mkdir(exist_ok=True)
    (staging / f"{CLAIM_PREFIX}{os.getpid()}@{socket.gethostname()}").touch()
    try:
        for _ in range(2):  # once more after releasing an ended process's claim
            try:
                os.rename(staging, folder)
                return True
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise OSError(error.errno, f"cannot claim the export folder {folder} ({error.strerror})") from error
                if not _release_ended_claim(folder):
                    return False
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _release_ended_claim(folder: Path) -> bool:
    """Remove the claim file from ``folder`` if it holds nothing else and its process (on this machine) has ended."""
    try:
        entries = list(folder.iterdir())
    except OSError:  # a file, or unreadable: taken
        return False
    if len(entries) != 1 or not entries[0].name.startswith(CLAIM_PREFIX):
        return False
    pid, _, host = entries[0].name[len(CLAIM_PREFIX):].partition("@")
    if host != socket.gethostname() or not pid.isdigit() or storage.process_alive(int(pid)):
        return False
    try:
        entries[0].unlink()
    except FileNotFoundError:
        pass  # another fit released it first: the rename decides which of us gets it
    return True
