"""Row format helpers: images decoded to RGB within max_image_side; where a problem's options start."""

import io

import pytest
from PIL import Image

from dapo_lightning.data.rows import OPTION_LINE, decode_image, first_option_line, option_letters


def test_images_are_rgb_and_fit_max_image_side():
    grey = io.BytesIO()
    Image.new("L", (2000, 500), 128).save(grey, format="PNG")
    image = decode_image({"bytes": grey.getvalue(), "path": None}, max_side=1024)
    assert image.mode == "RGB" and image.size == (1024, 256)


@pytest.mark.parametrize(
    ("problem", "line"),
    [
        ("What colour is the square?\nIs it red or blue?", None),  # a stem and no option line
        ("Look at the chart.\nWhich bar is tallest?\nA: left\nB: right", 2),  # two stem lines, options from index 2
        ("What colour?\nA. red\nB: blue", 2),  # "A. red" is not an option line ("." is no colon); "B: blue" is
        ("What colour?\nA. red\nB) blue", None),  # neither "." nor ")" makes an option line
        ("这是什么颜色？\nA：红\nB：蓝", 1),  # the full-width colon counts
        ("What colour?\n  C : red", 1),  # whitespace around the letter is allowed
        ("What colour?\n\nA: red", 2),  # the line holding the letter, not the blank line before it
        ("A: the options start at once", 0),
    ],
)
def test_first_option_line(problem, line):
    assert first_option_line(problem) == line
    # the same grammar as option_letters: no option line exactly when there are no option letters
    assert (line is None) == (option_letters(problem) == [])
    if line is not None:
        assert OPTION_LINE.match(problem.split("\n")[line])
