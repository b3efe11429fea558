"""``VisualMCQDataModule``: the merged multiple-choice parquet -> batches of encoded prompts.

Rows are read from a local parquet file (or a ``datasets`` hub name) and served
undecoded by :class:`VisualMCQDataset`; the collator (``data/collate.py``) checks them
with the same rules as ``python -m dapo_lightning.data_prep validate`` (``data/rows.py``),
turns their images into RGB images that fit ``max_image_side``, wraps them in the ChatML
prompt (SPEC section 1) and encodes them with the policy's processor into a ``PromptBatch``.
A prompt that would exceed ``max_prompt_length`` has its image shrunk, as little as the row's
text allows (``data/image_fit.py``), rather than being lost or cut (``fit_images_to_prompt``).

Training prompts are shuffled by ``ResumableShuffleSampler`` (``data/samplers.py``), in the orders
Lightning would use (``RandomSampler`` on one process, a seeded per-rank shard under
DDP), and a run resumed mid-epoch continues where the checkpointed run stopped
(Lightning restarts a plain loader's epoch from its first batch); the data module's
``state_dict`` keeps what that needs. Validation uses ``ShardSampler``, a sharding sampler
without padding, so every held-out question is scored exactly once and the metrics are exact; so
do ``test`` and ``predict``, over every row of ``test_path`` / ``predict_path`` (unset: the
validation questions), without reading the training file when the file is given.

Datasets serve rows by position (what the samplers and the refill look up); each row also
carries its parquet file and row (``data/locations.py``), which every message names. Rows
skipped as unusable are counted as batches arrive and summarised once an epoch
(``report_skipped_rows``, ``data/skipped.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from dapo_lightning.batch import PromptBatch, SourceRow
from dapo_lightning.data import rows as mcq
from dapo_lightning.data import skipped as skipped_rows
from dapo_lightning.data.collate import PromptCollator
from dapo_lightning.data.locations import RowLocator, split_rows
from dapo_lightning.data.samplers import ResumableShuffleSampler, ShardSampler
from dapo_lightning.distributed import shards_parameters
from dapo_lightning.data.settings import check_settings
from dapo_lightning.prompts import SYSTEM_PROMPT


@dataclass
class SyntheticData:
    """Settings of the synthetic coloured-shapes questions written when ``train_path`` is missing."""

    rows: int = 512
    """Questions to generate (train and eval split from them)."""
    seed: int = 0
    """Generator seed."""
    image_size: int = 56
    """Square image side in pixels."""
    question_types: list[str] | None = None
    """Subset of colour, shape, count (None: all three)."""
    shuffle_options: bool = False
    """Shuffle each question's option order."""


class VisualMCQDataset(Dataset):
    """Rows of a DDM table, images left undecoded until a batch is built (so a bad row is named, not fatal at load).

    Each row comes with ``"_index"``, its position here, and ``"_source_row"``, its parquet file
    and row (from ``locations``; without one: ``source`` and the position).
    """

    def __init__(self, table, source: str, locations: RowLocator | None = None):
        self.table = table
        self.source = source
        self.locations = locations

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        where = self.locations.at(index) if self.locations is not None else SourceRow(self.source, index)
        return {**self.table[index], "_index": index, "_source_row": where}


