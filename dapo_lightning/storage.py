"""Writing files so that a crash, a kill or a full disk never leaves a broken one behind.

- :class:`AtomicCheckpointIO`: Lightning's checkpoint writer, made crash-safe. A checkpoint
  is written to a hidden temporary file in the same folder (``.last.ckpt.<pid>.partial``),
  flushed and ``fsync``-ed, renamed over the target with ``os.replace`` (atomic on POSIX), and
  the folder is ``fsync``-ed so the rename itself survives a power loss. At every moment the
  target path holds either the previous complete checkpoint or the new complete one. The
  temporary name does not end in ``.ckpt``, so ``--ckpt_path last`` (which considers only
  ``last*.ckpt``) can never pick a partial file. Checkpoints load with ``weights_only=True``.

  Lightning's own ``TorchCheckpointIO`` serialises the whole checkpoint into memory and
  commits it through an fsspec transaction whose temporary file lives in the system's temp
  folder: when that is another file system the "rename" is a copy, which a kill can cut
  short, and nothing is ``fsync``-ed. This writer streams ``torch.save`` into the file (no
  second copy of a many-gigabyte checkpoint in memory).

- :func:`install_atomic_checkpoint_io`: ``DAPOModule.setup`` puts the writer in place of the
  strategy's default one, on every process (under DDP only rank 0 writes; FSDP's full state
  dicts go through it too). A writer the user configured (``trainer.plugins``, e.g. an
  asynchronous one) is left alone, and so is DeepSpeed, which writes its own folder of shards
  through its engine and never calls a ``CheckpointIO``.

- :func:`probe_writable`: create, write, ``fsync`` and remove a small file in a folder, so an
  unwritable or full output folder is an error naming the folder before the first step,
  not after hours of training.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

PARTIAL_SUFFIX = ".partial"


def _is_local(path: Any) -> bool:
    from fsspec.utils import get_protocol

    return get_protocol(str(path)) in ("file", "local")


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: Path) -> Path:
    """The temporary file ``path`` is written to: hidden, beside it, never ending in ``.ckpt``."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete temporary files of writers that no longer run (a process killed mid-write leaves one)."""
    removed = []
    for candidate in folder.glob(f".*{PARTIAL_SUFFIX}"):
        pid = candidate.name[: -len(PARTIAL_SUFFIX)].rpartition(".")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], *, what: str = "file") -> None:
    """Write ``path`` through ``write(file)`` atomically: temp file, flush, fsync, rename, fsync the folder.

    On ``OSError`` (disk full, permission, quota) the temporary file is removed and an
    ``OSError`` with the same ``errno`` names ``path``; whatever was at ``path`` before is untouched.
    """
    path = Path(path)
    temp = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        fsync_folder(path.parent)
    except BaseException as error:
        try:
            temp.unlink()
        except OSError:
            pass
        if isinstance(error, OSError):
            before = "the previous file there is unchanged" if path.exists() else "nothing was written there"
            raise OSError(error.errno, f"cannot write the {what} {path} ({error.strerror or error}); {before}") from error
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe writes (see the module docstring) and ``weights_only=True`` loads."""

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # object stores: a put is atomic already
            return
        path = Path(path)
        folder = path.parent.resolve()
        if folder not in self._swept and folder.is_dir():
            self._swept.add(folder)
            for stale in remove_stale_partials(folder):
                rank_zero_info(f"removed {stale}, the unfinished write of a process that was killed")
        atomic_write(path, lambda f: self.dump(checkpoint, f), what="checkpoint")

    def dump(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary file (tests override it to stop halfway)."""
        torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        # Plain tensors and containers only: a checkpoint from elsewhere cannot run code when it is read.
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def install_atomic_checkpoint_io(trainer) -> bool:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` when it has Lightning's default writer.

    Returns whether it did. DeepSpeed (its engine writes the checkpoint folder) and any
    writer the user configured are left as they are.
    """
    strategy = trainer.strategy
    if type(strategy).__name__ == "DeepSpeedStrategy":
        return False
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return isinstance(strategy.checkpoint_io, AtomicCheckpointIO)
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


# --- output folders -------------------------------------------------------------------------------------


def probe_writable(folder: str | Path, what: str) -> None:
    """Create ``folder`` if needed and write, ``fsync`` and delete a small file in it.

    Raises ``OSError`` (same ``errno``) naming ``what`` and the folder when any of it fails.
    """
    folder = Path(folder)
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        try:
            probe.unlink()
        except OSError:
            pass
        raise OSError(
            error.errno, f"the {what} {folder} is not writable ({error.strerror or error}); fix it or choose another "
            "folder before training starts"
        ) from error


def free_bytes(folder: str | Path) -> int | None:
    """Free space of the file system holding ``folder`` (its closest existing parent), or None if unknown."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About what a checkpoint of ``module`` with AdamW states takes: the parameters, plus two float32
    moments per trainable parameter."""
    params = list(module.parameters())
    return sum(p.numel() * p.element_size() for p in params) + sum(8 * p.numel() for p in params if p.requires_grad)
