"""ImageGrid: Qwen2.5-VL's image tokens computed from its smart_resize rules; the largest down-scale within a budget.

Qwen2.5-VL-7B's image processor: cells of 28 px (patch 14, merge 2), one token per cell, images
kept between 3136 and 12845056 pixels. Numbers below are worked by hand from those rules.
"""

import pytest
from PIL import Image

from dapo_lightning.data.image_fit import ImageGrid, shrink_to_fit

QWEN_7B = ImageGrid(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)


def test_cells_follow_the_processors_smart_resize():
    assert QWEN_7B.factor == 28
    # 768 / 28 = 27.43 -> 27 rows, 1024 / 28 = 36.57 -> 37 columns: 999 tokens
    assert QWEN_7B.cells(768, 1024) == (27, 37)
    # 1536 / 28 = 54.86 -> 55, 2048 / 28 = 73.14 -> 73: 4015 tokens (4015 * 784 px is below max_pixels)
    assert QWEN_7B.cells(1536, 2048) == (55, 73)
    # 120 / 28 = 4.29 -> 4, 300 / 28 = 10.71 -> 11: 44 tokens
    assert QWEN_7B.cells(120, 300) == (4, 11)
    # 20 x 20 rounds to one cell, 784 px < min_pixels 3136: scaled by sqrt(3136 / 400) = 2.8, ceil(20 * 2.8 / 28) = 2
    assert QWEN_7B.cells(20, 20) == (2, 2)
    with pytest.raises(ValueError, match="aspect ratio"):
        QWEN_7B.cells(1, 1000)


def test_candidates_lose_one_row_or_column_at_a_time_largest_scale_first():
    # A side's rounded cell count drops where s * side / 28 passes a half-integer:
    # columns 37 -> 36 at s = 28 * 36.5 / 1024 = 0.9980, 36 -> 35 at 28 * 35.5 / 1024 = 0.9707,
    # rows 27 -> 26 at 28 * 26.5 / 768 = 0.9661, columns 35 -> 34 at 28 * 34.5 / 1024 = 0.9434,
    # rows 26 -> 25 at 28 * 25.5 / 768 = 0.9297.
    first = [grid for grid, _ in zip(QWEN_7B.candidates(768, 1024), range(6))]
    assert first == [(27, 37), (27, 36), (27, 35), (26, 35), (26, 34), (25, 34)]
    assert [r * c for r, c in first] == [999, 972, 945, 910, 884, 850]


def test_largest_fit_takes_the_largest_scale_within_the_budget():
    # a budget of 875 image tokens (a 1024-token prompt with 149 text tokens): 884 > 875 >= 850
    assert QWEN_7B.largest_fit(768, 1024, 875) == (25, 34)
    assert QWEN_7B.largest_fit(768, 1024, 999) == (27, 37)  # fits unscaled
    assert QWEN_7B.largest_fit(768, 1024, 998) == (27, 36)  # one column less
    # The 2048 x 1536 image reaches 25 x 34 for s in (33.5 / 73.14, 25.5 / 54.86) = (0.4580, 0.4648);
    # just above 0.4648 its rows round to 26: 26 x 34 = 884 > 875
    assert QWEN_7B.largest_fit(1536, 2048, 875) == (25, 34)
    # no candidate has fewer than 4 tokens: min_pixels 3136 is 4 cells of 28 x 28
    assert QWEN_7B.largest_fit(768, 1024, 3) is None
    assert QWEN_7B.fewest(768, 1024) == (2, 2)


def test_shrink_to_fit_resizes_once_to_the_chosen_cells():
    image = Image.new("RGB", (1024, 768), "red")
    assert shrink_to_fit(image, QWEN_7B, 999) is image  # fits: the same image, untouched
    smaller = shrink_to_fit(image, QWEN_7B, 875)
    assert smaller.size == (34 * 28, 25 * 28) == (952, 700)
    assert QWEN_7B.cells(700, 952) == (25, 34)  # the processor keeps it as it is: 850 tokens
    assert shrink_to_fit(image, QWEN_7B, 3) is None


def test_the_grid_is_read_from_the_processor(qwen7b_processor, processor):
    assert ImageGrid.of(qwen7b_processor) == QWEN_7B
    assert ImageGrid.of(qwen7b_processor).resample == Image.Resampling.BICUBIC
    # the 56 x 56 test model: a fixed budget of 3136 pixels
    assert ImageGrid.of(processor) == ImageGrid(14, 2, 3136, 3136)
    with pytest.raises(ValueError, match="data.fit_images_to_prompt: the image processor object has no patch_size"):
        ImageGrid.of(object())
