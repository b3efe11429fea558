"""VisualMCQDataModule on generated parquet files: split, eval file, settings, encoded batches, synthetic data."""

import pytest
import torch
from data_helpers import png, row, set_up, write
from datasets import Dataset

from dapo_lightning.batch import PromptBatch
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.prompts import SYSTEM_PROMPT


def test_nine_to_one_split_with_seed_42_is_deterministic(synthetic_parquet, tiny_model_dir):
    a = set_up(synthetic_parquet, tiny_model_dir)
    b = set_up(synthetic_parquet, tiny_model_dir)
    assert (len(a.train_table), len(a.eval_table)) == (36, 4)  # 40 rows, test_size 0.1
    assert a.eval_table["problem"] == b.eval_table["problem"]
    other = set_up(synthetic_parquet, tiny_model_dir, split_seed=7)
    assert other.eval_table["problem"] != a.eval_table["problem"] or other.eval_table["image"] != a.eval_table["image"]


def test_separate_eval_file_and_eval_limit(tmp_path, synthetic_parquet, tiny_model_dir):
    eval_file = write(tmp_path / "eval.parquet", [row("A"), row("B"), row("A")])
    module = set_up(synthetic_parquet, tiny_model_dir, eval_path=str(eval_file), eval_limit=2)
    assert len(module.train_table) == 40 and len(module.eval_table) == 2


def test_train_batch_is_an_encoded_prompt_batch(synthetic_parquet, tiny_model_dir, processor):
    module = set_up(synthetic_parquet, tiny_model_dir, batch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert isinstance(batch, PromptBatch)
    assert batch.input_ids.shape[0] == 4 == len(batch.columns["solution"]) == len(batch.prompts)
    assert batch.image_grid_thw.tolist() == [[1, 4, 4]] * 4
    assert batch.pixel_values.shape[0] == 4 * 16
    assert all(p.startswith("<|im_start|>system\n" + SYSTEM_PROMPT[:20]) for p in batch.prompts)
    assert all(p.endswith("<|im_start|>assistant\n") for p in batch.prompts)
    assert set(batch.columns) == {"problem", "solution"}
    assert torch.equal(batch.mm_token_type_ids.bool(), batch.input_ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_no_system_prompt(synthetic_parquet, tiny_model_dir):
    module = set_up(synthetic_parquet, tiny_model_dir, system_prompt=None)
    batch = next(iter(module.val_dataloader()))
    assert all(p.startswith("<|im_start|>system\nYou are a helpful assistant.") for p in batch.prompts)


def test_missing_path_names_the_file(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        set_up(tmp_path / "nope.parquet", tiny_model_dir)


def test_missing_column_names_the_file_and_column(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.parquet"
    Dataset.from_list([{"image": {"bytes": png(), "path": None}, "problem": "Q\nA: x"}]).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) solution"):
        set_up(path, tiny_model_dir)


def test_bad_settings_name_the_key(synthetic_parquet):
    with pytest.raises(ValueError, match="data.train_path"):
        VisualMCQDataModule()
    with pytest.raises(ValueError, match="data.batch_size"):
        VisualMCQDataModule(train_path=str(synthetic_parquet), batch_size=0)
    with pytest.raises(ValueError, match="data.eval_ratio"):
        VisualMCQDataModule(train_path=str(synthetic_parquet), eval_ratio=1.5)


def test_synthetic_file_is_built_when_missing(tmp_path, tiny_model_dir):
    from dapo_lightning.data import SyntheticData
    from dapo_lightning.data_prep.fixtures import build_missing

    target = tmp_path / "made" / "colour.parquet"
    settings = SyntheticData(rows=20, question_types=["colour"])
    # the CLI builds it from the data module's own keys before it creates the module (no build in the library)
    assert build_missing({"data": {"train_path": str(target), "build_synthetic_if_missing": settings}}) == [
        f"synthetic questions to {target}"]
    module = set_up(target, tiny_model_dir, build_synthetic_if_missing=settings)
    assert target.exists()
    assert len(module.train_table) + len(module.eval_table) == 20
    assert all(p.startswith("What colour") for p in module.train_table["problem"])


@pytest.mark.parametrize("key, value", [
    ("max_image_side", 0), ("max_image_side", -5), ("max_image_side", 2.5), ("batch_size", True),
    ("eval_batch_size", 0), ("eval_limit", 0), ("eval_limit", -1), ("num_workers", -1), ("max_prompt_length", 0),
    ("split_seed", 1.5), ("eval_ratio", 0.0), ("eval_ratio", "0.1"), ("max_image_pixels", 0),
])
def test_every_numeric_setting_is_checked_at_construction_naming_its_key(synthetic_parquet, key, value):
    # data.max_image_side 0 used to reach Pillow's thumbnail() and fail there with a ZeroDivisionError
    with pytest.raises(ValueError, match=rf"data\.{key}: .*{value!r}"):
        VisualMCQDataModule(train_path=str(synthetic_parquet), **{key: value})


@pytest.mark.parametrize("key, value", [("rows", 0), ("image_size", 0), ("seed", "x")])
def test_synthetic_data_numbers_are_checked_naming_their_key(synthetic_parquet, key, value):
    with pytest.raises(ValueError, match=rf"data\.build_synthetic_if_missing\.{key}: .*{value!r}"):
        VisualMCQDataModule(train_path=str(synthetic_parquet), build_synthetic_if_missing={key: value})


def test_valid_numbers_and_unset_limits_are_accepted(synthetic_parquet):
    module = VisualMCQDataModule(train_path=str(synthetic_parquet), max_image_side=None, eval_batch_size=2,
                                 eval_limit=1, max_prompt_length=64, num_workers=0, eval_ratio=0.5,
                                 build_synthetic_if_missing={"rows": 8})
    assert module.hparams.max_image_side is None and module.hparams.eval_limit == 1


def test_max_image_side_zero_no_longer_reaches_pillow(synthetic_parquet, tiny_model_dir):
    # it used to pass construction and fail at the first batch, inside Pillow, with a ZeroDivisionError
    with pytest.raises(ValueError, match=r"data\.max_image_side: must be a whole number >= 1 or null, got 0"):
        next(iter(set_up(synthetic_parquet, tiny_model_dir, max_image_side=0).train_dataloader()))
