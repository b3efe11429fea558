"""Images: truncated, empty, zero-size, decompression bombs, and every colour mode: converted to RGB correctly or
rejected with a BadRow naming the file and the row, in ``mcq.decode_image`` and through the data collator."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from dapo_lightning.data import rows as mcq
from dapo_lightning.data import PromptCollator


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG of zeros: a few kB on disk, side**2 bytes once decoded by Pillow."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


RED = (255, 0, 0)
RGB = encoded(Image.new("RGB", (40, 30), (10, 200, 30)))
JPEG = encoded(Image.new("RGB", (40, 30), (10, 200, 30)), "JPEG")
palette = Image.new("P", (8, 8), 0)
palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
palette.putpixel((1, 1), 1)

REJECTED = {
    "truncated PNG": (RGB[: len(RGB) // 2], "image cannot be decoded (OSError: image file is truncated"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "image cannot be decoded (OSError"),
    "zero bytes": (b"", "image is empty (0 bytes)"),
    "not an image": (b"GIF89a but not really", "image cannot be decoded (UnidentifiedImageError"),
    "20000x20000 bomb": (bomb_png(20000), "image is 20000x20000 pixels, more than 89478485 pixels, "
                         "the limit against decompression bombs (data.max_image_pixels)"),
    "9500x9500 (just above Pillow's default limit)": (bomb_png(9500), "image is 9500x9500 pixels, more than 89478485"),
    "float32 TIFF": (encoded(Image.new("F", (4, 4), 0.5), "TIFF"), "image cannot be decoded (ValueError: image mode F"),
}
CONVERTED = {  # (bytes or image, expected RGB at (0, 0), at (1, 1))
    "CMYK JPEG": (encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), RED, RED),
    "palette with transparency": (encoded(palette, transparency=0), (255, 255, 255), (0, 0, 255)),
    "LA (grey + alpha)": (encoded(Image.new("LA", (4, 4), (100, 0))), (255, 255, 255), (255, 255, 255)),
    "RGBA half transparent": (encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), (127, 127, 127), (127, 127, 127)),
    "I;16 (16-bit grey 40000)": (encoded(Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))), (156,) * 3,
                                 (156,) * 3),
    "1-bit": (encoded(Image.new("1", (4, 4), 1)), (255, 255, 255), (255, 255, 255)),
    "L (grey 77)": (encoded(Image.new("L", (4, 4), 77)), (77, 77, 77), (77, 77, 77)),
}


@pytest.mark.parametrize("case", list(REJECTED))
@pytest.mark.reliability("Untrusted input", "Image: {case}", "rejected with a BadRow naming the file and row")
def test_a_bad_image_is_rejected_with_its_row(case):
    data, reason = REJECTED[case]
    with pytest.raises(mcq.BadRow) as error:
        mcq.decode_image({"bytes": data, "path": None}, source="train.parquet", row=7)
    assert str(error.value).startswith(f"train.parquet: row 7: {reason}"), str(error.value)


def test_a_bomb_is_rejected_before_decoding(tmp_path):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(mcq.BadRow, match="decompression bomb"):
        mcq.decode_image({"bytes": bomb_png(20000)}, source="x", row=0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: the 400 MB were never allocated


def test_zero_size_image():
    with pytest.raises(mcq.BadRow, match="row 3: image has zero size"):
        mcq.decode_image(Image.new("RGB", (0, 5)), source="x", row=3)


@pytest.mark.parametrize("case", list(CONVERTED))
@pytest.mark.reliability("Untrusted input", "Image: {case}",
                         "converted to RGB with the right colours (alpha composited on white, 16 bits scaled)")
def test_an_unusual_mode_is_converted_correctly(case):
    data, first, second = CONVERTED[case]
    image = mcq.decode_image({"bytes": data}, source="x", row=0)
    assert image.mode == "RGB"
    for (x, y), expected in (((0, 0), first), ((1, 1), second)):
        assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((x, y)), expected)), (case, image.getpixel((x, y)))


@pytest.mark.reliability("Untrusted input", "Collator batch with an image the processor cannot encode (aspect ratio "
                         "1:1000) and a truncated image",
                         "on_bad_row: error names the row; skip drops both and refills the batch from the next rows")
def test_the_collator_names_or_skips_images_the_processor_rejects(processor, synthetic_rows):
    from dapo_lightning.data import VisualMCQDataset

    rows = [dict(r) for r in synthetic_rows[:6]]
    rows[1]["image"] = {"bytes": encoded(Image.new("RGB", (1, 1000))), "path": None}
    rows[2]["image"] = {"bytes": RGB[: len(RGB) // 2], "path": None}
    dataset = VisualMCQDataset(rows, "train.parquet")
    batch_rows = [dataset[i] for i in range(3)]
    strict = PromptCollator(processor, source="train.parquet", system_prompt=None, max_image_side=None,
                            max_prompt_length=None, on_bad_row="error")
    with pytest.raises(mcq.BadRow, match=r"train.parquet: row 2: image cannot be decoded"):
        strict(batch_rows)
    with pytest.raises(mcq.BadRow, match=r"train.parquet: row 1: the processor cannot encode it \(ValueError: "
                                         r"absolute aspect ratio must be smaller than 200"):
        strict([dataset[0], dataset[1]])
    lenient = PromptCollator(processor, source="train.parquet", system_prompt=None, max_image_side=None,
                             max_prompt_length=None, on_bad_row="skip", refill_from=dataset)
    batch = lenient(batch_rows)
    assert batch.index == [0, 3, 4] and batch.num_skipped == 2


def test_the_default_pixel_limit_is_pillows(tmp_path):
    """Pillow's own default (``PIL.Image.MAX_IMAGE_PIXELS`` in a fresh interpreter), unless data.max_image_pixels says
    otherwise; decoding leaves Pillow's global setting as it found it."""
    import inspect
    import subprocess
    import sys

    from dapo_lightning.data import VisualMCQDataModule

    fresh = subprocess.run([sys.executable, "-c", "from PIL import Image; print(Image.MAX_IMAGE_PIXELS)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert mcq.DEFAULT_MAX_IMAGE_PIXELS == int(fresh) == 89_478_485  # 1024**3 // 4 // 3: a 9459 x 9459 image
    assert inspect.signature(mcq.decode_image).parameters["max_pixels"].default == mcq.DEFAULT_MAX_IMAGE_PIXELS
    assert inspect.signature(VisualMCQDataModule).parameters["max_image_pixels"].default == 89_478_485
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(mcq.BadRow, match=r"row 0: image is 40x30 pixels, more than 1000 pixels, the limit"):
        mcq.decode_image({"bytes": RGB}, source="x", row=0, max_pixels=1000)
    assert mcq.decode_image({"bytes": RGB}, source="x", row=0, max_pixels=1200).size == (40, 30)  # 40 * 30 = 1200
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.reliability("Untrusted input", "A 4000x3000 JPEG shrunk to fit 256x256 (data.max_image_side)",
                         "decoded at a quarter of its size (1000x750, JPEG draft), never at full size")
def test_a_large_jpeg_is_decoded_at_reduced_size(monkeypatch):
    data = encoded(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG")
    decoded = []
    load = ImageFile.ImageFile.load

    def recording_load(image):
        decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    image = mcq.decode_image({"bytes": data}, source="x", row=0, max_side=256)
    # The thumbnail is 256x192. JPEG decodes at 1/s, s in 8, 4, 2, 1: the largest s that keeps twice the thumbnail
    # (Image.thumbnail's reducing gap, 512x384): 4000 // 512 = 7, 3000 // 384 = 7, so s = 4 -> 1000x750 pixels,
    # 1/16 of the 12 M pixels (3 MB instead of 36 MB of RGB).
    assert decoded[0] == (1000, 750)
    assert image.size == (256, 192) and image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((100, 100)), (10, 200, 30)))
    decoded.clear()
    png = encoded(Image.new("RGB", (1200, 900), (10, 200, 30)))  # PNG has no reduced decoding: full size, then shrunk
    assert mcq.decode_image({"bytes": png}, source="x", row=0, max_side=256).size == (256, 192)
    assert decoded[0] == (1200, 900)
    decoded.clear()
    small = encoded(Image.new("RGB", (300, 200), (10, 200, 30)), "JPEG")  # already fits: decoded as it is
    assert mcq.decode_image({"bytes": small}, source="x", row=0, max_side=512).size == (300, 200)
    assert decoded[0] == (300, 200)
