"""``GracefulShutdown``: SIGTERM or Ctrl-C finishes the step, saves a resumable checkpoint, then exits.

A scheduler's SIGTERM (pre-emption, time limit) or a Ctrl-C does not kill the run mid-step:
the handler only records the signal. At the end of the step in progress (the same point
``ModelCheckpoint`` saves at, so the state is one a resume continues exactly from) every
process agrees to stop (one all-reduce per step, so they stop after the same step even
when the signal reached them at different moments), the checkpoint is written, and the
run ends with exit status 128 + the signal number. ``MarkdownRolloutLog`` writes the
latest step's rollout (its log tail) when the run stops.

Where the checkpoint goes: the ``last`` file of every ``ModelCheckpoint(save_last=True)``;
without one, ``<default_root_dir>/checkpoints/last.ckpt`` (:func:`fallback_folder`). A run that
did not resume from that file never overwrites it (an earlier run's state): as Lightning's
``ModelCheckpoint`` does, it takes the next free ``last-v1.ckpt``, ``last-v2.ckpt``, ... The
message names the file and prints the command that resumes from it; ``dapo-lightning fit
--ckpt_path last`` finds it too (:func:`newest_last_checkpoint`: the newest ``last*.ckpt`` of the
``ModelCheckpoint`` folders and of the fallback folder, where Lightning looks only in the former).

A second Ctrl-C aborts at once (the previous complete checkpoint stays valid: checkpoints
are written atomically). A signal that arrives during validation stops the run at the end
of the next training step. Lightning's own SIGTERM handler is replaced while training runs
(it stops only after validation and exits with status 0) and restored afterwards; under
DDP rank 0 forwards SIGTERM to the processes it started, as Lightning's does.

The CLI adds this callback to every run (``shutdown:`` in the config; ``shutdown.signals: []``
turns it off).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dapo_lightning import distributed, storage

SIGNALS = ("SIGTERM", "SIGINT")


class ShutdownRequested(SIGTERMException):
    """The run stopped on a signal after saving ``checkpoint``; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


class GracefulShutdown(Callback):
    def __init__(self, signals: list[str] = list(SIGNALS), save_checkpoint: bool = True):
        """
        Args:
            signals: Signals that stop the run after the current step (SIGTERM, SIGINT; empty: none).
            save_checkpoint: Save a resumable checkpoint before exiting.
        """
        unknown = [s for s in signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"GracefulShutdown.signals: unknown {unknown}; choose from {list(SIGNALS)}")
        self.signals = list(signals)
        self.save_checkpoint = save_checkpoint
        self.requested: int | None = None  # the signal received, if any
        self.resume_command: list[str] | None = None  # the command that started the run, set by the CLI
        self._previous: dict[int, object] = {}
        self._trainer = None

    # --- handlers -------------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        self.requested = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            self._restore()  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        first = self.requested is None
        self.requested = signum
        trainer = self._trainer
        if signum == signal.SIGTERM and trainer is not None and trainer.is_global_zero:
            launcher = trainer.strategy.launcher
            if launcher is not None and hasattr(launcher, "procs"):
                launcher.kill(signum)  # the processes rank 0 started (a terminal's Ctrl-C reaches them itself)
        if first:  # os.write, not print: a handler that prints while the program prints raises "reentrant call"
            hint = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
            os.write(2, f"[rank {trainer.global_rank if trainer else 0}] received {signal.Signals(signum).name}: "
                        f"stopping after this step and saving a checkpoint{hint}\n".encode())

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # --- stopping -------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        path = self._save(trainer) if self.save_checkpoint else None
        self._restore()
        saved = f"; the checkpoint is {path}; resume with:\n  {self._resume_hint(path)}" if path else ""
        rank_zero_info(f"stopped after step {trainer.global_step} on {signal.Signals(signum).name}{saved}")
        raise ShutdownRequested(signum, path)

    def _agreed_signal(self, trainer) -> int:
        """The signal any process received (the same answer on every process), or 0."""
        flag = torch.tensor(self.requested or 0, dtype=torch.int64, device=trainer.strategy.root_device)
        return int(distributed.global_max(flag))

    def _save(self, trainer) -> str:
        paths = []
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                if not callback.last_model_path:  # recorded in the checkpoint, so a resumed run writes the same file
                    callback.last_model_path = _free_last_path(callback, trainer)
                paths.append(callback.last_model_path)
        if not paths:
            paths = [_fallback_path(trainer)]
        for path in dict.fromkeys(paths):
            trainer.save_checkpoint(path)  # every process: the module gathers per-rank state
        return paths[0]

    def _resume_hint(self, path: str) -> str:
        if self.resume_command:
            return shlex.join([*self.resume_command, "--ckpt_path", path])
        return f"trainer.fit(model, datamodule, ckpt_path={path!r})"

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()


# --- where the checkpoint goes, where a resume finds it ---------------------------------------------------


def fallback_folder(trainer) -> Path:
    """Where the checkpoint goes when no ``ModelCheckpoint(save_last=True)`` has a folder."""
    return Path(trainer.default_root_dir) / "checkpoints"


def _free_last_path(callback: ModelCheckpoint, trainer) -> str:
    """``ModelCheckpoint``'s own choice for a run's first ``last`` file: ``last.ckpt``, else the first free
    ``last-v1.ckpt``, ``last-v2.ckpt``, ... (its ``enable_version_counter``)."""
    candidates = callback._monitor_candidates(trainer)
    path = callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST)
    version = callback.STARTING_VERSION
    while callback._enable_version_counter and callback.file_exists(path, trainer):  # file_exists: rank 0's answer
        path = callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST, ver=version)
        version += 1
    return path


def _fallback_path(trainer) -> str:
    """``last.ckpt`` of :func:`fallback_folder`: overwritten only by the run that resumed from it, else the first
    free ``last-v1.ckpt``, ``last-v2.ckpt``, ... (rank 0 decides)."""
    folder = fallback_folder(trainer)
    resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
    path, version = folder / "last.ckpt", 1
    while path.exists() and path.resolve() != resumed:
        path, version = folder / f"last-v{version}.ckpt", version + 1
    return trainer.strategy.broadcast(str(path))


def last_checkpoints(trainer) -> list[Path]:
    """Every ``last*.ckpt`` a resume from ``last`` considers: each ``ModelCheckpoint`` folder's (Lightning's
    rule) and :func:`fallback_folder`'s (where this callback saves when there is no ``ModelCheckpoint``)."""
    found = {}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            found.update((Path(p).resolve(), None) for p in callback._find_last_checkpoints(trainer))
    pattern = re.compile(r"last(-v\d+)?\.ckpt")
    folder = fallback_folder(trainer)
    if folder.is_dir():
        found.update((p.resolve(), None) for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file())
    return list(found)


def newest_last_checkpoint(trainer) -> str | None:
    """The most recently written of :func:`last_checkpoints` (what ``--ckpt_path last`` resumes), or None.

    None too when a ``ModelCheckpoint`` writes to an object store: Lightning's own ``last`` decides then.
    """
    if any(not storage.is_local(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)):
        return None
    paths = last_checkpoints(trainer)
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None
