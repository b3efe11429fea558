"""``VisualMCQDataModule``: the merged multiple-choice parquet -> batches of encoded prompts.

Rows are read from a local parquet file (or a ``datasets`` hub name), checked with
the same rules as ``python -m dapo_lightning.data_prep validate`` (``data/rows.py``), turned into RGB
images that fit ``max_image_side``, wrapped in the ChatML prompt (SPEC section 1)
and encoded by the policy's processor into a ``PromptBatch``.

Training prompts are shuffled by :class:`ResumableShuffleSampler`, in the orders
Lightning would use (``RandomSampler`` on one process, a seeded per-rank shard under
DDP), and a run resumed mid-epoch continues where the checkpointed run stopped
(Lightning restarts a plain loader's epoch from its first batch). Validation uses a sharding sampler
without padding, so every held-out question is scored exactly once and the metrics
are exact.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dapo_lightning.data import rows as mcq
from dapo_lightning.batch import PromptBatch
from dapo_lightning.prompts import SYSTEM_PROMPT, build_messages, special_token_strings, special_tokens_in


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
    """Rows of a DDM table, images left undecoded until a batch is built (so a bad row is named, not fatal at load)."""

    def __init__(self, table, source: str):
        self.table = table
        self.source = source

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.table[int(index)], "_index": int(index)}


class PromptCollator:
    """Turns dataset rows into a ``PromptBatch`` with the processor.

    A row is unusable when its text fails ``mcq.check_text``, its problem holds one of the
    tokenizer's special tokens (``prompts.special_tokens_in``), its image cannot be decoded
    (``mcq.decode_image``), the processor cannot encode it (tried alone when a batch fails,
    e.g. an image with an aspect ratio above 200), or its prompt is too long.
    With ``on_bad_row="error"`` an unusable row raises ``BadRow`` naming the file and row.
    With ``"skip"`` it is dropped and counted; when ``refill_from`` is given (training),
    the next usable row of that dataset takes its place, so every process keeps full
    batches (and DDP's processes stay in step); validation drops without refilling, so
    each held-out row is scored at most once.
    """

    def __init__(
        self,
        processor,
        *,
        source: str,
        system_prompt: str | None,
        max_image_side: int | None,
        max_prompt_length: int | None,
        on_bad_row: str,
        refill_from: Dataset | None = None,
    ):
        self.processor = processor
        self.source = source
        self.system_prompt = system_prompt
        self.max_image_side = max_image_side
        self.max_prompt_length = max_prompt_length
        self.on_bad_row = on_bad_row
        self.refill_from = refill_from
        self._bad: set[int] = set()  # rows known to be unusable (not retried as replacements)
        self._special = special_token_strings(getattr(processor, "tokenizer", None))

    def _prepare(self, row: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
        index = row["_index"]
        solution = mcq.check_text(row.get("problem"), row.get("solution"), source=self.source, row=index,
                                  require_options=True)
        found = special_tokens_in(row["problem"], self._special)
        if found:
            raise mcq.BadRow(self.source, index, f"problem contains the special token(s) {', '.join(map(repr, found))}, "
                             "which the tokenizer would read as control tokens, not text", mcq.CONTROL_TOKEN)
        image = mcq.decode_image(row.get("image"), source=self.source, row=index, max_side=self.max_image_side)
        text = self.processor.apply_chat_template(
            build_messages(row["problem"], self.system_prompt), tokenize=False, add_generation_prompt=True
        )
        return text, image, {**row, "solution": solution}

    def _replacement(self, taken: set[int], after: int) -> dict[str, Any] | None:
        """The first usable-looking row after ``after`` (cyclically) not in this batch, or None."""
        if self.refill_from is None:
            return None
        n = len(self.refill_from)
        for step in range(1, n + 1):
            index = (after + step) % n
            if index not in taken and index not in self._bad:
                return self.refill_from[index]
        return None

    def _unencodable(self, texts: list[str], images: list) -> dict[int, str]:
        """{position: why} of the rows the processor fails on alone."""
        rejected = {}
        for i, (text, image) in enumerate(zip(texts, images)):
            try:
                self.processor(text=[text], images=[image], padding=True, return_tensors="pt")
            except Exception as error:
                rejected[i] = f"the processor cannot encode it ({type(error).__name__}: {error})"
        return rejected

    def __call__(self, rows: list[dict[str, Any]]) -> PromptBatch:
        pending = list(rows)
        taken = {row["_index"] for row in rows}
        prepared: list[tuple[str, Any, dict[str, Any]]] = []
        skipped = 0

        def drop(row_index: int, error: mcq.BadRow) -> None:
            nonlocal skipped
            if self.on_bad_row == "error":
                raise error
            skipped += 1
            self._bad.add(row_index)
            replacement = self._replacement(taken, row_index)
            if replacement is not None:
                taken.add(replacement["_index"])
                pending.append(replacement)

        while True:
            while pending:
                row = pending.pop(0)
                try:
                    prepared.append(self._prepare(row))
                except mcq.BadRow as error:
                    drop(row["_index"], error)
            if not prepared:
                if self.refill_from is not None:
                    raise mcq.BadRow(self.source, rows[0]["_index"], "no usable row is left to fill a batch")
                return PromptBatch.empty().with_skipped(skipped)
            texts, images, kept = map(list, zip(*prepared))
            try:
                encoded = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
            except Exception:
                # e.g. an image of aspect ratio > 200: find the rows the processor rejects, one by one
                rejected = self._unencodable(texts, images)
                if not rejected:
                    raise
                for i, reason in rejected.items():
                    drop(kept[i]["_index"], mcq.BadRow(self.source, kept[i]["_index"], reason, mcq.UNENCODABLE))
                prepared = [item for i, item in enumerate(prepared) if i not in rejected]
                continue
            lengths = encoded["attention_mask"].sum(-1).tolist()
            limit = self.max_prompt_length
            too_long = [i for i, n in enumerate(lengths) if limit is not None and n > limit]
            if not too_long:
                break
            for i in too_long:
                reason = f"prompt has {lengths[i]} tokens, more than data.max_prompt_length={limit}"
                drop(kept[i]["_index"], mcq.BadRow(self.source, kept[i]["_index"], reason))
            prepared = [item for i, item in enumerate(prepared) if i not in too_long]
        columns = {k: [r[k] for r in kept] for k in kept[0] if k not in ("image", "_index")}
        batch = PromptBatch(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            pixel_values=encoded["pixel_values"],
            image_grid_thw=encoded["image_grid_thw"],
            image_counts=[1] * len(kept),
            mm_token_type_ids=encoded.get("mm_token_type_ids"),
            prompts=texts,
            columns=columns,
            index=[r["_index"] for r in kept],
        )
        return batch.with_skipped(skipped)


class ShardSampler(DistributedSampler):
    """Rank r of W takes indices r, r + W, ... in order: no padding, no duplicates (exact eval metrics).

    A ``DistributedSampler`` so that Lightning leaves it in place under DDP (it wraps any
    other sampler in a ``DistributedSamplerWrapper``, which would shard the shard again).
    """

    def __init__(self, length: int, rank: int, world_size: int):
        super().__init__(range(length), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableShuffleSampler(DistributedSampler):
    """The training order of the data module: Lightning's own orders, made resumable mid-epoch.

    One process (``seed=None``): each epoch's permutation is seeded by a draw from torch's
    global generator when the epoch's iteration starts, exactly as ``RandomSampler``
    does; the drawn seed is kept (``epoch_seed``) for checkpoints. Several processes
    (``seed`` set): ``torch.randperm`` seeded with ``seed + epoch`` and rank r of W takes
    every W-th index, exactly as the ``DistributedSampler`` Lightning would inject; being a
    ``DistributedSampler``, Lightning leaves it in place.

    ``resume_at(epoch, start, epoch_seed)``: Lightning restarts a plain loader's epoch from
    its first batch when it resumes, so the data module tells the sampler the epoch's
    seed and how many of this rank's indices the checkpointed run had consumed; they are
    skipped in that epoch only.
    """

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0, seed: int | None = None):
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed if seed is not None else 0, drop_last=False)
        self.draw_seed = seed is None
        self.epoch_seed: int | None = None
        self.start, self._start_epoch, self._pinned_seed = 0, 0, None

    def resume_at(self, epoch: int, start: int, epoch_seed: int | None = None) -> None:
        self.set_epoch(epoch)
        self.start, self._start_epoch, self._pinned_seed = start, epoch, epoch_seed

    def __iter__(self):
        resuming = self.epoch == self._start_epoch
        if self.draw_seed:
            if resuming and self._pinned_seed is not None:
                seed = self._pinned_seed
            else:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's draw
            self.epoch_seed = seed
            indices = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            indices = list(super().__iter__())
        if resuming and self.start:
            indices = indices[self.start :]
        return iter(indices)


class VisualMCQDataModule(LightningDataModule):
    """Serves a DDM parquet (image, problem, solution) as prompt batches for rollouts."""

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
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
        on_bad_row: Literal["error", "skip"] = "error",
        build_synthetic_if_missing: SyntheticData | dict | None = None,
    ):
        """
        Args:
            train_path: Local DDM parquet file (or a folder of parquet files).
            eval_path: Separate held-out parquet; when unset, ``eval_ratio`` of the training file is held out.
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
            max_prompt_length: Rows whose encoded prompt is longer are an error (or skipped).
            on_bad_row: ``error`` stops at the first unusable row, naming it; ``skip`` drops and counts such rows.
            build_synthetic_if_missing: When ``train_path`` does not exist, write synthetic questions there first.
        """
        super().__init__()
        if not (train_path or dataset_name):
            raise ValueError("data: set data.train_path (a parquet file) or data.dataset_name (a datasets hub name)")
        if not 0 < eval_ratio < 1 and eval_path is None:
            raise ValueError(f"data.eval_ratio: must be in (0, 1), got {eval_ratio}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size: must be >= 1, got {batch_size}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row: choose from error, skip; got {on_bad_row!r}")
        if isinstance(build_synthetic_if_missing, SyntheticData):
            # plain values in the checkpoint: a dataclass there would not load with weights_only=True (no resume)
            build_synthetic_if_missing = asdict(build_synthetic_if_missing)
        self.save_hyperparameters()
        self.train_table = None
        self.eval_table = None
        self._processor = None
        self._train_sampler: ResumableShuffleSampler | None = None
        self._saved_order: dict | None = None

    # --- loading -----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.train_table is not None:
            return
        table, source = self._load(self.hparams.train_path, self.hparams.dataset_name, self.hparams.dataset_split)
        self.source = source
        if self.hparams.eval_path:
            eval_table, eval_source = self._load(self.hparams.eval_path, None, None)
            self.eval_source = eval_source
        else:
            split = table.train_test_split(test_size=self.hparams.eval_ratio, seed=self.hparams.split_seed)
            table, eval_table = split["train"], split["test"]
            self.eval_source = f"{source} (held-out {self.hparams.eval_ratio:g})"
        if self.hparams.eval_limit is not None:
            eval_table = eval_table.select(range(min(self.hparams.eval_limit, len(eval_table))))
        self.train_table, self.eval_table = table, eval_table

    def _load(self, path: str | None, name: str | None, split: str | None):
        from datasets import Dataset, Image as ImageFeature, load_dataset

        if path:
            p = Path(path)
            if not p.exists():
                raise FileNotFoundError(f"data.train_path/eval_path: {path} does not exist")
            files = sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]
            if not files:
                raise FileNotFoundError(f"{path}: folder holds no .parquet files")
            try:
                table = Dataset.from_parquet(files if len(files) > 1 else files[0])
            except Exception as error:  # pyarrow raises several types for a file that is not parquet
                raise ValueError(f"{path}: cannot be read as parquet ({type(error).__name__}: {error})") from error
            source = str(path)
        else:
            table = load_dataset(name, self.hparams.dataset_config, split=split)
            source = f"{name}[{split}]"
        missing = mcq.missing_columns(table.column_names)
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; a DDM file has {', '.join(mcq.COLUMNS)}")
        if isinstance(table.features["image"], ImageFeature):
            table = table.cast_column("image", ImageFeature(decode=False))  # decode in the collator, row named on error
        return table, source

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
            on_bad_row=self.hparams.on_bad_row,
            refill_from=refill_from,
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
            per_epoch = sampler.num_samples // batch_size if drop_last else -(-sampler.num_samples // batch_size)
            if per_epoch and done >= per_epoch:  # the checkpoint closed an epoch: the next one starts afresh
                epoch, done = epoch + 1, 0
            saved = self._saved_order or {}
            sampler.resume_at(epoch, done * batch_size, saved.get("seed") if saved.get("epoch") == epoch else None)
        self._train_sampler = sampler
        dataset = VisualMCQDataset(self.train_table, self.source)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(self.source, refill_from=dataset),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def state_dict(self) -> dict:
        """The batch size and the current epoch's shuffling seed (one process), so a resume continues the order."""
        sampler = self._train_sampler
        if sampler is None:
            return {}
        state = {"batch_size": int(self.hparams.batch_size)}
        if sampler.epoch_seed is not None:
            state["train_order"] = {"epoch": int(sampler.epoch), "seed": int(sampler.epoch_seed)}
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
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(
            VisualMCQDataset(self.eval_table, self.eval_source),
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            sampler=ShardSampler(len(self.eval_table), rank, world),
            num_workers=self.hparams.num_workers,
            collate_fn=self.collator(self.eval_source),
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if isinstance(batch, PromptBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def example_prompt_batch(processor, rows: list[dict[str, Any]], system_prompt: str | None = SYSTEM_PROMPT) -> PromptBatch:
    """Encode in-memory DDM rows (``image`` PIL or bytes dict) into a ``PromptBatch`` (for probes and tests)."""
    collate = PromptCollator(
        processor, source="<memory>", system_prompt=system_prompt, max_image_side=None, max_prompt_length=None,
        on_bad_row="error",
    )
    return collate([{**row, "_index": i} for i, row in enumerate(rows)])


__all__ = [
    "VisualMCQDataModule",
    "VisualMCQDataset",
    "PromptCollator",
    "ResumableShuffleSampler",
    "ShardSampler",
    "SyntheticData",
    "example_prompt_batch",
]
