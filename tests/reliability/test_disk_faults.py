"""Disk full, unwritable folders: a clear error naming the path, at start (probe write) or at the failing write,
and the previous checkpoint intact."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from rel_helpers import cli_config, fit, make_module, small_disk, write_config

from dapo_lightning.callbacks import MarkdownRolloutLog
from dapo_lightning import storage
from dapo_lightning.storage import AtomicCheckpointIO, atomic_write, install_atomic_checkpoint_io


class StepCounter(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


@pytest.mark.parametrize("folder", ["default_root_dir", "checkpoints", "markdown"])
@pytest.mark.reliability("Faults", "Unwritable {folder} folder (a path under a regular file)",
                         "OSError naming the folder before the first step")
def test_an_unwritable_folder_fails_before_training(folder, tmp_path, tiny_model_dir, synthetic_parquet):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "sub"
    counter = StepCounter()
    callbacks = [counter]
    root = tmp_path / "run"
    if folder == "default_root_dir":
        root = bad
    if folder == "markdown":
        callbacks.append(MarkdownRolloutLog(dirpath=str(bad)))
    module = make_module(tiny_model_dir)
    with pytest.raises(OSError) as error:
        if folder == "checkpoints":
            from lightning.pytorch.callbacks import ModelCheckpoint

            callbacks.append(ModelCheckpoint(dirpath=str(bad), save_last=True))
        fit(root, module, tiny_model_dir, synthetic_parquet, callbacks=callbacks, checkpoint_every=None)
    assert str(bad) in str(error.value) and error.value.errno == errno.ENOTDIR
    if folder != "default_root_dir":  # (that one Lightning's logger trips on first, naming the path too)
        assert "is not writable" in str(error.value)
    assert counter.batches == 0


@pytest.mark.reliability("Faults", "Disk full at start (ENOSPC on the probe write's fsync)",
                         "OSError 'No space left on device' naming the folder before the first step")
def test_a_full_disk_fails_before_training(tmp_path, tiny_model_dir, synthetic_parquet, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", full)
    counter = StepCounter()
    with pytest.raises(OSError, match=rf"the output folder \(trainer.default_root_dir\) {tmp_path} is not writable "
                                      r"\(No space left on device\)"):
        fit(tmp_path, make_module(tiny_model_dir), tiny_model_dir, synthetic_parquet, callbacks=[counter])
    assert counter.batches == 0 and not list(tmp_path.glob(".write-probe-*"))


class FullAfter(AtomicCheckpointIO):
    """The disk fills up in the middle of the ``fail_at``-th checkpoint write."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.saves = fail_at, 0

    def dump(self, checkpoint, f):
        self.saves += 1
        if self.saves == self.fail_at:
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().dump(checkpoint, f)


@pytest.mark.reliability("Faults", "Disk full in the middle of a checkpoint write (step 2)",
                         "OSError naming the checkpoint path; last.ckpt still holds the complete step-1 checkpoint; "
                         "no partial file left")
def test_a_full_disk_mid_write_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir,
                                                                               synthetic_parquet):
    class WithFullDisk(Callback):
        def setup(self, trainer, module, stage):  # after DAPOModule.setup installed the default writer
            trainer.strategy.checkpoint_io = FullAfter(fail_at=3)  # step 1: top-k file, last; step 2: top-k file

    module = make_module(tiny_model_dir)
    with pytest.raises(OSError) as error:
        fit(tmp_path, module, tiny_model_dir, synthetic_parquet, batches=3, callbacks=[WithFullDisk()],
            checkpoint_every=1)
    message = str(error.value)
    assert message.startswith("[Errno 28] cannot write the checkpoint ") and "epoch=0-step=2.ckpt" in message
    assert "(No space left on device); nothing was written there" in message
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]


class FillsTheDisk(AtomicCheckpointIO):
    """Before the ``at``-th checkpoint write, fills the disk up to ``leave`` free bytes; records what torch raised.

    Where the write runs out of space decides what torch raises: mostly its zip writer's
    ``RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos ...')`` (the file's
    ``OSError`` only as its context), at a few offsets the ``OSError`` itself. 512 KiB into this
    2.1 MB checkpoint it is the RuntimeError (measured: every offset from 384 to 592 KiB).
    """

    def __init__(self, at: int, leave: int):
        super().__init__()
        self.at, self.leave, self.saves, self.raised = at, leave, 0, None

    def dump(self, checkpoint, f):
        self.saves += 1
        if self.saves == self.at:
            folder = Path(f.name).parent.parent
            with open(folder / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * 4096)
            os.truncate(folder / "filler", os.path.getsize(folder / "filler") - self.leave)
        try:
            super().dump(checkpoint, f)
        except BaseException as error:
            self.raised = error
            raise


@pytest.mark.reliability("Faults", "A really full disk while a checkpoint is written (3 MB tmpfs as default_root_dir, "
                         "2.1 MB checkpoints, one every step; last.ckpt runs out of space 512 KiB in)",
                         "OSError 'No space left on device' naming last.ckpt (torch's RuntimeError 'unexpected pos' "
                         "converted); the step-1 checkpoint written before it loads; no partial file left")
