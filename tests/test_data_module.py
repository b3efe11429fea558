"""VisualMCQDataModule on generated parquet files: split, prompts, images, bad rows."""

import io

import pytest
import torch
from datasets import Dataset
from PIL import Image

from dapo_lightning.batch import PromptBatch
from dapo_lightning.data import VisualMCQDataModule, ShardSampler
from dapo_lightning.data.rows import BadRow, mcq_features
from dapo_lightning.prompts import SYSTEM_PROMPT


def _png(size=(300, 120), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path, rows):
    Dataset.from_list(rows, features=mcq_features()).to_parquet(str(path))
    return path


def _row(solution="B", image=None, problem="What colour?\nA: red\nB: blue"):
    return {"image": {"bytes": image if image is not None else _png(), "path": None}, "problem": problem,
            "solution": solution}


def _module(path, tiny_model_dir, **kwargs):
    module = VisualMCQDataModule(train_path=str(path), processor=str(tiny_model_dir), **kwargs)
    module.setup("fit")
    return module


def test_nine_to_one_split_with_seed_42_is_deterministic(synthetic_parquet, tiny_model_dir):
    a = _module(synthetic_parquet, tiny_model_dir)
    b = _module(synthetic_parquet, tiny_model_dir)
    assert (len(a.train_table), len(a.eval_table)) == (36, 4)  # 40 rows, test_size 0.1
    assert a.eval_table["problem"] == b.eval_table["problem"]
    other = _module(synthetic_parquet, tiny_model_dir, split_seed=7)
    assert other.eval_table["problem"] != a.eval_table["problem"] or other.eval_table["image"] != a.eval_table["image"]


def test_separate_eval_file_and_eval_limit(tmp_path, synthetic_parquet, tiny_model_dir):
    eval_file = _write(tmp_path / "eval.parquet", [_row("A"), _row("B"), _row("A")])
    module = _module(synthetic_parquet, tiny_model_dir, eval_path=str(eval_file), eval_limit=2)
    assert len(module.train_table) == 40 and len(module.eval_table) == 2


