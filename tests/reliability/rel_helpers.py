"""Shared pieces of the reliability tests: a CLI run config, fault injectors, parameter reads."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback

from dapo_lightning.storage import AtomicCheckpointIO
from dapo_lightning.hooks import RolloutCallback

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
REWARDS = ["rel_helpers.starts_with_abc", "format"]


# --- rewards ---------------------------------------------------------------------------------------------


def starts_with_abc(completions, **kwargs):
    """1 when the completion starts with A, B or C (varies within groups of the tiny model's completions)."""
    return [1.0 if c[:1] in "ABC" else 0.0 for c in completions]


def nan_for_row_one(completions, **kwargs):
    """A reward with a bug: NaN for the second completion, 1 elsewhere."""
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def always_nan(completions, **kwargs):
    return [math.nan for _ in completions]


def divides_by_length(completions, **kwargs):
    """Raises ZeroDivisionError on an empty completion, as a careless reward would."""
    return [1.0 / len(c) for c in completions]


def raises_on_batches(completions, **kwargs):
    """Fails only when called on more than one group's worth of completions: no single group reproduces it."""
    if len(completions) > kwargs["num_generations"]:
        raise RuntimeError("batch-level failure")
    return [0.5 for _ in completions]


# --- CLI runs ----------------------------------------------------------------------------------------------


def cli_config(tmp: Path, model_dir, parquet, *, steps: int = 4, every: int = 2, callbacks=(), markdown=False,
               **model) -> dict:
    """A tiny single-process fit that checkpoints every ``every`` steps into ``tmp/ckpt`` (with last.ckpt)."""
    cbs = [
        {"class_path": "dapo_lightning.callbacks.RewardWeightWarmup", "init_args": {"early_reward_weights": [2.0, 0.5]}},
        {"class_path": "dapo_lightning.callbacks.ReplayBuffer", "init_args": {"replay_buffer_size": 3}},
        *callbacks,
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": every, "save_last": True}},
    ]
    if markdown:
        cbs.insert(0, {"class_path": "dapo_lightning.callbacks.MarkdownRolloutLog",
                       "init_args": {"dirpath": str(tmp / "md"), "every_n_steps": 2}})
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": steps, "default_root_dir": str(tmp / "run"), "log_every_n_steps": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "callbacks": cbs,
        },
        "model": {"policy": {"model_name_or_path": str(model_dir)},
                  "rollout": {"num_generations": 4, "max_completion_length": 3},
                  "rewards": {"reward_funcs": REWARDS}, "optim": {"learning_rate": 1e-2}, "export_final": False,
                  **model},
        "data": {"train_path": str(parquet), "batch_size": 2, "system_prompt": None},
    }


def write_config(tmp: Path, config: dict, name: str = "run.yaml") -> Path:
    path = tmp / name
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def start_cli(config: Path, *extra: str, log: Path) -> subprocess.Popen:
    """``dapo-lightning fit --config config`` in a subprocess writing its output to ``log``."""
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "dapo_lightning.cli", "fit", "--config", str(config), *extra],
                            cwd=config.parent, env=child_env(), stdout=handle, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, marker: Path, log: Path, timeout: float = 240.0) -> None:
    """SIGKILL ``process`` as soon as ``marker`` exists (it blocks there); fail if it exits first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {marker.name}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{marker.name} not reached in {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL


def policy_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


# --- fault injectors (used inside the killed runs) ---------------------------------------------------------


class BlockMidStep(RolloutCallback):
    """At training step ``step`` (0-based global step), after the rollout is scored: touch ``marker``, then block."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train" and trainer.global_step == self.step:
            Path(self.marker).touch()
            time.sleep(600)


class HalfWriteCheckpointIO(AtomicCheckpointIO):
    """Writes the ``block_at``-th checkpoint halfway, touches ``marker``, then blocks (to be killed there)."""

    def __init__(self, block_at: int = 2, marker: str = "half-written"):
        super().__init__()
        self.block_at, self.marker, self.saves = block_at, marker, 0

    def dump(self, checkpoint, f):
        self.saves += 1
        if self.saves < self.block_at:
            return super().dump(checkpoint, f)
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(self.marker).touch()
        time.sleep(600)


class WaitAt(Callback):
    """At training step ``step`` (0-based global step): touch ``ready``, then wait until ``go`` exists."""

    def __init__(self, step: int, ready: str, go: str, timeout: float = 240.0):
        self.step, self.ready, self.go, self.timeout = step, ready, go, timeout

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.ready).touch()
            deadline = time.monotonic() + self.timeout
            while not Path(self.go).exists() and time.monotonic() < deadline:
                time.sleep(0.05)


