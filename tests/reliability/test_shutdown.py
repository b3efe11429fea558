"""SIGTERM and Ctrl-C: the step in progress finishes, a resumable checkpoint and the Markdown log tail are written.

The signal is sent by the run to itself in the middle of its third step (as a scheduler or a
user would, at an arbitrary moment). The run saves ``last.ckpt`` after that step and exits
with 128 + the signal number; ``fit --ckpt_path last`` continues from step 3 and ends with the
parameters of an uninterrupted 4-step run, to 1e-6. A second Ctrl-C aborts at once and leaves
the previous checkpoint valid.
"""

from __future__ import annotations

import logging
import shlex
import signal

import pytest
import torch
from rel_helpers import assert_same_parameters, cli_config, policy_state, steps_trained, write_config

from dapo_lightning.cli import main


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    tmp = tmp_path_factory.mktemp("straight")
    main(["fit", "--config", str(write_config(tmp, cli_config(tmp, tiny_model_dir, synthetic_parquet)))])
    return policy_state(tmp / "ckpt" / "last.ckpt")


def config_with(tmp, model_dir, parquet, *callbacks):
    config = cli_config(tmp, model_dir, parquet, callbacks=list(callbacks), markdown=True)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] = 3  # rollouts 0 and 3 are written
    return config


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
@pytest.mark.reliability("Faults", "{name} in the middle of step 3 of 4",
                         "the step finishes, last.ckpt is saved at step 3, the Markdown log gets the unwritten step's "
                         "section, exit status 128+signal; the resume reaches the uninterrupted parameters to 1e-6")
def test_a_signal_saves_a_resumable_checkpoint_and_the_log_tail(name, straight, tmp_path, tiny_model_dir,
                                                                synthetic_parquet):
    signum = getattr(signal, name)
    config = config_with(tmp_path, tiny_model_dir, synthetic_parquet,
                         {"class_path": "rel_helpers.SignalAt", "init_args": {"step": 2, "signum": int(signum)}})
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(write_config(tmp_path, config))])
    assert stop.value.code == 128 + signum
    assert signal.getsignal(signum) is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3  # the step in progress finished
    log = (tmp_path / "md" / "rollout_results.md").read_text()
    assert log.rstrip().rsplit("## Step ", 1)[1].startswith("3 (written when the run stopped: ShutdownRequested)")
    resume = config_with(tmp_path, tiny_model_dir, synthetic_parquet)
    main(["fit", "--config", str(write_config(tmp_path, resume, "resume.yaml")), "--ckpt_path", "last"])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert_same_parameters(straight, policy_state(tmp_path / "ckpt" / "last.ckpt"))


@pytest.mark.reliability("Faults", "Ctrl-C twice in the middle of step 3",
                         "the run aborts at once (exit status 1) and last.ckpt still holds the complete step-2 "
                         "checkpoint")
def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, synthetic_parquet):
    config = config_with(tmp_path, tiny_model_dir, synthetic_parquet,
                         {"class_path": "rel_helpers.SignalAt",
                          "init_args": {"step": 2, "signum": int(signal.SIGINT), "times": 2}})
    try:
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(write_config(tmp_path, config))])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after an interrupt
    assert stop.value.code == 1
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2


def recorded(tmp, *callbacks):
    return [*callbacks, {"class_path": "rel_helpers.RecordSteps", "init_args": {"path": str(tmp / "steps.json")}}]


@pytest.mark.reliability("Faults", "SIGTERM in step 1 of a new run whose checkpoint folder holds an earlier run's "
                         "last.ckpt (ModelCheckpoint(save_last=True))",
                         "the earlier last.ckpt (step 4) is kept: the stopped run saves last-v1.ckpt (Lightning's "
                         "versioning), which --ckpt_path last resumes at step 1")
def test_a_signal_never_overwrites_an_earlier_runs_last_checkpoint(tmp_path, tiny_model_dir, synthetic_parquet):
    main(["fit", "--config", str(write_config(tmp_path, cli_config(tmp_path, tiny_model_dir, synthetic_parquet),
                                              "first.yaml"))])
    signal_at = {"class_path": "rel_helpers.SignalAt", "init_args": {"step": 0, "signum": int(signal.SIGTERM)}}
    second = cli_config(tmp_path, tiny_model_dir, synthetic_parquet, callbacks=[signal_at])
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(write_config(tmp_path, second, "second.yaml"))])
    assert stop.value.code == 128 + signal.SIGTERM
    folder = tmp_path / "ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # the first run's
    assert torch.load(folder / "last-v1.ckpt", weights_only=True)["global_step"] == 1
    resume = cli_config(tmp_path, tiny_model_dir, synthetic_parquet, callbacks=recorded(tmp_path))
    main(["fit", "--config", str(write_config(tmp_path, resume, "resume.yaml")), "--ckpt_path", "last"])
    assert steps_trained(tmp_path / "steps.json") == [1, 2, 3]
    assert torch.load(folder / "last-v1.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4


def without_checkpoint_callback(tmp, model_dir, parquet, *callbacks):
    """Like configs/demo.yaml: no ModelCheckpoint (enable_checkpointing false)."""
    config = cli_config(tmp, model_dir, parquet, callbacks=recorded(tmp, *callbacks))
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:-1]
    config["trainer"]["enable_checkpointing"] = False
    return config


@pytest.mark.reliability("Faults", "SIGTERM in step 3 of 4 without a ModelCheckpoint (the demo's config), then "
                         "--ckpt_path last",
                         "the message prints the exact resume command; it and --ckpt_path last both resume from "
                         "<default_root_dir>/checkpoints/last.ckpt at step 3 (not from step 0); a new run stopped "
                         "there saves last-v1.ckpt beside it")
def test_without_a_checkpoint_callback_last_finds_the_signal_checkpoint(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                       caplog):
    signal_at = {"class_path": "rel_helpers.SignalAt", "init_args": {"step": 2, "signum": int(signal.SIGTERM)}}
    config = write_config(tmp_path, without_checkpoint_callback(tmp_path, tiny_model_dir, synthetic_parquet, signal_at))
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config)])
    assert stop.value.code == 128 + signal.SIGTERM and steps_trained(tmp_path / "steps.json") == [0, 1, 2]
    saved = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 3
    command = f"dapo-lightning fit --config {config} --ckpt_path {saved}"
    assert f"stopped after step 3 on SIGTERM; the checkpoint is {saved}; resume with:\n  {command}" in caplog.text
    resume = write_config(tmp_path, without_checkpoint_callback(tmp_path, tiny_model_dir, synthetic_parquet))
    main(shlex.split(command)[1:])  # the printed command (its config now without the signal)
    assert steps_trained(tmp_path / "steps.json") == [3]
    main(["fit", "--config", str(resume), "--ckpt_path", "last"])
    assert steps_trained(tmp_path / "steps.json") == [3]
    # a new run (not resumed from it) stopped in its first step keeps that checkpoint: it saves last-v1.ckpt
    signal_at["init_args"]["step"] = 0
    again = write_config(tmp_path, without_checkpoint_callback(tmp_path, tiny_model_dir, synthetic_parquet, signal_at),
                         "again.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(again)])
    assert torch.load(saved, weights_only=True)["global_step"] == 3
    assert torch.load(saved.with_name("last-v1.ckpt"), weights_only=True)["global_step"] == 1
