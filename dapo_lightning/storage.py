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

- :func:`load_checkpoint_file` (and the writer's loads): a checkpoint that cannot be read because
  it is damaged (cut short, empty, not a checkpoint) is a :class:`DamagedCheckpointError` naming
  the file and the newest intact checkpoint beside it, not torch's traceback (whose advice, to
  load with ``weights_only=False``, is the wrong one for a damaged file).

- :func:`probe_writable`: create, write, ``fsync`` and remove a small file in a folder, so an
  unwritable or full output folder is an error naming the folder before the first step,
  not after hours of training.
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

PARTIAL_SUFFIX = ".partial"


def is_local(path: Any) -> bool:
    """Whether ``path`` is on this machine's file system (not an object store such as ``s3://``)."""
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
        if not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
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
    That includes an ``OSError`` hidden behind another error: torch's zip writer turns a failed
    write into ``RuntimeError('[enforce fail at inline_container.cc:...] . unexpected pos ...')``,
    with the file's ``OSError`` only as its context.
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
        cause = os_error_behind(error)
        if cause is not None:
            before = "the previous file there is unchanged" if path.exists() else "nothing was written there"
            message = f"cannot write the {what} {path} ({cause.strerror or cause}); {before}"
            raise OSError(cause.errno, message) from cause
        raise


def os_error_behind(error: BaseException) -> OSError | None:
    """``error`` if it is an ``OSError``, else the first ``OSError`` it was raised from or while handling.

    Only for errors (``Exception``): a Ctrl-C or a ``SystemExit`` stays what it is.
    """
    if not isinstance(error, Exception):
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with crash-safe writes (see the module docstring) and ``weights_only=True`` loads."""

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local(path):
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
        try:
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=True if weights_only is None else weights_only)
        except Exception:
            if is_local(path) and Path(path).is_file() and not is_intact(path):
                raise DamagedCheckpointError(describe_damaged(Path(path))) from None  # not torch's weights_only advice
            raise


# --- reading checkpoints --------------------------------------------------------------------------------


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: cut short, empty, or not a checkpoint at all."""


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; a damaged file is a :class:`DamagedCheckpointError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        if Path(path).is_file() and not is_intact(path):
            raise DamagedCheckpointError(describe_damaged(Path(path))) from None
        raise


def is_intact(path: str | Path) -> bool:
    """Whether ``path`` is a whole checkpoint file: torch's zip format, its index (written last) complete and
    listing the pickled object. Reads the index only, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def describe_damaged(path: Path) -> str:
    """The error for a damaged checkpoint: what is wrong with it, and the newest intact ``*.ckpt`` beside it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        what = "empty (0 bytes)"
    elif head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # a zip archive's start, not its end (the index)
        what = f"truncated (its zip index is missing), {size} bytes"
    else:
        what = f"not a torch checkpoint, {size} bytes"
    others = sorted((p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    intact = next((p for p in others if is_intact(p)), None)
    if intact is None:
        advice = "no intact checkpoint beside it: start a new run, or restore the file from a copy"
    else:
        advice = (f"the newest intact checkpoint beside it is {intact}: resume from it with --ckpt_path {intact} "
                  "(ckpt_path= in Python)")
    return f"checkpoint {path} is damaged: {what}; {advice}"


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