def test_train_batch_is_an_encoded_prompt_batch(synthetic_parquet, tiny_model_dir, processor):
    module = _module(synthetic_parquet, tiny_model_dir, batch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch, PromptBatch)
    assert batch.input_ids.shape[0] == 4 == len(batch.columns["solution"]) == len(batch.prompts)
    assert batch.image_grid_thw.tolist() == [[1, 4, 4]] * 4
    assert batch.pixel_values.shape[0] == 4 * 16
    assert all(p.startswith("<|im_start|>system\n" + SYSTEM_PROMPT[:20]) for p in batch.prompts)
    assert all(p.endswith("<|im_start|>assistant\n") for p in batch.prompts)
    assert set(batch.columns) == {"problem", "solution"}
    assert torch.equal(batch.mm_token_type_ids.bool(), batch.input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_images_are_rgb_and_fit_max_image_side(tmp_path, tiny_model_dir):
    from dapo_lightning.data.rows import decode_image

    grey = io.BytesIO()
    Image.new("L", (2000, 500), 128).save(grey, format="PNG")
    image = decode_image({"bytes": grey.getvalue(), "path": None}, max_side=1024)
    assert image.mode == "RGB" and image.size == (1024, 256)


def test_no_system_prompt(synthetic_parquet, tiny_model_dir):
    module = _module(synthetic_parquet, tiny_model_dir, system_prompt=None)
    batch = next(iter(module.val_dataloader()))
    assert all(p.startswith("<|im_start|>system\nYou are a helpful assistant.") for p in batch.prompts)


def test_missing_path_names_the_file(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        _module(tmp_path / "nope.parquet", tiny_model_dir)


def test_missing_column_names_the_file_and_column(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.parquet"
    Dataset.from_list([{"image": {"bytes": _png(), "path": None}, "problem": "Q\nA: x"}]).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) solution"):
        _module(path, tiny_model_dir)


def test_unreadable_image_names_file_and_row(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "broken.parquet", [_row(), _row(image=b"not a png"), _row()])
    module = _module(path, tiny_model_dir, eval_path=str(path), batch_size=3)
    with pytest.raises(BadRow, match=r"broken.parquet: row 1: image cannot be decoded"):
        next(iter(module.val_dataloader()))


def test_solution_outside_a_to_j_names_the_row(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "letters.parquet", [_row(), _row(), _row(solution="K")])
    module = _module(path, tiny_model_dir, eval_path=str(path), batch_size=3)
    with pytest.raises(BadRow, match=r"row 2: solution 'K'"):
        next(iter(module.val_dataloader()))


def test_skip_drops_and_counts_bad_rows(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "mixed.parquet", [_row(), _row(image=b"junk"), _row(solution="Z"), _row("A")])
    module = _module(path, tiny_model_dir, eval_path=str(path), batch_size=4, on_bad_row="skip")
    batch = next(iter(module.val_dataloader()))
    assert batch.index == [0, 3] and batch.num_skipped == 2
    assert batch.columns["solution"] == ["B", "A"]


def test_too_long_prompt_is_an_error_naming_the_key(synthetic_parquet, tiny_model_dir):
    module = _module(synthetic_parquet, tiny_model_dir, max_prompt_length=20)
    with pytest.raises(BadRow, match="data.max_prompt_length=20"):
        next(iter(module.val_dataloader()))


def test_bad_settings_name_the_key(synthetic_parquet):
    with pytest.raises(ValueError, match="data.train_path"):
        VisualMCQDataModule()
    with pytest.raises(ValueError, match="data.batch_size"):
        VisualMCQDataModule(train_path=str(synthetic_parquet), batch_size=0)
    with pytest.raises(ValueError, match="data.eval_ratio"):
        VisualMCQDataModule(train_path=str(synthetic_parquet), eval_ratio=1.5)


def test_shard_sampler_covers_every_row_once():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_synthetic_file_is_built_when_missing(tmp_path, tiny_model_dir):
    from dapo_lightning.data import SyntheticData
    from dapo_lightning.data_prep.fixtures import build_missing

    target = tmp_path / "made" / "colour.parquet"
    settings = SyntheticData(rows=20, question_types=["colour"])
    # the CLI builds it from the data module's own keys before it creates the module (no build in the library)
    assert build_missing({"data": {"train_path": str(target), "build_synthetic_if_missing": settings}}) == [
        f"synthetic questions to {target}"]
    module = _module(target, tiny_model_dir, build_synthetic_if_missing=settings)
    assert target.exists()
    assert len(module.train_table) + len(module.eval_table) == 20
    assert all(p.startswith("What colour") for p in module.train_table["problem"])


def test_training_batches_stay_full_by_refilling_skipped_rows(tmp_path, tiny_model_dir):
    rows = [_row("A"), _row(image=b"junk"), _row("B"), _row(solution="Z"), _row("A"), _row("B")]
    path = _write(tmp_path / "train.parquet", rows)
    module = _module(path, tiny_model_dir, eval_path=str(path), batch_size=4, on_bad_row="skip")
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    dataset = collate.refill_from
    batch = collate([dataset[i] for i in range(4)])  # rows 1 and 3 are unusable
    assert len(batch) == 4 and batch.num_skipped == 2
    assert batch.index == [0, 2, 4, 5]  # the next usable rows took their places
    again = collate([dataset[i] for i in (3, 1, 0, 2)])  # known-bad rows are not retried as replacements
    assert again.index == [0, 2, 4, 5] and again.num_skipped == 2


def test_a_validation_batch_of_only_bad_rows_is_empty(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "allbad.parquet", [_row(image=b"junk"), _row(solution="Q")])
    module = _module(path, tiny_model_dir, eval_path=str(path), batch_size=2, on_bad_row="skip")
    batch = next(iter(module.val_dataloader()))
    assert len(batch) == 0 and batch.num_skipped == 2


def test_too_long_prompts_are_skipped_and_refilled(synthetic_parquet, tiny_model_dir, processor):
    module = _module(synthetic_parquet, tiny_model_dir, max_prompt_length=10_000, on_bad_row="skip", batch_size=2)
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    dataset = collate.refill_from
    lengths = [len(collate([dataset[i]]).input_ids[0]) for i in range(6)]
    collate.max_prompt_length = min(lengths)  # only the shortest prompts fit
    batch = collate([dataset[i] for i in range(2)])
    assert all(int(n) <= min(lengths) for n in batch.attention_mask.sum(-1))
    assert len(batch) == 2
