"""``dapo-lightning``: the LightningCLI entry point.

    dapo-lightning fit --config configs/demo.yaml
    dapo-lightning fit --config configs/exp3.yaml --config configs/ablations/no_vgr.yaml
    dapo-lightning fit --help        # every key, with its docstring
    dapo-lightning export --ckpt runs/exp3/checkpoints/last.ckpt --out runs/exp3/step-800   # dapo_lightning/export.py

Configs stack (the last one wins). Callbacks are named under ``callbacks:`` (``NAME: {class_path,
init_args}``), a map that stacked configs merge by name: an overlay switches one off (``NAME: null``), adds
one, or changes one setting (its ``init_args`` merge with the earlier config's) without restating the others.
They run before any plain ``trainer.callbacks`` list, in the order the configs first name them, except that a
callback providing what another ``runs_after`` (dynamic sampling's group selection, for the replay buffer) is
moved just before it. ``{configs}`` in ``trainer.default_root_dir`` is replaced by the names of the
``--config`` files, joined by ``+`` (``runs/exp3+no_vgr+cpu``): one run folder per stack of configs.
``GracefulShutdown`` is always added (its settings are under ``shutdown:``): SIGTERM and Ctrl-C save a
resumable checkpoint after the current step. A ``ModelCheckpoint`` without ``dirpath`` writes to
``<trainer.default_root_dir>/checkpoints``, the same folder in every run, so ``--ckpt_path last`` finds the
previous run's checkpoints. Keys are never abbreviated (``--model.optim.lr`` is an error, not ``lr_scheduler``),
and ``--print_config`` writes nothing but the configuration to stdout.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch
import torch
import yaml
from jsonargparse import ActionConfigFile, Namespace, set_parsing_settings
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from dapo_lightning import fit_checks
from dapo_lightning.shutdown import GracefulShutdown, newest_last_checkpoint
from dapo_lightning.storage import load_checkpoint_file
from dapo_lightning.checkpointing import check_same_config
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.module import DAPOModule
from dapo_lightning.predictions import add_default_writer


# --- the progress bar --------------------------------------------------------------------------------------


class StepBoundedRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without "Epoch 6/-2" in a run bounded by ``max_steps`` (max_epochs -1) and
    without the logger's version number (``v_num``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))


class UnversionedTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar (where ``rich`` is not installed), without the logger's version number."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return _without_version(super().get_metrics(trainer, pl_module))


def _without_version(metrics: dict) -> dict:
    metrics.pop("v_num", None)  # the TensorBoard version folder's number: noise beside the step's reward and accuracy
    return metrics


def without_logger_version(bar):
    """Lightning's own progress bar, with its settings, made this project's (no ``v_num``; "Epoch 3", not "3/-2")."""
    if type(bar) is RichProgressBar:
        bar.__class__ = StepBoundedRichProgressBar
    elif type(bar) is TQDMProgressBar:
        bar.__class__ = UnversionedTQDMProgressBar
    return bar


# --- named callbacks, stacked configs, run folders, --print_config --------------------------------------------

NAMED_CALLBACKS = "callbacks"  # the top-level key of the named callbacks map
CONFIG_NAMES = "{configs}"  # in trainer.default_root_dir: the --config files' names, joined by "+"


class StackedConfigFile(ActionConfigFile):
    """``--config``, as Lightning's (the last config wins), except that a config's named ``callbacks`` map merges
    into the map of the configs before it, name by name: jsonargparse would replace a mapping whole, like a list.
    (jsonargparse itself merges each entry's ``init_args`` with the earlier entry of that name.)"""

    def __call__(self, parser, cfg, values, option_string=None):
        before = {key: dict(cfg[key]) for key in cfg.keys()
                  if key.split(".")[-1] == NAMED_CALLBACKS and isinstance(cfg[key], dict)}
        self._check_names(values, before.get(NAMED_CALLBACKS, {}))
        super().__call__(parser, cfg, values, option_string)
        for key, earlier in before.items():
            later = cfg.get(key)
            if isinstance(later, dict):
                cfg[key] = {**earlier, **later}  # earlier names keep their place; new ones follow

    def _check_names(self, value, earlier: dict) -> None:
        """An entry without ``class_path`` changes a callback an earlier config names: a misspelt name is an error
        that says so (jsonargparse's own says that the generic ``Callback`` takes no such option)."""
        try:
            text = Path(value).read_text() if Path(value).is_file() else value
            named = (yaml.safe_load(text) or {}).get(NAMED_CALLBACKS)
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            return  # not a readable mapping: jsonargparse says why
        for name, entry in (named.items() if isinstance(named, dict) else ()):
            if isinstance(entry, dict) and "class_path" not in entry and earlier.get(name) is None:
                known = ", ".join(n for n, c in earlier.items() if c is not None) or "none"
                raise ArgumentError(self, f"{value}: callbacks.{name} has no class_path, and no earlier config "
                                          f"switches on a callback named {name!r} (on so far: {known})")


def ordered_callbacks(named: Mapping[str, Any]) -> list[Any]:
    """The named callbacks switched on (not None), in the order they run: the map's order (the order in which the
    stacked configs first name them), except that a callback providing what another ``runs_after`` is moved just
    before it (``hooks.RolloutCallback``'s declarations: dynamic sampling's ``group_selection`` before the replay
    buffer, wherever an overlay adds it)."""
    entries = {name: callback for name, callback in named.items() if callback is not None}
    placed: dict[str, Any] = {}

    def place(name: str, path: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in path:
            raise ValueError(f"callbacks: {' -> '.join((*path, name))}: each runs after what the next one provides")
        after = set(getattr(entries[name], "runs_after", ()))
        for other, callback in entries.items():
            if other != name and after & set(getattr(callback, "provides", ())):
                place(other, (*path, name))
        placed[name] = entries[name]

    for name in entries:
        place(name, ())
    return list(placed.values())


def expand_run_folder(cfg: Any) -> None:
    """Replace ``{configs}`` in ``trainer.default_root_dir`` by the names of the ``--config`` files, joined by
    ``+`` (``runs/{configs}`` -> ``runs/exp3+no_vgr+cpu``): runs of different stacks never share a folder, and
    the same command finds the same folder (``--ckpt_path last``)."""
    root = cfg.get("trainer.default_root_dir") if isinstance(cfg, Namespace) else None
    if isinstance(root, str) and CONFIG_NAMES in root:
        names = [Path(str(path)).stem for path in cfg.get("config") or [] if path is not None]
        cfg["trainer.default_root_dir"] = root.replace(CONFIG_NAMES, "+".join(names) or "run")


class _ConfigOnlyStdout:
    """``sys.stdout`` while ``--print_config`` parses: the configuration reaches stdout, anything else (DeepSpeed's
    "Setting accelerator to CPU" when the strategy's class is imported, any print) goes to stderr, so
    ``--print_config > x.yaml`` writes a file that ``--config x.yaml`` reads back."""

    def __init__(self, stdout, stderr):
        self._stdout, self._stderr = stdout, stderr
        self.config: str | None = None  # the text DAPOArgumentParser.dump returned: jsonargparse writes it next

    def write(self, text: str) -> int:
        return (self._stdout if text is self.config else self._stderr).write(text)

    def flush(self) -> None:
        self._stdout.flush()
        self._stderr.flush()

    def __getattr__(self, name: str):
        return getattr(self._stderr, name)


class DAPOArgumentParser(LightningArgumentParser):
    """Lightning's parser, without abbreviations (argparse would read ``--model.optim.lr 1e-3`` as
    ``--model.optim.lr_scheduler 1e-3``), and whose dumps (``--print_config``, the run's ``config.yaml``) name the
    run folder ``{configs}`` stands for."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def dump(self, cfg, *args, **kwargs) -> str:
        if isinstance(cfg, Namespace):
            cfg = cfg.clone()
            expand_run_folder(cfg)
        text = super().dump(cfg, *args, **kwargs)
        if isinstance(sys.stdout, _ConfigOnlyStdout):
            sys.stdout.config = text
        return text


class ContinuousLogSteps(Callback):
    """Logs a resumed run's steps where the checkpointed run left off.

    Lightning logs ``train/*`` at its count of finished steps, which it restores from a checkpoint and, for one
    written as a fit ended (``max_steps`` reached: Lightning records that as a finished epoch), increases by one
    more: TensorBoard would skip a step. Before each step the count is set to the steps finished (one batch, one
    count: this project's module optimizes by hand, without Lightning's gradient accumulation).
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loop = trainer.fit_loop.epoch_loop
        loop._batches_that_stepped = loop.batch_progress.total.completed


class DAPOLightningCLI(LightningCLI):
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.pytorch.__version__}"])
        parser_class = self.parser_class if issubclass(self.parser_class, DAPOArgumentParser) else DAPOArgumentParser
        parser = parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=StackedConfigFile,
                            help="Path to a configuration file in json or yaml format; several stack (the last one "
                                 "wins; named callbacks merge by name).")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module encodes prompts with the policy's own processor.
        parser.link_arguments("model.policy.model_name_or_path", "data.processor")
        # Every run stops cleanly on SIGTERM / Ctrl-C, with a resumable checkpoint (``shutdown.signals: []``: off).
        parser.add_lightning_class_args(GracefulShutdown, "shutdown")
        parser.add_argument(
            f"--{NAMED_CALLBACKS}", type=dict[str, Optional[Callback]], default={},
            help="Named callbacks, NAME: {class_path, init_args}; stacked configs merge them by name: an overlay "
                 "adds one, switches one off (NAME: null) or changes one setting (init_args merge with the earlier "
                 "config's). They run before trainer.callbacks, in the order first named, except that a callback "
                 "providing what another runs_after is moved just before it.")

    def before_instantiate_classes(self) -> None:
        # The offline model and data a config asks for (``build_tiny_if_missing``, ``build_synthetic_if_missing``)
        # are built by the functions registered under OFFLINE_FIXTURES (``dapo_lightning.data_prep.fixtures``):
        # the library itself never imports the scripts that build them.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        build_offline_fixtures(config.as_dict() if hasattr(config, "as_dict") else dict(config))

    def instantiate_trainer(self, **kwargs):
        # The named callbacks, then the plain list (trainer.callbacks, or what the caller passes), then the CLI's own.
        listed = kwargs["callbacks"] if "callbacks" in kwargs else \
            self._get(self.config_init, "trainer", default={}).get("callbacks")
        named = ordered_callbacks(self._get(self.config_init, NAMED_CALLBACKS, default={}) or {})
        listed = listed if isinstance(listed, list) else [] if listed is None else [listed]
        kwargs["callbacks"] = [*named, *listed, ContinuousLogSteps()]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                # Lightning would use the logger's version folder, new in every run: the next run's
                # ``--ckpt_path last`` would find nothing there and silently start from scratch.
                callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
        for callback in trainer.callbacks:
            without_logger_version(callback)  # the same bar and settings; its epoch label and v_num differ
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # The command line, for GracefulShutdown's message: the command that resumes this run.
        structured = isinstance(args, (dict, Namespace))
        self.command_line = None if structured else list(sys.argv[1:] if args is None else args)
        printing = not structured and any(str(arg).startswith("--print_config") for arg in self.command_line)
        with contextlib.redirect_stdout(_ConfigOnlyStdout(sys.stdout, sys.stderr)) if printing \
                else contextlib.nullcontext():
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        expand_run_folder(self.config[subcommand] if subcommand else self.config)

    def before_fit(self) -> None:
        # Lightning's loggers write their first file before any setup hook: a full or read-only disk is an
        # error naming the folder now, not a logger thread's bare OSError.
        fit_checks.check_folders_before_loggers(self.trainer)
        if isinstance(self.datamodule, VisualMCQDataModule):
            # It restores a resumed epoch's order itself (ResumableShuffleSampler, its state_dict): Lightning's
            # warning that a plain DataLoader cannot continue a resumed epoch does not apply.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch "
                                    "ended and your dataloader is not resumable", category=PossibleUserWarning)
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":  # Lightning looks only in the ModelCheckpoint folders, not where
            config["ckpt_path"] = newest_last_checkpoint(self.trainer) or "last"  # a SIGTERM saves without one
        for callback in self.trainer.callbacks:
            if isinstance(callback, GracefulShutdown) and self.command_line is not None:
                callback.resume_command = [self.parser.prog, *without_ckpt_path(self.command_line)]

    def before_predict(self) -> None:
        # ``predict`` writes its rows: to <trainer.default_root_dir>/predictions.jsonl unless a PredictionWriter is
        # configured, and Lightning need not also keep every row in memory.
        add_default_writer(self.trainer)
        config = self.config_init[self.subcommand]
        if config.get("return_predictions") is None:
            config["return_predictions"] = False

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


EXPORT = "export"  # a subcommand of its own (no Trainer method): dapo_lightning/export.py


def main(args: list[str] | None = None) -> int | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == [EXPORT]:  # a checkpoint -> the folder a fit's end writes; parsed before LightningCLI's subcommands
        from dapo_lightning.export import main as export_main

        return export_main(argv[1:])
    # The console script's sys.path starts with its own bin folder, not the working folder `python -m` adds: a reward
    # or callback named by dotted path (``my_rewards.brevity``) is looked up there too (last: it shadows nothing).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisement) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_NoAdvertisement())
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        DAPOLightningCLI(
            DAPOModule,
            VisualMCQDataModule,
            args=args,
            parser_kwargs={"prog": "dapo-lightning", "epilog": f"{EXPORT}: a checkpoint as the folder a fit's end "
                           "writes (dapo-lightning export --help)"},
            auto_configure_optimizers=False,
        )
    finally:
        # A DDP fit on CPU (gloo) aborts at interpreter exit unless the process group is torn down.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
