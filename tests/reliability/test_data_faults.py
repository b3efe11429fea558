"""Faults of the training data as a whole: an empty parquet file (or a folder of them), and unusable rows skipped
with data.on_bad_row=skip, counted per stage and kind and summed up in one line at the end of each epoch."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from PIL import Image

from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.data import rows as mcq


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def row(solution="B", image=None) -> dict:
    return {"image": {"bytes": png() if image is None else image, "path": None}, "problem": "Colour?\nA: red\nB: blue",
            "solution": solution}


def write(path, rows):
    Dataset.from_list(rows, features=mcq.mcq_features()).to_parquet(str(path))
    return path


def write_empty(path):
    pq.write_table(Dataset.from_list([row()], features=mcq.mcq_features()).data.table.slice(0, 0), str(path))
    return path


def set_up(path, tiny_model_dir, **kwargs) -> VisualMCQDataModule:
    module = VisualMCQDataModule(train_path=str(path), processor=str(tiny_model_dir), **kwargs)
    module.setup("fit")
    return module


@pytest.mark.reliability("Untrusted input", "An empty parquet file as data.train_path (a schema, no rows), and a "
                         "folder of parquet files that are all empty",
                         "ValueError naming the file or folder: no rows (not 'cannot be read as parquet'); an empty "
                         "file among others in a folder is left out")
def test_an_empty_parquet_says_it_has_no_rows(tmp_path, tiny_model_dir):
    empty = write_empty(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=rf"^{empty}: no rows \(an empty parquet file\)$"):
        set_up(empty, tiny_model_dir)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_empty(folder / "a.parquet")
    with pytest.raises(ValueError, match=rf"^{folder}: no rows \(its only parquet file is empty\)$"):
        set_up(folder, tiny_model_dir)
    write_empty(folder / "c.parquet")
    with pytest.raises(ValueError, match=rf"^{folder}: no rows \(its 2 parquet files are empty\)$"):
        set_up(folder, tiny_model_dir)
    write(folder / "b.parquet", [row(), row()])  # an empty part next to others is left out, not an error
    module = set_up(folder, tiny_model_dir, eval_path=str(folder), batch_size=2)
    b = str(folder / "b.parquet")
    assert next(iter(module.val_dataloader())).source_rows == [(b, 0), (b, 1)]


def trainer(training: bool, epoch: int = 0):
    """What the data module reads of a trainer when batches arrive and when it reports."""
    return SimpleNamespace(training=training, current_epoch=epoch, global_rank=0, world_size=1,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


@pytest.mark.reliability("Untrusted input", "Unusable rows in training and validation batches (on_bad_row: skip)",
                         "counted per stage and kind as batches arrive; one line per epoch and stage with the count, "
                         "the kinds and the first row's file, row and reason; the count starts again each epoch")
def test_skipped_rows_are_counted_per_stage_and_summarised_per_epoch(tmp_path, tiny_model_dir, caplog):
    rows = [row(), row(solution="Z"), row(image=b"junk"), row("A"), row(solution="Q"), row("B")]
    path = write(tmp_path / "mixed.parquet", rows)
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=3, on_bad_row="skip")
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    module.trainer = trainer(training=False)
    for batch in module.val_dataloader():  # rows 0-2 (1 and 2 unusable), rows 3-5 (4 unusable)
        module.on_before_batch_transfer(batch, 0)
    module.trainer = trainer(training=True, epoch=2)
    batch = collate([collate.refill_from[i] for i in (0, 1)])  # row 1 unusable, its replacement row 2 too: row 3
    assert batch.index == [0, 3] and batch.num_skipped == 2
    module.on_before_batch_transfer(batch, 0)
    with caplog.at_level(logging.INFO):
        assert module.report_skipped_rows("val") == 3
        assert module.report_skipped_rows("val") == 0  # counted again from zero: the next epoch's
        assert module.report_skipped_rows("train") == 2
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    first = f"the first: {path}: row 1: solution 'Z' is not a letter A-J"
    advice = "python -m dapo_lightning.data_prep validate lists every unusable row"
    assert lines == [
        f"val epoch 2: 3 unusable rows skipped (data.on_bad_row=skip): 2 {mcq.BAD_SOLUTION}, 1 {mcq.UNREADABLE_IMAGE}; "
        f"{first}; {advice}",
        f"train epoch 2: 2 unusable rows skipped (data.on_bad_row=skip): 1 {mcq.BAD_SOLUTION}, "
        f"1 {mcq.UNREADABLE_IMAGE}; {first}; {advice}",
    ]