class SignalAt(RolloutCallback):
    """Sends ``signum`` to this process during training step ``step`` (``times`` times), as a scheduler would."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, times: int = 1):
        self.step, self.signum, self.times = step, signum, times

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train" and not rollout.is_extra and trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class RecordSteps(Callback):
    """Appends the global step of every training batch this run trains to the JSON list in ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import json

        steps = json.loads(Path(self.path).read_text()) if Path(self.path).exists() else []
        Path(self.path).write_text(json.dumps([*steps, trainer.global_step]))


def steps_trained(path: Path) -> list[int]:
    """What :class:`RecordSteps` wrote (and forget it, for the next run)."""
    import json

    steps = json.loads(path.read_text()) if path.exists() else []
    path.unlink(missing_ok=True)
    return steps


# --- a really full disk ------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "3m", *, fill: bool = False):
    """A tmpfs of ``size`` mounted at ``folder`` (``fill``: with no byte left free), unmounted afterwards.

    Skips the test only where mounting is not permitted (not root, or a container without the
    right to mount); any other failure to mount is a test failure.
    """
    import pytest

    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root on Linux); CI runs this as root")
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        reason = mount.stderr.strip()
        if any(word in reason.lower() for word in ("permission denied", "not permitted", "must be superuser")):
            pytest.skip(f"mounting a tmpfs is not permitted here: {reason}")
        raise AssertionError(f"mount -t tmpfs -o size={size} tmpfs {folder} failed: {reason}")
    try:
        if fill:
            with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:  # until ENOSPC: unbuffered, so a short write fills the last page
                    f.write(b"\0" * 65536)
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)  # a writer thread still holds a file open


# --- in-process fits ---------------------------------------------------------------------------------------


def make_module(model_dir, *, rewards=("rel_helpers.starts_with_abc",), weights=None, max_bad_steps=3,
                on_reward_error="raise", lr=1e-2, micro_batch_size=None):
    from dapo_lightning.config import OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
    from dapo_lightning.module import DAPOModule

    return DAPOModule(
        policy=PolicyConfig(model_name_or_path=str(model_dir)),
        rollout=RolloutConfig(num_generations=4, max_completion_length=3, eval_num_generations=2),
        rewards=RewardConfig(reward_funcs=list(rewards), reward_weights=weights, on_reward_error=on_reward_error),
        optim=OptimConfig(learning_rate=lr, max_bad_steps=max_bad_steps, micro_batch_size=micro_batch_size),
        export_final=False,
    )


def fit(root: Path, module, model_dir, parquet, *, steps=-1, batches=3, callbacks=(), checkpoint_every=None,
        ckpt_path=None):
    """``batches`` training batches (or ``steps`` optimizer steps) of B=2 prompts; TensorBoard logs under root."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from dapo_lightning.data import VisualMCQDataModule

    seed_everything(0)
    callbacks = list(callbacks)
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=checkpoint_every,
                                         save_last=True))
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, limit_train_batches=batches,
        default_root_dir=str(root), callbacks=callbacks, logger=TensorBoardLogger(str(root), name="tb"),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
    )
    data = VisualMCQDataModule(train_path=str(parquet), processor=str(model_dir), batch_size=2, eval_limit=2,
                         system_prompt=None)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def scalars(root: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for path in sorted(root.rglob("events.out.tfevents*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points.update({e.step: e.value for e in events.Scalars(tag)})
    return sorted(points.items())


def parameters(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


_calls = {"nan_once": 0, "rank_one": 0}


def nan_once(completions, **kwargs):
    """NaN for every completion of the first call only (a transient fault), then starts_with_abc."""
    _calls["nan_once"] += 1
    return [math.nan] * len(completions) if _calls["nan_once"] == 1 else starts_with_abc(completions)


def nan_on_rank_one_first_step(completions, **kwargs):
    """Under DDP: NaN on rank 1's first train rollout only; rank 0 sees nothing wrong."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 1:
        _calls["rank_one"] += 1
        if _calls["rank_one"] == 1:
            return [math.nan] + starts_with_abc(completions)[1:]
    return starts_with_abc(completions)


class ParamDigest(Callback):
    """Writes each rank's global step, skipped-step count and a digest of its parameters to ``<path>.rank<r>.json``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, module):
        import json

        digest = sum(float(p.detach().double().abs().sum()) for p in module.policy.parameters())
        with open(f"{self.path}.rank{trainer.global_rank}.json", "w") as f:
            json.dump({"global_step": trainer.global_step, "bad_steps": module.bad_steps, "digest": digest}, f)


def raises_on_a(completions, **kwargs):
    """Raises on any completion that does not start with A, B or C (most of the tiny model's)."""
    return [1.0 if c[:1] in "ABC" else float({}["no such key"]) for c in completions]
