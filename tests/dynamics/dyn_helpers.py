"""Shared pieces of the dynamics tests: rewards by dotted path, a tiny module, an in-process fit, TensorBoard reads."""

from __future__ import annotations

import glob

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from dapo_lightning.config import LossConfig, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.module import DAPOModule
from dapo_lightning.update import row_chunks

LETTERS = set("ABCDEFGHIJ")


def starts_with_letter(completions, **kwargs):
    """1 when the completion's first character is an answer letter: varies in some groups, not in others."""
    return [1.0 if c[:1] in LETTERS else 0.0 for c in completions]


def starts_with_abc(completions, **kwargs):
    """1 when the completion starts with A, B or C: rarer, so about half the groups of 4 get no signal."""
    return [1.0 if c[:1] in "ABC" else 0.0 for c in completions]


def constant(completions, **kwargs):
    """The same reward for every completion: no group ever has a learning signal."""
    return [1.0 for _ in completions]


def make_module(model_dir, *, rewards=("dyn_helpers.starts_with_letter",), weights=None, G=4, T=3, lr=1e-2,
                eval_greedy=False, cls=DAPOModule, **overrides) -> DAPOModule:
    return cls(
        policy=PolicyConfig(model_name_or_path=str(model_dir)),
        rollout=RolloutConfig(num_generations=G, max_completion_length=T, eval_num_generations=2,
                              eval_greedy=eval_greedy),
        rewards=RewardConfig(reward_funcs=list(rewards), reward_weights=weights),
        loss=overrides.pop("loss", LossConfig()),
        optim=overrides.pop("optim", OptimConfig(learning_rate=lr)),
        export_final=False,
        **overrides,
    )


def make_data(parquet, model_dir, *, batch_size=2, eval_limit=2) -> VisualMCQDataModule:
    return VisualMCQDataModule(train_path=str(parquet), processor=str(model_dir), batch_size=batch_size,
                         eval_limit=eval_limit, system_prompt=None)


def make_trainer(root, *, steps, callbacks=(), val_every=None, checkpoint=False, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=1, max_steps=steps, default_root_dir=str(root), callbacks=list(callbacks),
        logger=TensorBoardLogger(str(root), name="tb", version=kwargs.pop("version", None)),
        enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=kwargs.pop("num_sanity_val_steps", 0),
        limit_val_batches=kwargs.pop("limit_val_batches", 1 if val_every else 0),
        val_check_interval=val_every, check_val_every_n_epoch=None, log_every_n_steps=1, **kwargs,
    )


def fit(root, module, data, *, steps, callbacks=(), seed=0, ckpt_path=None, **kwargs) -> Trainer:
    seed_everything(seed)
    trainer = make_trainer(root, steps=steps, callbacks=callbacks, **kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def scalars(root, tag) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` over every event file under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for path in sorted(glob.glob(f"{root}/**/events.out.tfevents*", recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            points.update({e.step: e.value for e in events.Scalars(tag)})
    return sorted(points.items())


class RolloutLog(RolloutCallback):
    """Keeps what each train rollout looks like when the loss sees it (it must run last)."""

    def __init__(self):
        self.steps = []  # per step: dict of index, replayed, rewards, num_rows
        self.tags = []
        self.loader = []  # per step: the dataset rows of the loader's batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.loader.append(list(batch.index))

    def on_rollout_scored(self, trainer, module, rollout):
        self.tags.append((rollout.stage, rollout.requested_by))
        if rollout.stage == "train" and not rollout.is_extra:
            self.steps.append({
                "index": list(rollout.prompts.index),
                "replayed": rollout.replayed.clone(),
                "rewards": rollout.rewards.clone(),
                "num_rows": rollout.num_rows,
                "rollout": rollout,
            })


def parameters(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


class RankRecorder(RolloutCallback):
    """Writes, per rank, what each training step trained on and what validation saw (for the DDP test)."""

    def __init__(self, path: str):
        self.path = path
        self.steps, self.val_index, self.loader = [], [], []
        self.shards = {}  # epoch -> the rows the data loader gives this rank in that epoch
        self.drawn = []  # the prompts of dynamic sampling's extra rounds

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        from torch.utils.data import DistributedSampler

        self.loader.append(list(batch.index))
        self.shards[trainer.current_epoch] = sorted(DistributedSampler.__iter__(trainer.train_dataloader.sampler))

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train" and rollout.requested_by == "dynamic_sampling":
            self.drawn.append({"index": list(rollout.prompts.index), "epoch": trainer.current_epoch})
        if rollout.stage == "train" and not rollout.is_extra:
            self.steps.append({"index": list(rollout.prompts.index), "rows": rollout.num_rows,
                               "width": int(rollout.completion_ids.shape[1]),
                               "micro_batches": len(row_chunks(rollout.num_rows, module.optim_cfg.micro_batch_size)),
                               "replayed": rollout.replayed.view(-1, rollout.num_generations)[:, 0].tolist()})

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val_index.extend(batch.index)

    def on_train_end(self, trainer, module):
        import json

        with open(f"{self.path}.rank{trainer.global_rank}.json", "w") as f:
            json.dump({"steps": self.steps, "val_index": self.val_index, "loader": self.loader,
                       "world_size": trainer.world_size, "shards": self.shards,
                       "drawn": self.drawn}, f)
