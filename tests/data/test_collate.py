"""PromptCollator through the data module's loaders: bad rows named, or skipped and counted; training refills."""

import pytest
from data_helpers import row, set_up, write

from dapo_lightning.data.rows import BadRow


def test_unreadable_image_names_file_and_row(tmp_path, tiny_model_dir):
    path = write(tmp_path / "broken.parquet", [row(), row(image=b"not a png"), row()])
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=3)
    with pytest.raises(BadRow, match=r"broken.parquet: row 1: image cannot be decoded"):
        next(iter(module.val_dataloader()))


def test_solution_outside_a_to_j_names_the_row(tmp_path, tiny_model_dir):
    path = write(tmp_path / "letters.parquet", [row(), row(), row(solution="K")])
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=3)
    with pytest.raises(BadRow, match=r"row 2: solution 'K'"):
        next(iter(module.val_dataloader()))


def test_skip_drops_and_counts_bad_rows(tmp_path, tiny_model_dir):
    path = write(tmp_path / "mixed.parquet", [row(), row(image=b"junk"), row(solution="Z"), row("A")])
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=4, on_bad_row="skip")
    batch = next(iter(module.val_dataloader()))
    assert batch.index == [0, 3] and batch.num_skipped == 2
    assert batch.columns["solution"] == ["B", "A"]


def test_too_long_prompt_is_an_error_naming_the_key(synthetic_parquet, tiny_model_dir):
    module = set_up(synthetic_parquet, tiny_model_dir, max_prompt_length=20)
    with pytest.raises(BadRow, match="data.max_prompt_length=20"):
        next(iter(module.val_dataloader()))


def test_training_batches_stay_full_by_refilling_skipped_rows(tmp_path, tiny_model_dir):
    rows = [row("A"), row(image=b"junk"), row("B"), row(solution="Z"), row("A"), row("B")]
    path = write(tmp_path / "train.parquet", rows)
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=4, on_bad_row="skip")
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    dataset = collate.refill_from
    batch = collate([dataset[i] for i in range(4)])  # rows 1 and 3 are unusable
    assert len(batch) == 4 and batch.num_skipped == 2
    assert batch.index == [0, 2, 4, 5]  # the next usable rows took their places
    again = collate([dataset[i] for i in (3, 1, 0, 2)])  # known-bad rows are not retried as replacements
    assert again.index == [0, 2, 4, 5] and again.num_skipped == 2


def test_a_validation_batch_of_only_bad_rows_is_empty(tmp_path, tiny_model_dir):
    path = write(tmp_path / "allbad.parquet", [row(image=b"junk"), row(solution="Q")])
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=2, on_bad_row="skip")
    batch = next(iter(module.val_dataloader()))
    assert len(batch) == 0 and batch.num_skipped == 2


def test_too_long_prompts_are_skipped_and_refilled(synthetic_parquet, tiny_model_dir, processor):
    module = set_up(synthetic_parquet, tiny_model_dir, max_prompt_length=10_000, on_bad_row="skip", batch_size=2)
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    dataset = collate.refill_from
    lengths = [len(collate([dataset[i]]).input_ids[0]) for i in range(6)]
    collate.max_prompt_length = min(lengths)  # only the shortest prompts fit
    batch = collate([dataset[i] for i in range(2)])
    assert all(int(n) <= min(lengths) for n in batch.attention_mask.sum(-1))
    assert len(batch) == 2


def test_a_training_batch_with_no_usable_row_left_names_the_first_row(tmp_path, tiny_model_dir):
    path = write(tmp_path / "allbad.parquet", [row(image=b"junk"), row(solution="Q"), row(problem="no options")])
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=2, on_bad_row="skip")
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    dataset = collate.refill_from
    with pytest.raises(BadRow, match=r"allbad.parquet: row 1: no usable row is left to fill a batch"):
        collate([dataset[1], dataset[0]])  # every row is tried as a replacement before the batch gives up
    assert collate._bad == {0, 1, 2}