def test_a_really_full_disk_mid_checkpoint_names_the_file(tmp_path, tiny_model_dir, synthetic_parquet):
    writer = FillsTheDisk(at=2, leave=512 * 1024)  # step 1: epoch=0-step=1.ckpt is written whole, then last.ckpt

    class WithTheWriter(Callback):
        def setup(self, trainer, module, stage):  # after DAPOModule.setup installed the default writer
            trainer.strategy.checkpoint_io = writer

    counter = StepCounter()
    with small_disk(tmp_path / "disk", "3m") as root:
        with pytest.raises(OSError) as error:
            fit(root, make_module(tiny_model_dir), tiny_model_dir, synthetic_parquet, batches=3,
                callbacks=[counter, WithTheWriter()], checkpoint_every=1)
        folder = root / "ckpt"
        assert isinstance(writer.raised, RuntimeError) and "unexpected pos" in str(writer.raised), (
            f"torch raised {writer.raised!r} at this offset, not its zip writer's RuntimeError: choose another leave")
        assert error.value.errno == errno.ENOSPC
        assert str(error.value) == (f"[Errno 28] cannot write the checkpoint {folder / 'last.ckpt'} (No space left on "
                                    "device); nothing was written there")
        assert counter.batches == 1
        assert torch.load(folder / "epoch=0-step=1.ckpt", weights_only=True)["global_step"] == 1
        assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt"]


def test_a_writer_error_behind_a_runtime_error_is_an_os_error_naming_the_file(tmp_path):
    """torch's zip writer turns the file's OSError into RuntimeError('[enforce fail at inline_container.cc] ...')."""
    def torch_like(f):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(OSError, match=r"^\[Errno 28\] cannot write the checkpoint .*x.ckpt \(No space left on "
                                      r"device\); nothing was written there$"):
        atomic_write(tmp_path / "x.ckpt", torch_like, what="checkpoint")
    with pytest.raises(RuntimeError, match="a bug"):  # any other error passes through unchanged
        atomic_write(tmp_path / "x.ckpt", lambda f: (_ for _ in ()).throw(RuntimeError("a bug")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.reliability("Faults", "Disk already full at start, CLI run (tmpfs with no byte free as default_root_dir; "
                         "TensorBoard logger)",
                         "OSError naming the output folder before the logger writes: no writer-thread traceback, "
                         "nothing trained")
def test_a_disk_full_at_start_fails_before_the_logger_writes_cli(tmp_path, tiny_model_dir, synthetic_parquet, capfd):
    from dapo_lightning.cli import main

    config = cli_config(tmp_path, tiny_model_dir, synthetic_parquet)
    with small_disk(tmp_path / "disk", "1m", fill=True) as disk:
        config["trainer"]["default_root_dir"] = str(disk / "run")
        del config["trainer"]["callbacks"][-1]["init_args"]["dirpath"]  # checkpoints in <default_root_dir>/checkpoints
        with pytest.raises(OSError) as error:
            main(["fit", "--config", str(write_config(tmp_path, config))])
        assert str(error.value) == (f"[Errno 28] the output folder (trainer.default_root_dir) {disk / 'run'} is not "
                                    "writable (No space left on device); fix it or choose another folder before "
                                    "training starts")
        assert [p.name for p in disk.rglob("*") if p.is_file()] == ["filler"]
    assert "Exception in thread" not in capfd.readouterr().err


@pytest.mark.reliability("Faults", "Disk already full at start, Trainer(...).fit(module, data) in Python (TensorBoard "
                         "logger)",
                         "OSError naming the output folder before the logger writes, nothing trained")
def test_a_disk_full_at_start_fails_before_the_logger_writes_python(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                    capfd):
    counter = StepCounter()
    with small_disk(tmp_path / "disk", "1m", fill=True) as disk:
        with pytest.raises(OSError) as error:
            fit(disk / "run", make_module(tiny_model_dir), tiny_model_dir, synthetic_parquet, callbacks=[counter])
        assert str(error.value).startswith(f"[Errno 28] the output folder (trainer.default_root_dir) {disk / 'run'} "
                                           "is not writable (No space left on device)")
    assert counter.batches == 0 and "Exception in thread" not in capfd.readouterr().err


def test_atomic_write_replaces_whole_files_only(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    with pytest.raises(OSError, match=r"cannot write the file .*state.bin \(boom\); the previous file there is "
                                      r"unchanged"):
        atomic_write(target, lambda f: (f.write(b"half"), (_ for _ in ()).throw(OSError(5, "boom"))))
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]
    with pytest.raises(KeyboardInterrupt):  # any interruption removes the temporary file
        atomic_write(target, lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_stale_partials_of_dead_writers_are_swept(tmp_path):
    dead = tmp_path / ".last.ckpt.999999999.partial"  # no such process
    alive = tmp_path / f".other.ckpt.{os.getppid()}.partial"
    dead.write_bytes(b"half")
    alive.write_bytes(b"being written")
    AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "last.ckpt"])


def test_the_writer_is_installed_in_place_of_the_default_only(tmp_path, tiny_model_dir):
    from types import SimpleNamespace

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class Custom(TorchCheckpointIO):
        pass

    strategy = SimpleNamespace(checkpoint_io=TorchCheckpointIO())
    assert install_atomic_checkpoint_io(SimpleNamespace(strategy=strategy))
    assert type(strategy.checkpoint_io) is AtomicCheckpointIO
    custom = SimpleNamespace(checkpoint_io=Custom())
    assert not install_atomic_checkpoint_io(SimpleNamespace(strategy=custom)) and type(custom.checkpoint_io) is Custom

    class DeepSpeedStrategy(SimpleNamespace):
        pass

    deepspeed = DeepSpeedStrategy(checkpoint_io=TorchCheckpointIO())
    assert not install_atomic_checkpoint_io(SimpleNamespace(strategy=deepspeed))