class VisualMCQDataModule(LightningDataModule):
    """Serves a DDM parquet (image, problem, solution) as prompt batches for rollouts."""

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        processor: str | None = None,
        eval_ratio: float = 0.1,
        split_seed: int = 42,
        max_image_side: int | None = 1024,
        system_prompt: str | None = SYSTEM_PROMPT,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        eval_limit: int | None = None,
        num_workers: int = 0,
        max_prompt_length: int | None = None,
        fit_images_to_prompt: bool = True,
        on_bad_row: Literal["error", "skip"] = "error",
        max_image_pixels: int = mcq.DEFAULT_MAX_IMAGE_PIXELS,
        build_synthetic_if_missing: SyntheticData | dict | None = None,
    ):
        """
        Args:
            train_path: Local DDM parquet file (or a folder of parquet files).
            eval_path: Separate held-out parquet; when unset, ``eval_ratio`` of the training file is held out.
            test_path: Parquet file (or folder) that ``dapo-lightning test`` scores, every row (unset: the validation
                questions); its metrics are the validation ones under ``test/``.
            predict_path: Parquet file (or folder) of the questions ``dapo-lightning predict`` answers, every row
                (unset: ``test_path``, else the validation questions).
            dataset_name: A ``datasets`` hub name to read instead of ``train_path``.
            dataset_config: Configuration name of ``dataset_name``.
            dataset_split: Split of ``dataset_name`` to read.
            processor: Processor to encode prompts with (the CLI links it to ``model.policy.model_name_or_path``).
            eval_ratio: Fraction held out for validation when there is no ``eval_path``.
            split_seed: Seed of the train/eval split.
            max_image_side: Shrink images to fit in this square, keeping the aspect ratio (None: keep size).
            system_prompt: System message of every prompt (None: no system turn).
            batch_size: Prompts per training step per process (B); each gets G completions.
            eval_batch_size: Prompts per validation batch (default: ``batch_size``).
            eval_limit: Use at most this many held-out questions.
            num_workers: DataLoader worker processes.
            max_prompt_length: Most tokens of an encoded prompt (text + image); longer rows are an error (or skipped).
            fit_images_to_prompt: Shrink an image just enough for its prompt to fit ``max_prompt_length`` (Qwen's 28-px
                grid, aspect ratio kept) and count it (``train/resized_rows``); false: such rows are too long.
            on_bad_row: ``error`` stops at the first unusable row, naming its file and row; ``skip`` drops such rows,
                counts them (``train/skipped_rows``, ``val/skipped_rows``) and sums them up at the end of each epoch.
            max_image_pixels: Images with more pixels are unusable rows, refused before they are decoded (decompression
                bombs); the default is Pillow's own limit, 89478485 (about 9459x9459). Raise it only for trusted data.
            build_synthetic_if_missing: When ``train_path`` does not exist, write synthetic questions there first.
        """
        super().__init__()
        check_settings(locals())  # every number in range, each error naming its key (data/settings.py)
        if isinstance(build_synthetic_if_missing, SyntheticData):
            # plain values in the checkpoint: a dataclass there would not load with weights_only=True (no resume)
            build_synthetic_if_missing = asdict(build_synthetic_if_missing)
        self.save_hyperparameters()
        self.train_table = None
        self.eval_table = None
        self.train_locations: RowLocator | None = None  # position in train_table -> parquet file and row
        self.eval_locations: RowLocator | None = None
        self.scored: VisualMCQDataset | None = None  # the questions of test or predict (setup("test"/"predict"))
        self.skipped = skipped_rows.SkippedRows()  # rows dropped as unusable, per stage, since the last report
        self._processor = None
        self._train_sampler: ResumableShuffleSampler | None = None
        self._saved_order: dict | None = None

    # --- loading -----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        scoring = "predict" if stage == "predict" else "test" if stage == "test" else None
        if scoring is not None:
            key = "predict_path" if scoring == "predict" and self.hparams.predict_path else "test_path"
            if self.hparams[key]:  # every row of the file, whatever eval_limit says
                self.scored = VisualMCQDataset(*self._load(self.hparams[key], None, None, key=f"data.{key}"))
                rank_zero_info(f"{scoring}: {len(self.scored)} questions of {self.scored.source} (data.{key})")
                return
        if self.train_table is None:
            self._set_up_training()
        if scoring is not None:
            self.scored = VisualMCQDataset(self.eval_table, self.eval_source, self.eval_locations)
            rank_zero_info(f"{scoring}: data.test_path unset, the {len(self.scored)} validation questions of "
                           f"{self.eval_source}")

    def _set_up_training(self) -> None:
        if not (self.hparams.train_path or self.hparams.dataset_name):
            raise ValueError("data: set data.train_path (a parquet file) or data.dataset_name (a datasets hub name)")
        table, source, locations = self._load(self.hparams.train_path, self.hparams.dataset_name,
                                              self.hparams.dataset_split)
        self.source = source
        if self.hparams.eval_path:
            eval_table, eval_source, eval_locations = self._load(self.hparams.eval_path, None, None,
                                                                 key="data.eval_path")
            self.eval_source = eval_source
        else:
            # one split of the row numbers, applied to the rows and to their locations (the split datasets makes)
            train_rows, eval_rows = split_rows(len(table), self.hparams.eval_ratio, self.hparams.split_seed)
            table, eval_table = table.select(train_rows), table.select(eval_rows)
            locations, eval_locations = locations.select(train_rows), locations.select(eval_rows)
            self.eval_source = f"{source} (held-out {self.hparams.eval_ratio:g})"
        if self.hparams.eval_limit is not None:
            kept = range(min(self.hparams.eval_limit, len(eval_table)))
            eval_table, eval_locations = eval_table.select(kept), eval_locations.select(kept)
        self.train_table, self.eval_table = table, eval_table
        self.train_locations, self.eval_locations = locations, eval_locations

    def _load(self, path: str | None, name: str | None, split: str | None, key: str = "data.train_path"):
        """(table, source, locations) of a parquet file, a folder of them (empty files left out) or a hub split;
        ``key`` is the setting that names ``path``."""
        from datasets import Dataset, Image as ImageFeature, load_dataset

        if path:
            p = Path(path)
            if not p.exists():
                raise FileNotFoundError(f"{key}: {path} does not exist")
            files = sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]
            if not files:
                raise FileNotFoundError(f"{path}: folder holds no .parquet files")
            counts = [_parquet_rows(f) for f in files]
            if not any(counts):
                raise ValueError(f"{path}: no rows ({'an empty parquet file' if not p.is_dir() else _empty(files)})")
            files, counts = [f for f, n in zip(files, counts) if n], [n for n in counts if n]  # datasets refuses them
            try:
                table = Dataset.from_parquet(files if len(files) > 1 else files[0])
            except Exception as error:  # pyarrow raises several types for a file that is not parquet
                raise ValueError(f"{path}: cannot be read as parquet ({type(error).__name__}: {error})") from error
            source = str(path)
        else:
            table = load_dataset(name, self.hparams.dataset_config, split=split)
            source = f"{name}[{split}]"
            files, counts = [source], [len(table)]
        if len(table) != sum(counts):
            raise ValueError(f"{source}: read {len(table)} rows, but its files hold {sum(counts)}")
        missing = mcq.missing_columns(table.column_names)
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; a DDM file has {', '.join(mcq.COLUMNS)}")
        if isinstance(table.features["image"], ImageFeature):
            table = table.cast_column("image", ImageFeature(decode=False))  # decode in the collator, row named on error
        return table, source, RowLocator(files, counts)

    # --- loaders -----------------------------------------------------------------------------------

    @property
    def processor(self):
        if self._processor is None:
            if not self.hparams.processor:
                raise ValueError("data.processor: not set (the CLI links it to model.policy.model_name_or_path)")
            from dapo_lightning.models import load_processor

            self._processor = load_processor(self.hparams.processor)
        return self._processor

    def collator(self, source: str, refill_from: Dataset | None = None) -> PromptCollator:
        return PromptCollator(
            self.processor,
            source=source,
            system_prompt=self.hparams.system_prompt,
            max_image_side=self.hparams.max_image_side,
            max_prompt_length=self.hparams.max_prompt_length,
            fit_images_to_prompt=self.hparams.fit_images_to_prompt,
            on_bad_row=self.hparams.on_bad_row,
            refill_from=refill_from,
            max_image_pixels=self.hparams.max_image_pixels,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        # the seed Lightning's own DistributedSampler would use; one process draws each epoch's seed instead
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if world > 1 else None
        sampler = ResumableShuffleSampler(len(self.train_table), num_replicas=world, rank=rank, seed=seed)
        batch_size = self.hparams.batch_size
        drop_last = sampler.num_samples >= batch_size
        if self.trainer is not None:
            # Lightning restores the loop counters before it asks for the loader: continue a resumed epoch.
            epoch = self.trainer.fit_loop.epoch_progress.current.processed
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            per_epoch = self._batches_per_epoch(sampler.num_samples // batch_size if drop_last
                                                else -(-sampler.num_samples // batch_size))
            if per_epoch and done >= per_epoch:  # the checkpoint closed an epoch: the next one starts afresh
                epoch, done = epoch + 1, 0
            saved = self._saved_order or {}
            offset = saved.get("epoch_offset", 0)
            if saved.get("batches") is not None and saved["batches"] < per_epoch and \
                    epoch > saved["epoch"] + offset:
                # A fit stopped by max_steps mid-epoch checkpoints its epoch as finished: an extended run continues
                # that epoch's order (under the next epoch number Lightning gives it), as an uninterrupted run would.
                offset, done = epoch - saved["epoch"], saved["batches"]
            sampler.resume_at(epoch, done * batch_size,
                              saved.get("seed") if saved.get("epoch") == epoch - offset else None, offset)
        self._train_sampler = sampler
        dataset = VisualMCQDataset(self.train_table, self.source, self.train_locations)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(self.source, refill_from=dataset),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _batches_per_epoch(self, batches: int) -> int:
        """The training batches of an epoch, as Lightning's ``limit_train_batches`` cuts them."""
        limit = getattr(self.trainer, "limit_train_batches", None)
        if isinstance(limit, int):
            return min(batches, limit)
        return int(batches * limit) if isinstance(limit, float) and limit < 1.0 else batches

    def state_dict(self) -> dict:
        """The batch size and the training order's position: its epoch, the batches consumed in it, its shuffling
        seed (one process) and the offset of Lightning's epoch numbers, so a resume continues the order."""
        sampler = self._train_sampler
        if sampler is None:
            return {}
        state = {"batch_size": int(self.hparams.batch_size)}
        order = {"epoch": int(sampler.order_epoch), "epoch_offset": int(sampler.epoch_offset)}
        if self.trainer is not None:
            order["batches"] = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if sampler.epoch_seed is not None:
            order["seed"] = int(sampler.epoch_seed)
        state["train_order"] = order
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("batch_size")
        if saved is not None and saved != self.hparams.batch_size:
            raise ValueError(
                f"data.batch_size: the checkpoint was trained with {saved} prompts per step, this configuration has "
                f"{self.hparams.batch_size}; resume with the same value (the position in the epoch counts batches)"
            )
        self._saved_order = state_dict.get("train_order")

    def val_dataloader(self) -> DataLoader:
        return self._held_out_loader(VisualMCQDataset(self.eval_table, self.eval_source, self.eval_locations))

    def test_dataloader(self) -> DataLoader:
        """The test (or predict) questions, each scored once over the processes, like the validation questions."""
        return self._held_out_loader(self.scored)

    predict_dataloader = test_dataloader

    def _held_out_loader(self, dataset: VisualMCQDataset) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return DataLoader(
            dataset,
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            sampler=ShardSampler(len(dataset), rank, world, pad=shards_parameters(self.trainer)),
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(dataset.source),
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if isinstance(batch, PromptBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- rows skipped as unusable ------------------------------------------------------------------

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Counts the rows the collator dropped from ``batch`` (it may have run in a worker process; this runs here)."""
        if isinstance(batch, PromptBatch) and batch.skipped and self.trainer is not None:
            predicting = getattr(self.trainer, "predicting", False)
            stage = "train" if self.trainer.training else "predict" if predicting else "val"  # test counts as val
            self.skipped.add(stage, batch.skipped)
        return batch

    def report_skipped_rows(self, stage: str) -> int:
        """Rows skipped in ``stage`` ("train", "val" (test too) or "predict") since the last call, summed over
        processes; counting restarts.

        A collective: every process calls it (the module, at the end of each epoch). When rows
        were skipped, rank zero logs one line: how many, of which kinds, and the file, row and
        reason of the first one rank zero dropped (``data/skipped.py``).
        """
        counts, first = self.skipped.take(stage)
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        counts = skipped_rows.summed_over_processes(counts, device)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        line = skipped_rows.summary(stage, epoch, counts, first)
        if line is not None:
            rank_zero_info(line)
        return sum(counts.values())


def _parquet_rows(path: str) -> int:
    """Rows of a parquet file, from its footer (no data read); a file that is not parquet is named."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{path}: cannot be read as parquet ({type(error).__name__}: {error})") from error


def _empty(files: list[str]) -> str:
    return "its only parquet file is empty" if len(files) == 1 else f"its {len(files)} parquet files are empty"


__all__ = ["SyntheticData", "VisualMCQDataModule", "VisualMCQDataset"]
