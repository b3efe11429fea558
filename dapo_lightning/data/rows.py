"""The merged multiple-choice format ("DDM", SPEC section 1) and its row checks.

One row per question: ``image`` (a ``datasets.Image`` value: bytes and/or path),
``problem`` (question, then one ``X: option`` line per option) and ``solution``
(the correct letter). The data module and ``python -m dapo_lightning.data_prep validate`` use the
same checks, so a file that validates is a file that trains.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile

COLUMNS = ("image", "problem", "solution")
LETTERS = "ABCDEFGHIJ"
# An option line: a letter A-J, then a colon (ASCII or full-width ":"), optionally padded with whitespace.
# "A. x" and "A) x" are not option lines. Matched against the whole problem: the letter is group 1.
OPTION_LINE = re.compile(r"^\s*([A-J])\s*[:：]", re.MULTILINE)
# Images with more pixels than this are refused before they are decoded (decompression bombs): Pillow's own default
# limit (PIL.Image.MAX_IMAGE_PIXELS, 1024**3 // 4 // 3 = 89,478,485 pixels, about 9459 x 9459), whatever another
# library has set Pillow's global to; data.max_image_pixels changes it for trusted data.
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3


# The kinds of BadRow: short, stable names that reports count rows by (the reason text varies per row).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_PROBLEM = "empty problem"
BAD_SOLUTION = "solution not a letter"
NO_OPTIONS = "no options"
ANSWER_NOT_AMONG_OPTIONS = "answer not among options"
IMAGE_TOO_LARGE = "image too large"
CONTROL_TOKEN = "special token in text"
UNENCODABLE = "processor cannot encode"
PROMPT_TOO_LONG = "prompt too long"
KINDS = (MISSING_IMAGE, UNREADABLE_IMAGE, EMPTY_PROBLEM, BAD_SOLUTION, NO_OPTIONS, ANSWER_NOT_AMONG_OPTIONS,
         IMAGE_TOO_LARGE, CONTROL_TOKEN, UNENCODABLE, PROMPT_TOO_LONG)


class BadRow(ValueError):
    """A row that cannot be trained on; the message names the file, the row and the reason.

    ``kind`` is one of the constants above (or the reason itself), so a report can count
    bad rows by cause while the message keeps the row's details. ``row`` counts from 0 within
    the file ``source``, as ``python -m dapo_lightning.data_prep validate`` does.
    """

    def __init__(self, source: str, row: int, reason: str, kind: str | None = None):
        self.source, self.row, self.reason = source, row, reason
        self.kind = kind or reason
        super().__init__(f"{source}: row {row}: {reason}")

    def __reduce__(self):
        # rebuilt from its fields when pickled (a DataLoader worker sends a batch's dropped rows to the trainer)
        return type(self), (self.source, self.row, self.reason, self.kind)


def mcq_features():
    """The ``datasets`` schema of a DDM file."""
    from datasets import Features, Image as ImageFeature, Value

    return Features({"image": ImageFeature(), "problem": Value("string"), "solution": Value("string")})


def missing_columns(column_names: list[str]) -> list[str]:
    return [c for c in COLUMNS if c not in column_names]


def option_letters(problem: str) -> list[str]:
    """The letters of the ``X: text`` option lines of a problem, in order."""
    return OPTION_LINE.findall(problem)


def first_option_line(problem: str) -> int | None:
    """Index in ``problem.split("\\n")`` of the first option line (``OPTION_LINE``), or None when there is none.

    The line is the one holding the option's letter, found by the same search over the
    whole problem as :func:`option_letters`, so the two agree: None exactly when
    ``option_letters(problem)`` is empty. The lines before it are the question's stem.
    """
    match = OPTION_LINE.search(problem)
    return None if match is None else problem.count("\n", 0, match.start(1))


def decode_image(
    value: Any, *, source: str = "<data>", row: int = -1, max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """An RGB PIL image from a ``datasets.Image`` value (dict with bytes/path, PIL image, or raw bytes).

    Palette, alpha, CMYK and grayscale images are converted to RGB (alpha composited on
    white; 16-bit grayscale scaled to 8 bits, not clipped). ``max_side`` shrinks the image
    to fit in ``max_side x max_side`` keeping its aspect ratio (``Image.thumbnail``); a JPEG
    is then decoded at 1/2, 1/4 or 1/8 of its size (``Image.draft``), the smallest that still
    holds twice the thumbnail (``thumbnail``'s own reducing gap), so a 12000x9000 photo costs
    a 3000x2250 decode, not 324 MB (other formats have no reduced decoding: they are decoded whole).
    Anything unreadable raises :class:`BadRow`: empty or truncated files (even when some
    library has set Pillow's ``LOAD_TRUNCATED_IMAGES``), images whose header declares more
    than ``max_pixels`` pixels (rejected before a byte of pixel data is decoded, so a
    decompression bomb allocates nothing; the default is Pillow's own limit), and modes
    without an RGB meaning (32-bit float).
    """
    try:
        if value is None:
            raise BadRow(source, row, "image is missing (null)", MISSING_IMAGE)
        if isinstance(value, Image.Image):
            image = value
        else:
            image = _open_within(value, source, row, max_side, max_pixels)
        if image.width == 0 or image.height == 0:
            raise BadRow(source, row, "image has zero size", UNREADABLE_IMAGE)
        image = _to_rgb(image)
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side))
        return image
    except BadRow:
        raise
    except FileNotFoundError as error:
        raise BadRow(source, row, f"image file not found ({error.filename})", MISSING_IMAGE) from error
    except Image.DecompressionBombError as error:  # a format that checks each frame as it decodes it (GIF, ICO)
        raise BadRow(source, row, f"image has more than {max_pixels} pixels ({error})", IMAGE_TOO_LARGE) from error
    except (OSError, ValueError) as error:
        raise BadRow(
            source, row, f"image cannot be decoded ({type(error).__name__}: {error})", UNREADABLE_IMAGE
        ) from error


def _open_within(value: Any, source: str, row: int, max_side: int | None, max_pixels: int) -> Image.Image:
    """The image of ``value`` (bytes, a path, or a dict of either), decoded: at reduced size when ``max_side`` allows.

    The header is read first, with Pillow's own limit off (the check that follows names the
    size and the setting); the decoding runs under ``max_pixels`` and with truncated files refused.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = value, None
    elif isinstance(value, str):
        data, path = None, value
    else:
        raise BadRow(source, row, f"image has unsupported type {type(value).__name__}", UNREADABLE_IMAGE)
    if data is None and not path:
        raise BadRow(source, row, "image is missing (no bytes and no path)", MISSING_IMAGE)
    if data is not None and len(data) == 0:
        raise BadRow(source, row, "image is empty (0 bytes)", UNREADABLE_IMAGE)
    previous = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)  # reads the header only
        if image.width * image.height > max_pixels:
            raise BadRow(source, row, f"image is {image.width}x{image.height} pixels, more than {max_pixels} "
                         "pixels, the limit against decompression bombs (data.max_image_pixels)", IMAGE_TOO_LARGE)
        Image.MAX_IMAGE_PIXELS = max_pixels
        if max_side is not None and max(image.size) > max_side:
            scale = max_side / max(image.size)  # the thumbnail's size, kept at least twice over by the decoder
            image.draft(None, (max(1, round(2 * image.width * scale)), max(1, round(2 * image.height * scale))))
        with warnings.catch_warnings():  # within max_pixels by the check above: Pillow's warning says nothing new
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
        return image
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "F":
        raise ValueError("image mode F (32-bit float) has no defined 8-bit range")
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit samples (PNG's 16-bit grey opens as I;16, or I in older Pillow): keep the top 8 bits.
        # Pillow's own conversion clips at 255 instead, turning most of a 16-bit image white.
        samples = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(samples, 0, 65535) >> 8).astype(np.uint8))  # [H, W] uint8: mode L
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def check_text(
    problem: Any, solution: Any, *, source: str = "<data>", row: int = -1, require_options: bool = False
) -> str:
    """Check a row's text fields; returns the solution letter (upper-cased, stripped).

    ``require_options`` also rejects a problem with no ``X: text`` option lines: the
    converters and ``validate`` use it, since a multiple-choice row without options
    cannot be scored against its letter.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise BadRow(source, row, "problem is empty", EMPTY_PROBLEM)
    letter = solution.strip().upper() if isinstance(solution, str) else None
    # One character exactly: "AB" is a substring of LETTERS but not a letter.
    if letter is None or len(letter) != 1 or letter not in LETTERS:
        raise BadRow(source, row, f"solution {solution!r} is not a letter A-J", BAD_SOLUTION)
    letters = option_letters(problem)
    if require_options and not letters:
        raise BadRow(source, row, "problem has no option lines ('A: ...')", NO_OPTIONS)
    if letters and letter not in letters:
        raise BadRow(
            source, row, f"solution {letter!r} is not among the options {''.join(letters)}", ANSWER_NOT_AMONG_OPTIONS
        )
    return letter
