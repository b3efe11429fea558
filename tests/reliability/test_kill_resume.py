"""SIGKILL in the middle of a step and in the middle of a checkpoint write; ``fit --ckpt_path last`` recovers exactly.

Each killed run is a ``dapo-lightning fit`` subprocess (4 steps, a checkpoint every 2, ``last.ckpt``)
that blocks at the chosen point and is killed there. The resumed run continues from the last
complete checkpoint and must end with the same parameters as an uninterrupted run, to 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rel_helpers import (
    assert_same_parameters,
    cli_config,
    kill_when,
    policy_state,
    start_cli,
    write_config,
)

from dapo_lightning.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    tmp = tmp_path_factory.mktemp("kills")
    mid_step, mid_write, straight = tmp / "mid_step", tmp / "mid_write", tmp / "straight"
    # both killed runs start at once (two cores); the uninterrupted run goes in this process meanwhile
    step_config = write_config(mid_step, cli_config(mid_step, tiny_model_dir, synthetic_parquet, callbacks=[
        {"class_path": "rel_helpers.BlockMidStep", "init_args": {"step": 2, "marker": str(mid_step / "blocked")}}]))
    write_cfg = cli_config(mid_write, tiny_model_dir, synthetic_parquet)
    # saves: step 2 top-k file, step 2 last.ckpt, step 4 top-k file, step 4 last.ckpt <- half written, killed
    write_cfg["trainer"]["plugins"] = [{"class_path": "rel_helpers.HalfWriteCheckpointIO",
                                        "init_args": {"block_at": 4, "marker": str(mid_write / "blocked")}}]
    write_config_path = write_config(mid_write, write_cfg)
    processes = [(start_cli(step_config, log=mid_step / "log.txt"), mid_step),
                 (start_cli(write_config_path, log=mid_write / "log.txt"), mid_write)]
    try:
        main(["fit", "--config", str(write_config(straight, cli_config(straight, tiny_model_dir, synthetic_parquet)))])
        for process, folder in processes:
            kill_when(process, folder / "blocked", folder / "log.txt")
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
    seen = {folder.name: sorted(p.name for p in (folder / "ckpt").iterdir()) for folder in (mid_step, mid_write)}
    for folder in (mid_step, mid_write):  # what a resume from "last" starts from
        seen[folder.name + "/last_step"] = torch.load(folder / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    for folder in (mid_step, mid_write):  # resume without the fault injector: same run, as a user would restart it
        main(["fit", "--config", str(write_config(folder, cli_config(folder, tiny_model_dir, synthetic_parquet),
                                                  "resume.yaml")), "--ckpt_path", "last"])
    return straight, mid_step, mid_write, seen


@pytest.mark.reliability("Faults", "SIGKILL in the middle of a training step (subprocess)",
                         "fit --ckpt_path last resumes from the step-2 checkpoint; final parameters equal an "
                         "uninterrupted run's to 1e-6")
def test_a_kill_mid_step_resumes_to_the_same_parameters(runs):
    straight, mid_step, _, seen = runs
    assert seen["mid_step"] == ["epoch=0-step=2.ckpt", "last.ckpt"]  # what the killed run left
    assert seen["mid_step/last_step"] == 2
    final = torch.load(mid_step / "ckpt" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 4
    assert_same_parameters(policy_state(straight / "ckpt" / "last.ckpt"), policy_state(mid_step / "ckpt" / "last.ckpt"))


@pytest.mark.reliability("Faults", "SIGKILL in the middle of writing a checkpoint (subprocess)",
                         "last.ckpt still holds the previous complete checkpoint (the half-written file is a hidden "
                         ".partial that 'last' never picks); the resume reaches the uninterrupted parameters to 1e-6")
def test_a_kill_mid_checkpoint_write_leaves_the_previous_checkpoint_and_resumes(runs):
    straight, _, mid_write, seen = runs
    left = seen["mid_write"]
    partial = [name for name in left if name.endswith(".partial")]
    assert len(partial) == 1 and partial[0].startswith(".last.ckpt."), left
    assert "last.ckpt" in left and "epoch=0-step=4.ckpt" in left  # step 4's top-k file was complete
    assert seen["mid_write/last_step"] == 2  # the resume started from step 2, not from the partial step-4 write
    final = torch.load(mid_write / "ckpt" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 4
    assert_same_parameters(policy_state(straight / "ckpt" / "last.ckpt"), policy_state(mid_write / "ckpt" / "last.ckpt"))
    # the resumed run's first save swept away the dead writer's partial file
    assert not [p for p in Path(mid_write / "ckpt").iterdir() if p.name.endswith(".partial")]


@pytest.mark.reliability("Faults", "Resume with --ckpt_path last when ModelCheckpoint has no dirpath (TensorBoard "
                         "logger: a new version folder per run)",
                         "the CLI puts checkpoints in <default_root_dir>/checkpoints, so the second run resumes at "
                         "step 2 instead of silently starting over")
def test_last_is_found_without_a_checkpoint_dirpath(tmp_path, tiny_model_dir, synthetic_parquet):
    config = cli_config(tmp_path, tiny_model_dir, synthetic_parquet, every=2)
    del config["trainer"]["callbacks"][-1]["init_args"]["dirpath"]
    path = write_config(tmp_path, config)
    main(["fit", "--config", str(path), "--trainer.max_steps=2"])
    main(["fit", "--config", str(path), "--ckpt_path", "last"])
    folder = tmp_path / "run" / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()) == ["version_0", "version_1"]


@pytest.mark.reliability("Faults", "Checkpoint of a run that builds its synthetic data (demo, cpu.yaml)",
                         "the data module's settings are plain values, so the checkpoint loads with weights_only=True "
                         "and the run can resume")
def test_a_synthetic_data_run_checkpoints_plain_values(tmp_path):
    import io

    from dapo_lightning.data import VisualMCQDataModule, SyntheticData

    data = VisualMCQDataModule(train_path=str(tmp_path / "x.parquet"), build_synthetic_if_missing=SyntheticData(rows=10))
    buffer = io.BytesIO()
    torch.save({"datamodule_hyper_parameters": dict(data.hparams)}, buffer)  # what Lightning's checkpoint holds
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["datamodule_hyper_parameters"]
    assert loaded["build_synthetic_if_missing"]["rows"] == 10
