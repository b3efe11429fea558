"""``dapo-lightning``: the LightningCLI entry point.

    dapo-lightning fit --config configs/demo.yaml
    dapo-lightning fit --config configs/exp3.yaml --config configs/ablations/no_vgr.yaml
    dapo-lightning fit --help        # every key, with its docstring

Configs stack (the last one wins); callbacks are listed under ``trainer.callbacks``
by ``class_path`` and can be removed from a YAML to ablate them. ``GracefulShutdown``
is always added (its settings are under ``shutdown:``): SIGTERM and Ctrl-C save a
resumable checkpoint after the current step. A ``ModelCheckpoint`` without ``dirpath``
writes to ``<trainer.default_root_dir>/checkpoints``, the same folder in every run, so
``--ckpt_path last`` finds the previous run's checkpoints.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from pathlib import Path

import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from dapo_lightning import fit_checks
from dapo_lightning.shutdown import GracefulShutdown, newest_last_checkpoint
from dapo_lightning.storage import load_checkpoint_file
from dapo_lightning.checkpointing import check_same_config
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.module import DAPOModule


class StepBoundedRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without "Epoch 6/-2" in a run bounded by ``max_steps`` (max_epochs -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker


class DAPOLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module encodes prompts with the policy's own processor.
        parser.link_arguments("model.policy.model_name_or_path", "data.processor")
        # Every run stops cleanly on SIGTERM / Ctrl-C, with a resumable checkpoint (``shutdown.signals: []``: off).
        parser.add_lightning_class_args(GracefulShutdown, "shutdown")

    def before_instantiate_classes(self) -> None:
        # The offline model and data a config asks for (``build_tiny_if_missing``, ``build_synthetic_if_missing``)
        # are built by the functions registered under OFFLINE_FIXTURES (``dapo_lightning.data_prep.fixtures``):
        # the library itself never imports the scripts that build them.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        build_offline_fixtures(config.as_dict() if hasattr(config, "as_dict") else dict(config))

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                # Lightning would use the logger's version folder, new in every run: the next run's
                # ``--ckpt_path last`` would find nothing there and silently start from scratch.
                callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        for callback in trainer.callbacks:
            if type(callback) is RichProgressBar:  # the same bar and settings; only its epoch label differs
                callback.__class__ = StepBoundedRichProgressBar
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # The command line, for GracefulShutdown's message: the command that resumes this run.
        structured = isinstance(args, (dict, Namespace))
        self.command_line = None if structured else list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def before_fit(self) -> None:
        # Lightning's loggers write their first file before any setup hook: a full or read-only disk is an
        # error naming the folder now, not a logger thread's bare OSError.
        fit_checks.check_folders_before_loggers(self.trainer)
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":  # Lightning looks only in the ModelCheckpoint folders, not where
            config["ckpt_path"] = newest_last_checkpoint(self.trainer) or "last"  # a SIGTERM saves without one
        for callback in self.trainer.callbacks:
            if isinstance(callback, GracefulShutdown) and self.command_line is not None:
                callback.resume_command = [self.parser.prog, *without_ckpt_path(self.command_line)]

    def _parse_ckpt_path(self) -> None:
        # Lightning would replace the model's config by the checkpoint's hyper-parameters, silently, and only for
        # a file path (not for ``last``). Here the configuration given is used as given, whichever path: a
        # checkpoint of another experiment (other model, LoRA, rewards, group size) is an error naming the key,
        # and other differences are listed in a warning when the checkpoint loads (DAPOModule.on_load_checkpoint).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            saved = load_checkpoint_file(ckpt_path).get("hyper_parameters", {})  # a damaged file: named
            check_same_config(saved, self.config[subcommand].get("model"), source=f"checkpoint {ckpt_path}")


def without_ckpt_path(args: list[str]) -> list[str]:
    """``args`` less any ``--ckpt_path PATH`` / ``--ckpt_path=PATH``."""
    kept, skip = [], False
    for arg in args:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
            continue
        skip = arg == "--ckpt_path"
        if not skip:
            kept.append(arg)
    return kept


OFFLINE_FIXTURES = "dapo_lightning.offline_fixtures"  # entry-point group, see setup.cfg


def build_offline_fixtures(config: dict) -> None:
    """Run every registered fixture builder on ``config`` (a fit config as a dict); rank 0 reports what was written."""
    for entry in importlib.metadata.entry_points(group=OFFLINE_FIXTURES):
        for what in entry.load()(config) or []:
            rank_zero_info(f"wrote {what}")


class _NoAdvertisement(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line, printed at every fit start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisement) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_NoAdvertisement())
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        DAPOLightningCLI(
            DAPOModule,
            VisualMCQDataModule,
            args=args,
            parser_kwargs={"prog": "dapo-lightning"},
            auto_configure_optimizers=False,
        )
    finally:
        # A DDP fit on CPU (gloo) aborts at interpreter exit unless the process group is torn down.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
