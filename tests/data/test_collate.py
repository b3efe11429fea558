"""PromptCollator through the data module's loaders: bad rows named, or skipped and counted; training refills;
images shrunk just enough for their prompts to fit data.max_prompt_length."""

import pytest
import torch
from data_helpers import png, row, set_up, write
from PIL import Image

from dapo_lightning.data.rows import PROMPT_TOO_LONG, UNENCODABLE, BadRow


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


# --- images shrunk to fit data.max_prompt_length (data/image_fit.py), with Qwen2.5-VL-7B's image processor ---

CHART_QUESTION = ("Which statement best describes the validation loss after epoch 10 in the figure?\n"
                  "A: It keeps decreasing\nB: It rises again\nC: It stays flat\nD: It oscillates")


def photo_rows(*sizes, problem=CHART_QUESTION):
    return [row("A", png(size), problem) for size in sizes]


def text_tokens(processor, prompt: str) -> int:
    """Tokens of a rendered prompt besides its image: the one <|image_pad|> placeholder becomes the image's tokens."""
    return len(processor.tokenizer(prompt)["input_ids"]) - 1


@pytest.mark.parametrize("max_image_side", [1024, None])
def test_large_images_shrink_just_enough_for_a_1024_token_prompt(tmp_path, qwen7b_vision_dir, qwen7b_processor,
                                                                 max_image_side):
    path = write(tmp_path / "photos.parquet", photo_rows((1024, 768), (2048, 1536), (300, 120)))
    module = set_up(path, qwen7b_vision_dir, eval_path=str(path), batch_size=3, max_prompt_length=1024,
                    max_image_side=max_image_side)  # 1024: the 2048 x 1536 image is 1024 x 768 before it is fitted
    batch = next(iter(module.val_dataloader()))
    assert batch.index == [0, 1, 2] and batch.num_skipped == 0
    # The SPEC system prompt, the question and the chat template: 149 text tokens, so 1024 - 149 = 875 for the image.
    assert [text_tokens(qwen7b_processor, p) for p in batch.prompts] == [149] * 3
    # Unshrunk, 1024 x 768 is 27 x 37 cells = 999 tokens (2048 x 1536: 55 x 73 = 4015), 1148 (4164) in all.
    # Largest scale within 875: 25 x 34 cells = 850 tokens (test_image_fit has the candidates); the next larger,
    # 26 x 34 = 884, would make 149 + 884 = 1033 > 1024. Grids count 14-px patches: 2 x the cells.
    assert batch.image_grid_thw.tolist() == [[1, 50, 68], [1, 50, 68], [1, 8, 22]]
    assert batch.attention_mask.sum(-1).tolist() == [149 + 850, 149 + 850, 149 + 44]
    # 300 x 120 is 4 x 11 cells = 44 tokens: it fits, is left as it is and is not counted
    assert batch.num_resized == 2
    untouched = qwen7b_processor.image_processor(images=[Image.new("RGB", (300, 120), "red")], return_tensors="pt")
    torch.testing.assert_close(batch.pixel_values[-8 * 22:], untouched["pixel_values"], rtol=0, atol=0)


def test_the_policy_runs_on_prompts_with_fitted_images(tmp_path, qwen7b_vision_dir):
    from dapo_lightning.models import load_policy

    path = write(tmp_path / "photos.parquet", photo_rows((1024, 768), (300, 120)))
    module = set_up(path, qwen7b_vision_dir, eval_path=str(path), batch_size=2, max_prompt_length=1024)
    batch = next(iter(module.val_dataloader()))
    policy = load_policy(str(qwen7b_vision_dir))
    with torch.no_grad():  # the model checks that the image features match the <|image_pad|> tokens
        logits = policy(**batch.model_inputs()).logits  # [B, P, V]
    assert logits.shape[:2] == (2, 999)


