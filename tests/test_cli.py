"""The command line end to end, in subprocesses: the demo config, TensorBoard scalars, export, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scalars import scalar_tags

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dapo_lightning.cli"]

# Scalars the issue names as the minimum a run logs.
REQUIRED_SCALARS = [
    "train/loss", "train/reward_mean", "train/reward_std", "train/accuracy", "train/rewards/accuracy/mean",
    "train/frac_reward_zero_std", "train/completion_length/mean", "train/completion_length/max",
    "train/completion_length/clipped_ratio", "train/clip_ratio/low_mean", "train/clip_ratio/high_mean",
    "train/entropy", "train/learning_rate", "train/completion_tokens_per_second", "val/accuracy", "val/reward_mean",
]


def run_cli(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(CLI + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def demo_overrides(tmp_path: Path, steps: int = 3) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--model.policy.model_name_or_path={tmp_path / 'model'}", f"--data.train_path={tmp_path / 'data.parquet'}",
        "--data.eval_limit=4", "--data.batch_size=2", "--trainer.enable_progress_bar=false",
    ]


@pytest.mark.slow
def test_demo_config_trains_logs_and_exports(tmp_path):
    result = run_cli(demo_overrides(tmp_path), tmp_path)
    output = result.stdout + result.stderr
    # the offline model and data were built on first use, then the run evaluated before and after training
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "data.parquet").exists()
    assert "[eval] before training: accuracy" in output and "[eval] step 3: accuracy" in output
    assert "GPU available:" in output and "litlogger" not in output  # Lightning's messages, less its advertisement
    tags = scalar_tags(tmp_path / "run")
    missing = [t for t in REQUIRED_SCALARS if t not in tags]
    assert not missing, f"missing scalars {missing}; logged: {sorted(tags)}"
    from dapo_lightning.models import load_policy, load_processor

    final = tmp_path / "run" / "final"
    assert load_policy(str(final)).config.text_config.num_hidden_layers == 2
    assert load_processor(str(final)).tokenizer.padding_side == "left"


def _parquet_with_bad_images(path: Path, rows: int = 40) -> Path:
    """Synthetic questions where every third image is unreadable bytes."""
    from datasets import Dataset

    from dapo_lightning.data_prep.synthetic import SyntheticConfig, generate_rows
    from dapo_lightning.data.rows import mcq_features

    data = generate_rows(SyntheticConfig(rows=rows, seed=5, image_size=56, question_types=("colour",)))
    for i, row in enumerate(data):
        if i % 3 == 0:
            row["image"] = {"bytes": b"not an image", "path": None}
    Dataset.from_list(data, features=mcq_features()).to_parquet(str(path))
    return path


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu(tmp_path):
    """Per-rank prompts, rank-zero files, and full batches on every rank when rows are skipped."""
    ranks = tmp_path / "ranks"
    data = _parquet_with_bad_images(tmp_path / "bad.parquet")
    args = demo_overrides(tmp_path, steps=3) + [
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.num_sanity_val_steps=0",
        f"--data.train_path={data}", "--data.on_bad_row=skip", "--data.batch_size=3",
        "--model.optim.micro_batch_size=8",  # one prompt (8 completions) per micro-batch
        "--trainer.callbacks+=tests.rank_recorder.RankRecorder", f"--trainer.callbacks.folder={ranks}",
    ]
    run_cli(args, tmp_path, timeout=400)
    records = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["global_step"] for r in records] == [3, 3]
    # each process trained on its own prompts (a skipped row's replacement may come from anywhere),
    # and every batch was refilled to 3 prompts on both ranks
    rows = [set(r["rows"]) for r in records]
    skipped = sum(r["skipped"] for r in records)
    assert skipped > 0
    assert len(rows[0] & rows[1]) <= skipped
    assert [r["prompts_per_step"] for r in records] == [[3, 3, 3], [3, 3, 3]]
    tags = scalar_tags(tmp_path / "run")
    assert "train/loss" in tags and "train/skipped_rows" in tags
    assert (tmp_path / "run" / "final" / "model.safetensors").exists() and not (tmp_path / "run" / "final-1").exists()


def test_print_config_explains_every_key(tmp_path):
    result = run_cli(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--print_config"], tmp_path)
    assert "    num_generations: 8\n    max_completion_length: 2\n" in result.stdout
    help_text = run_cli(["fit", "--help"], tmp_path).stdout
    assert "Completions per prompt (G); one group per prompt." in help_text


def test_bad_reward_weights_fail_before_loading_anything(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        CLI + ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.rewards.reward_weights=[1.0, 2.0]",
               f"--trainer.default_root_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "model.rewards.reward_weights: has 2 weights but model.rewards.reward_funcs has 1" in result.stderr
    assert not (tmp_path / "final").exists()


def test_the_progress_bar_does_not_show_a_negative_epoch_count(tmp_path, tiny_model_dir, synthetic_parquet):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar

    from dapo_lightning.cli import DAPOLightningCLI, StepBoundedRichProgressBar
    from dapo_lightning.data import VisualMCQDataModule
    from dapo_lightning.module import DAPOModule

    stock = Trainer(max_steps=5, callbacks=[RichProgressBar()], logger=False, default_root_dir=tmp_path)
    stock.fit_loop.max_epochs = -1  # what fit() makes of max_epochs=None when max_steps bounds the run
    stock.progress_bar_callback.setup(stock, None, "fit")
    assert "/-2" in stock.progress_bar_callback._get_train_description(3)  # Lightning's label
    args = [a for a in demo_overrides(tmp_path)[1:] if a != "--trainer.enable_progress_bar=false"]
    args = [a.replace(str(tmp_path / "model"), str(tiny_model_dir)).replace(str(tmp_path / "data.parquet"),
                                                                             str(synthetic_parquet)) for a in args]
    cli = DAPOLightningCLI(DAPOModule, VisualMCQDataModule, args=args, run=False, auto_configure_optimizers=False)
    bar = cli.trainer.progress_bar_callback
    cli.trainer.fit_loop.max_epochs = -1
    bar.setup(cli.trainer, cli.model, "fit")
    assert type(bar) is StepBoundedRichProgressBar
    assert bar._get_train_description(3).strip() == "Epoch 3"
    by_epochs = Trainer(max_epochs=4, callbacks=[StepBoundedRichProgressBar()], logger=False, default_root_dir=tmp_path)
    by_epochs.progress_bar_callback.setup(by_epochs, None, "fit")
    assert by_epochs.progress_bar_callback._get_train_description(1).strip() == "Epoch 1/3"  # unchanged


def test_ckpt_path_last_takes_the_newest_last_file_of_the_checkpoint_folders_and_the_shutdown_folder(tmp_path):
    import os

    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dapo_lightning.shutdown import newest_last_checkpoint

    def write(path, mtime):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
        return path

    ckpt, shutdown = tmp_path / "ckpt", tmp_path / "run" / "checkpoints"  # a ModelCheckpoint's, GracefulShutdown's
    write(ckpt / "last.ckpt", 100)
    write(shutdown / "last.ckpt", 200)
    newest = write(ckpt / "last-v1.ckpt", 300)
    write(ckpt / "epoch=0-step=2.ckpt", 500)  # not a "last" file
    write(shutdown / ".last.ckpt.123.partial", 900)  # an unfinished write
    write(shutdown / "last-notes.txt", 900)
    with_callback = Trainer(default_root_dir=tmp_path / "run", logger=False, callbacks=[ModelCheckpoint(dirpath=ckpt)])
    assert newest_last_checkpoint(with_callback) == str(newest)
    shutdown_v2 = write(shutdown / "last-v2.ckpt", 400)  # a second stopped run
    assert newest_last_checkpoint(with_callback) == str(shutdown_v2)
    without = Trainer(default_root_dir=tmp_path / "run", logger=False, enable_checkpointing=False)
    assert newest_last_checkpoint(without) == str(shutdown_v2)
    assert newest_last_checkpoint(Trainer(default_root_dir=tmp_path / "new", logger=False,
                                          enable_checkpointing=False)) is None


def test_the_resume_command_drops_the_previous_ckpt_path():
    from dapo_lightning.cli import without_ckpt_path

    args = ["fit", "--config", "a.yaml", "--ckpt_path", "last", "--trainer.max_steps=3", "--ckpt_path=x.ckpt"]
    assert without_ckpt_path(args) == ["fit", "--config", "a.yaml", "--trainer.max_steps=3"]


# --- no abbreviations (issue 13, item 7) ----------------------------------------------------------------------


@pytest.mark.parametrize("abbreviation, value", [("--model.optim.lr", "1e-3"), ("--model.optim.lr", "constant"),
                                                 ("--trainer.max_st", "3")])
def test_an_abbreviated_key_is_refused_not_expanded(capsys, monkeypatch, abbreviation, value):
    """argparse would expand ``--model.optim.lr`` to ``lr_scheduler`` (and take ``constant`` as the schedule)."""
    from dapo_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["dapo-lightning"])  # the arguments come from the list below
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), abbreviation, value, "--print_config"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"unrecognized arguments: {abbreviation} {value}" in captured.err and not captured.out


# --- --print_config > x.yaml, then --config x.yaml (issue 13, item 10) ------------------------------------------


def print_config(args: list[str], cwd: Path) -> str:
    """stdout of ``fit ... --print_config`` in a fresh process (DeepSpeed prints its accelerator line on first import)."""
    return run_cli(["fit", *args, "--print_config"], cwd).stdout


@pytest.mark.slow
def test_print_config_of_a_deepspeed_experiment_round_trips(tmp_path):
    """exp3 (DeepSpeed, GPU): nothing but the YAML reaches stdout, and the printed file parses to the same config."""
    import yaml

    printed = print_config(["--config", str(ROOT / "configs" / "exp3.yaml")], tmp_path)
    config = yaml.safe_load(printed)
    assert config["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert all(not line or line.startswith(("#", " ", "-")) or ":" in line for line in printed.splitlines())
    (tmp_path / "x.yaml").write_text(printed)
    assert print_config(["--config", str(tmp_path / "x.yaml")], tmp_path) == printed


@pytest.mark.slow
def test_print_config_of_the_demo_round_trips_and_runs(tmp_path):
    import yaml

    printed = print_config(["--config", str(ROOT / "configs" / "demo.yaml")], tmp_path)
    assert yaml.safe_load(printed)["model"]["rollout"]["max_completion_length"] == 2
    (tmp_path / "x.yaml").write_text(printed)
    assert print_config(["--config", str(tmp_path / "x.yaml")], tmp_path) == printed
    run_cli(["fit", "--config", str(tmp_path / "x.yaml"), "--trainer.max_steps=1", "--data.eval_limit=2",
             "--trainer.enable_progress_bar=false", "--model.export_final=false"], tmp_path)
    assert scalar_tags(tmp_path / "runs" / "demo") >= {"train/loss", "val/accuracy"}


# --- the console script imports rewards from the current folder (issue 13, item 16) --------------------------


@pytest.mark.slow
def test_the_console_script_finds_a_reward_module_in_the_current_folder(tmp_path, tiny_model_dir, synthetic_parquet):
    import shutil

    script = shutil.which("dapo-lightning", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the dapo-lightning console script is not installed next to this Python (pip install -e .)")
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the working folder to find it in
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [script, "fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.max_steps=1",
         "--model.rewards.reward_funcs=[accuracy, my_rewards.brevity]", f"--model.policy.model_name_or_path={tiny_model_dir}",
         f"--data.train_path={synthetic_parquet}", "--data.eval_limit=2", "--data.batch_size=2",
         "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={tmp_path / 'run'}",
         "--trainer.enable_progress_bar=false", "--model.export_final=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train/rewards/my_rewards.brevity/mean" in scalar_tags(tmp_path / "run")


# --- loggers (issue 13, item 18) -----------------------------------------------------------------------------


@pytest.mark.parametrize("logger, option", [("lightning.pytorch.loggers.WandbLogger", "--trainer.logger.project=dapo"),
                                            ("lightning.pytorch.loggers.MLFlowLogger",
                                             "--trainer.logger.experiment_name=dapo")])
def test_the_cli_accepts_the_optional_loggers(capsys, monkeypatch, logger, option):
    """Parsing only: neither wandb nor mlflow need be installed (``pip install -e ".[wandb]"`` / ``".[mlflow]"``)."""
    import yaml

    from dapo_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["dapo-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger", logger, option,
              "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
    assert printed["class_path"] == logger
    assert option.split("=")[1] in printed["init_args"].values()


def test_the_optional_loggers_are_extras():
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    extras = setup["options.extras_require"]
    assert extras["wandb"].split() == ["wandb>=0.17"] and extras["mlflow"].split() == ["mlflow>=2.10"]


def test_the_progress_bar_does_not_show_the_logger_version(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from dapo_lightning.cli import without_logger_version

    for stock in (RichProgressBar(), TQDMProgressBar()):
        trainer = Trainer(callbacks=[stock], logger=TensorBoardLogger(tmp_path), default_root_dir=tmp_path)
        assert "v_num" in stock.get_metrics(trainer, None)  # Lightning's bar
        bar = without_logger_version(stock)
        assert isinstance(bar, type(stock)) and "v_num" not in bar.get_metrics(trainer, None)
