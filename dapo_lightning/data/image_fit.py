"""Shrinking a row's image just enough for its prompt to fit ``data.max_prompt_length``.

Qwen2.5-VL's image processor resizes every image to whole cells of ``factor = patch_size *
merge_size`` pixels (14 * 2 = 28) with ``smart_resize``: each side rounded to the nearest multiple
of 28, then the whole scaled down (sides floored) when the area is above ``max_pixels``, or up
(sides ceiled) when it is below ``min_pixels``. Each cell becomes one ``<|image_pad|>`` token (its
2 x 2 patches of 14 px are merged into one). A 1024 x 768 image is 37 x 27 cells, 999 tokens: with
a system prompt it overflows a 1024-token prompt. The original system cut such prompts from the
left (the system prompt first, then image tokens, which leaves the model an image its grid no
longer matches); this project shrinks the image instead, by as little as the row's text allows.

The candidates: an image down-scaled by s in (0, 1], then resized by the processor. The processor's
grid changes only at the scales where a side's ``s * side / 28`` crosses a half-integer (where its
``round`` flips), so there are finitely many, listed without running the processor
(:meth:`ImageGrid.candidates`, largest scale first). :meth:`ImageGrid.largest_fit` takes the first
whose tokens fit the row's budget, :func:`shrink_to_fit` resizes the image once, straight to that
grid's pixels (what the processor would have made of the down-scaled image, in one resampling
instead of two), so the processor keeps it as it is and the prompt has exactly the counted tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ImageGrid:
    """How a Qwen2-VL-style image processor turns an image into tokens (its ``smart_resize`` rules)."""

    patch_size: int  # pixels per side of a vision patch (14)
    merge_size: int  # patches per side merged into one token (2)
    min_pixels: int  # smart_resize scales smaller images up to at least this area (Qwen2.5-VL-7B: 3136)
    max_pixels: int  # ... and larger ones down to at most this area (Qwen2.5-VL-7B: 12845056)
    resample: int = Image.Resampling.BICUBIC  # the processor's PIL filter

    @classmethod
    def of(cls, processor) -> ImageGrid:
        """The rules of ``processor``'s image processor; a ``ValueError`` naming the config key when it has none."""
        image_processor = getattr(processor, "image_processor", processor)
        size = getattr(image_processor, "size", None)

        def setting(size_key: str, attribute: str):
            # transformers >= 5 keeps the pixel range in size["shortest_edge"/"longest_edge"]; 4.x in min/max_pixels
            value = size.get(size_key) if isinstance(size, dict) else getattr(size, size_key, None)
            return value if value is not None else getattr(image_processor, attribute, None)

        values = {
            "patch_size": getattr(image_processor, "patch_size", None),
            "merge_size": getattr(image_processor, "merge_size", None),
            "min_pixels": setting("shortest_edge", "min_pixels"),
            "max_pixels": setting("longest_edge", "max_pixels"),
        }
        missing = [name for name, value in values.items() if value is None]
        if missing or not getattr(image_processor, "do_resize", True):
            reason = f"has no {', '.join(missing)}" if missing else "does not resize images (do_resize=False)"
            raise ValueError(
                f"data.fit_images_to_prompt: the image processor {type(image_processor).__name__} {reason}, so the "
                "image tokens of a resized image cannot be computed; set data.fit_images_to_prompt: false"
            )
        resample = getattr(image_processor, "resample", None)  # a PIL filter (an int), else Qwen's default, bicubic
        return cls(**{k: int(v) for k, v in values.items()},
                   resample=int(resample) if isinstance(resample, int) else Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        """Pixels per side of one token's cell (patch_size * merge_size = 28)."""
        return self.patch_size * self.merge_size

    def cells(self, height: float, width: float) -> tuple[int, int]:
        """(rows, columns) of cells the processor makes of a ``height`` x ``width`` image: rows * columns tokens.

        Raises ``ValueError`` for an aspect ratio above 200, as the processor does.
        """
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return h // self.factor, w // self.factor

    def candidates(self, height: int, width: int) -> Iterator[tuple[int, int]]:
        """The distinct grids of the image down-scaled by s in (0, 1], largest s first (the first: s = 1, unscaled).

        Between two consecutive scales where some ``s * side / factor`` is a half-integer the
        rounded sides do not change, and neither does the processor's grid (in its max/min_pixels
        branches the grid does not depend on s at all): one grid per interval, read at its middle,
        so that no grid depends on how ``round`` breaks a tie.
        """
        f = self.factor
        steps = sorted({f * (k + 0.5) / side for side in (height, width) for k in range(side // f + 1)
                        if f * (k + 0.5) < side}, reverse=True)
        edges = [1.0, *steps, 0.0]
        previous = self.cells(height, width)
        yield previous
        for upper, lower in zip(edges, edges[1:]):
            s = (upper + lower) / 2
            grid = self.cells(s * height, s * width)
            if grid != previous:
                yield grid
                previous = grid

    def largest_fit(self, height: int, width: int, budget: int) -> tuple[int, int] | None:
        """The grid of the largest down-scale with at most ``budget`` tokens; None when even the smallest has more."""
        return next((grid for grid in self.candidates(height, width) if grid[0] * grid[1] <= budget), None)

    def fewest(self, height: int, width: int) -> tuple[int, int]:
        """The candidate grid with the fewest tokens (near the processor's ``min_pixels`` floor), for error messages.

        Not always the last: at the smallest scales ``min_pixels`` rounds the sides up (a 1024 x 768
        image's grids end 2 x 3, 2 x 2, 2 x 3).
        """
        return min(self.candidates(height, width), key=lambda grid: grid[0] * grid[1])


def shrink_to_fit(image: Image.Image, grid: ImageGrid, budget: int) -> Image.Image | None:
    """``image`` itself when its tokens fit ``budget``; else a copy resized to the largest grid that fits; else None.

    The copy is exactly ``columns * factor`` x ``rows * factor`` pixels, within the processor's
    pixel range, so the processor's ``smart_resize`` leaves it as it is. Its sides are never larger
    than the processor would make the unscaled image's; its aspect ratio differs from the
    original's only by the processor's own rounding to whole cells.
    """
    rows, columns = grid.cells(image.height, image.width)
    if rows * columns <= budget:
        return image
    fit = grid.largest_fit(image.height, image.width, budget)
    if fit is None:
        return None
    rows, columns = fit
    return image.resize((columns * grid.factor, rows * grid.factor), resample=grid.resample)


__all__ = ["ImageGrid", "shrink_to_fit"]