def test_a_row_too_long_even_with_the_fewest_image_tokens_is_refilled_in_training(tmp_path, qwen7b_vision_dir):
    wordy = "Describe the figure: " + "red " * 1000 + "\nA: red\nB: blue"
    rows = photo_rows((1024, 768), problem=wordy) + photo_rows((2048, 1536), (1024, 768), (300, 120))
    path = write(tmp_path / "mixed.parquet", rows)
    module = set_up(path, qwen7b_vision_dir, eval_path=str(path), batch_size=2, max_prompt_length=1024,
                    on_bad_row="skip")
    collate = module.collator(module.source, refill_from=module.train_dataloader().dataset)
    dataset = collate.refill_from
    batch = collate([dataset[0], dataset[1]])
    assert batch.index == [1, 2] and batch.num_skipped == 1 and batch.num_resized == 2  # row 2 took row 0's place
    assert batch.attention_mask.sum(-1).tolist() == [999, 999]
    held_out = next(iter(module.val_dataloader()))  # validation: the same fit, the bad row dropped, not replaced
    assert held_out.index == [1] and held_out.num_skipped == 1 and held_out.num_resized == 1
    assert held_out.image_grid_thw.tolist() == [[1, 50, 68]]
    strict = set_up(path, qwen7b_vision_dir, eval_path=str(path), batch_size=2, max_prompt_length=1024)
    # "red" x 1000, 10 tokens of question and options, 116 of the system prompt and chat template; the fewest
    # image tokens: 2 x 2 cells (min_pixels 3136 = 4 cells of 28 x 28)
    with pytest.raises(BadRow, match=r"mixed.parquet: row 0: prompt has 1126 text tokens and at least 4 image tokens "
                                     r"\(the 1024x768 image shrunk to 2x2 cells of 28 px\), 1130 in all, more than "
                                     r"data.max_prompt_length=1024") as caught:
        next(iter(strict.val_dataloader()))
    assert caught.value.kind == PROMPT_TOO_LONG


def test_without_fitting_large_images_make_rows_too_long_as_before(tmp_path, qwen7b_vision_dir):
    path = write(tmp_path / "photos.parquet", photo_rows((1024, 768), (2048, 1536), (300, 120)))
    kept = set_up(path, qwen7b_vision_dir, eval_path=str(path), batch_size=3, max_prompt_length=1024,
                  fit_images_to_prompt=False, on_bad_row="skip")
    batch = next(iter(kept.val_dataloader()))  # 149 + 999 = 1148 tokens > 1024: both large rows are dropped
    assert batch.index == [2] and batch.num_skipped == 2 and batch.num_resized == 0
    unlimited = set_up(path, qwen7b_vision_dir, eval_path=str(path), batch_size=3)  # no max_prompt_length: no fit
    batch = next(iter(unlimited.val_dataloader()))
    assert batch.attention_mask.sum(-1).tolist() == [149 + 999, 149 + 999, 149 + 44] and batch.num_resized == 0


def test_an_image_the_processor_would_refuse_is_named_before_it_is_fitted(tmp_path, tiny_model_dir):
    path = write(tmp_path / "thin.parquet", [row(), row(image=png((1, 1000)))])
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=2, max_prompt_length=1024)
    with pytest.raises(BadRow, match=r"thin.parquet: row 1: the processor cannot encode it \(ValueError: absolute "
                                     r"aspect ratio must be smaller than 200") as caught:
        next(iter(module.val_dataloader()))
    assert caught.value.kind == UNENCODABLE


def test_the_pixel_limit_reaches_the_collator_and_is_validated(tmp_path, tiny_model_dir):
    path = write(tmp_path / "wide.parquet", [row()])  # a 300x120 image: 36000 pixels
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=1, max_image_pixels=36_000)
    assert len(next(iter(module.val_dataloader()))) == 1
    module = set_up(path, tiny_model_dir, eval_path=str(path), batch_size=1, max_image_pixels=35_999)
    with pytest.raises(BadRow, match=r"wide.parquet: row 0: image is 300x120 pixels, more than 35999 pixels, the limit "
                                     r"against decompression bombs \(data.max_image_pixels\)"):
        next(iter(module.val_dataloader()))
    from dapo_lightning.data import VisualMCQDataModule

    for wrong in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=rf"data.max_image_pixels: must be a whole number >= 1, got {wrong!r}"):
            VisualMCQDataModule(train_path=str(path), max_image_pixels=wrong)
