"""What a run logs, through the command line: validation at the step the console names, the accuracy before
training, TensorBoard steps that continue across a resume, no warning about the order the data module restores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path: Path, model_dir, parquet, *, steps: int, checkpoint_every: int, resume: bool = False):
    """``dapo-lightning fit`` of the demo for ``steps`` steps, validating every 2, ``last.ckpt`` kept."""
    overlay = tmp_path / "checkpoints.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"enable_checkpointing": True},
        "callbacks": {
            "model_checkpoint": {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                "every_n_train_steps": checkpoint_every, "save_top_k": -1, "save_last": True}},
            "modality_probe": {"class_path": "dapo_lightning.callbacks.ModalityProbe",
                               "init_args": {"variants": ["image_text", "image_only"]}},
        },
    }))
    args = [sys.executable, "-m", "dapo_lightning.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--config", str(overlay), f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2",
            f"--trainer.default_root_dir={tmp_path / 'run'}", f"--model.policy.model_name_or_path={model_dir}",
            f"--data.train_path={parquet}", "--data.eval_limit=4", "--data.batch_size=2",
            "--trainer.enable_progress_bar=false", "--model.export_final=false"]
    if resume:
        args += ["--ckpt_path", "last"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def steps_of(run_dir: Path) -> dict[str, list[int]]:
    """{tag: steps} over every TensorBoard event file of the run (the first fit's and the resumed one's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[int]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: p.parent.name):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.step for e in accumulator.Scalars(tag))
    return out


# every_n_train_steps 2: the step-2 checkpoint is written after the step (ModelCheckpoint's on_train_batch_end);
# 100: ``last.ckpt`` is only written when the fit ends at max_steps, which Lightning records as a finished epoch
@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [2, 100])
def test_logged_steps_follow_the_console_and_continue_after_a_resume(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                      checkpoint_every):
    first = fit(tmp_path, tiny_model_dir, synthetic_parquet, steps=2, checkpoint_every=checkpoint_every)
    assert "[eval] before training: accuracy" in first and "[eval] step 2: accuracy" in first
    resumed = fit(tmp_path, tiny_model_dir, synthetic_parquet, steps=4, checkpoint_every=checkpoint_every,
                  resume=True)
    assert "Restored all states from the checkpoint" in resumed and "[eval] step 4: accuracy" in resumed
    # the data module restores the order itself (ResumableShuffleSampler): Lightning's warning is not for it
    assert "dataloader is not resumable" not in first + resumed
    steps = steps_of(tmp_path / "run")
    # train/* of the k-th step at k - 1 (Lightning's count of finished steps), across the resume without a gap;
    # validation at the step the console names, and before training at 0
    assert steps["train/loss"] == [0, 1, 2, 3]
    assert steps["val/accuracy"] == steps["val/reward_mean"] == steps["val/rewards/accuracy/mean"] == [0, 2, 4]
    assert steps["val/probe/image_only/accuracy"] == [2, 4]  # a callback's validation scalars: the same steps
