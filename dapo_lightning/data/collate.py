"""``PromptCollator``: dataset rows -> one ``PromptBatch`` of encoded ChatML prompts (SPEC section 1).

Each row goes through three steps: prepare (``rows.check_text``, no tokenizer special
tokens in the problem, ``rows.decode_image``, the chat template, and with
``data.fit_images_to_prompt`` the image shrunk as little as needed for the prompt to fit
``data.max_prompt_length``: ``data/image_fit.py``), encode (the processor, on the whole batch
at once) and the length check (``data.max_prompt_length``). A row that fails a step is an
error (``data.on_bad_row=error``) or is dropped; in training the next usable row of the
dataset takes its place, so every process keeps full batches and DDP's processes stay in
step. :class:`_Refill` holds that drop-and-refill bookkeeping for one batch; the rows left
after a drop are encoded again with their replacements.

A row arrives with ``"_index"``, its position in the dataset (what the refill looks rows up
by), and ``"_source_row"``, its parquet file and row (``data/locations.py``): every ``BadRow``
names the latter, numbered as ``data_prep validate`` numbers rows, and so does the batch
(``PromptBatch.source_rows``). The rows dropped are listed in the batch (``PromptBatch.skipped``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import Dataset

from dapo_lightning.batch import PromptBatch, SourceRow
from dapo_lightning.data import rows as mcq
from dapo_lightning.data.image_fit import ImageGrid, shrink_to_fit
from dapo_lightning.prompts import SYSTEM_PROMPT, build_messages, special_token_strings, special_tokens_in


class _Prepared(NamedTuple):
    """One row ready for the processor."""

    text: str  # the rendered chat template
    image: Image.Image  # RGB, fits max_image_side (and, when fitted, the prompt's token budget)
    row: dict[str, Any]  # the dataset row ("_index", "_source_row" included), its solution upper-cased and stripped
    resized: bool = False  # the image was shrunk for the prompt to fit max_prompt_length


class _Refill:
    """The drop-and-refill bookkeeping of one batch.

    ``pending``: rows still to prepare, first in first out; a replacement joins at the end.
    ``taken``: dataset indices this batch already holds (kept, dropped or pending), never
    chosen as replacements. ``known_bad``: the collator's unusable indices, shared by all its
    batches, so a row found bad once is not tried again as a replacement. ``skipped``: why
    each row this batch dropped was unusable, in order. Without ``refill_from`` (validation)
    a dropped row is not replaced, so each held-out row is scored at most once.
    """

    def __init__(self, rows: list[dict[str, Any]], *, on_bad_row: str, refill_from: Dataset | None,
                 known_bad: set[int]):
        self.pending: deque[dict[str, Any]] = deque(rows)
        self.taken = {row["_index"] for row in rows}
        self.skipped: list[mcq.BadRow] = []
        self.on_bad_row = on_bad_row
        self.refill_from = refill_from
        self.known_bad = known_bad

    def drop(self, index: int, error: mcq.BadRow) -> None:
        """``on_bad_row=error``: raise ``error``. ``skip``: count row ``index``, mark it bad, queue its replacement."""
        if self.on_bad_row == "error":
            raise error
        self.skipped.append(error)
        self.known_bad.add(index)
        replacement = self._replacement(after=index)
        if replacement is not None:
            self.taken.add(replacement["_index"])
            self.pending.append(replacement)

    def drop_rows(self, prepared: list[_Prepared], errors: dict[int, mcq.BadRow]) -> list[_Prepared]:
        """Drop the rows at the positions of ``errors`` (in position order); returns the others, in order."""
        for position, error in errors.items():
            self.drop(prepared[position].row["_index"], error)
        return [item for position, item in enumerate(prepared) if position not in errors]

    def _replacement(self, after: int) -> dict[str, Any] | None:
        """The first row after ``after`` (cyclically) neither in this batch nor known bad, or None."""
        if self.refill_from is None:
            return None
        n = len(self.refill_from)
        for step in range(1, n + 1):
            index = (after + step) % n
            if index not in self.taken and index not in self.known_bad:
                return self.refill_from[index]
        return None


class PromptCollator:
    """Turns dataset rows into a ``PromptBatch`` with the processor.

    A row is unusable when its text fails ``mcq.check_text``, its problem holds one of the
    tokenizer's special tokens (``prompts.special_tokens_in``), its image cannot be decoded
    (``mcq.decode_image``), the processor cannot encode it (tried alone when a batch fails,
    e.g. an image with an aspect ratio above 200), or its prompt is too long: with
    ``fit_images_to_prompt`` (the default), too long even with its image shrunk to the fewest
    tokens the processor allows; a row whose image had to shrink is counted in the batch's
    ``num_resized``.
    With ``on_bad_row="error"`` an unusable row raises ``BadRow`` naming the file and row.
    With ``"skip"`` it is dropped and counted; when ``refill_from`` is given (training),
    the next usable row of that dataset takes its place, so every process keeps full
    batches (and DDP's processes stay in step); validation drops without refilling, so
    each held-out row is scored at most once.
    """

    def __init__(
        self,
        processor,
        *,
        source: str,
        system_prompt: str | None,
        max_image_side: int | None,
        max_prompt_length: int | None,
        on_bad_row: str,
        refill_from: Dataset | None = None,
        fit_images_to_prompt: bool = True,
        max_image_pixels: int = mcq.DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.processor = processor
        self.source = source
        self.system_prompt = system_prompt
        self.max_image_side = max_image_side
        self.max_prompt_length = max_prompt_length
        self.on_bad_row = on_bad_row
        self.refill_from = refill_from
        self.fit_images_to_prompt = fit_images_to_prompt
        self.max_image_pixels = max_image_pixels
        self._bad: set[int] = set()  # rows known to be unusable (not retried as replacements)
        self._special = special_token_strings(getattr(processor, "tokenizer", None))
        self._grid: ImageGrid | None = None  # the processor's image rules (image_fit.py)
        if fit_images_to_prompt and max_prompt_length is not None:
            self._grid = ImageGrid.of(processor)  # a processor without them is a configuration error: said at once

    def __call__(self, rows: list[dict[str, Any]]) -> PromptBatch:
        refill = _Refill(rows, on_bad_row=self.on_bad_row, refill_from=self.refill_from, known_bad=self._bad)
        kept: list[_Prepared] = []
        encoded = None
        # Each round without an encoding dropped at least one row, and a replacement is never a row the batch
        # already took: the rounds end, at the latest when the dataset runs out of rows.
        while encoded is None:
            kept = kept + self._prepare_pending(refill)
            if not kept:
                if self.refill_from is not None:
                    first = self.where(rows[0])
                    raise mcq.BadRow(first.file, first.row, "no usable row is left to fill a batch")
                return PromptBatch.empty().with_skipped(refill.skipped)
            kept, encoded = self._encode(kept, refill)
        return self._batch(kept, encoded).with_skipped(refill.skipped)

    def _prepare_pending(self, refill: _Refill) -> list[_Prepared]:
        """Prepare ``refill``'s queued rows in order, dropping each unusable one (its replacement joins the queue)."""
        prepared = []
        while refill.pending:
            row = refill.pending.popleft()
            try:
                prepared.append(self._prepare(row))
            except mcq.BadRow as error:
                refill.drop(row["_index"], error)
        return prepared

    def where(self, row: dict[str, Any]) -> SourceRow:
        """The parquet file and row of a dataset row (rows made without one: this collator's source, their position)."""
        return row.get("_source_row") or SourceRow(self.source, row["_index"])

    def _prepare(self, row: dict[str, Any]) -> _Prepared:
        where = self.where(row)
        solution = mcq.check_text(row.get("problem"), row.get("solution"), source=where.file, row=where.row,
                                  require_options=True)
        found = special_tokens_in(row["problem"], self._special)
        if found:
            raise mcq.BadRow(where.file, where.row, f"problem contains the special token(s) "
                             f"{', '.join(map(repr, found))}, which the tokenizer would read as control tokens, not "
                             "text", mcq.CONTROL_TOKEN)
        image = mcq.decode_image(row.get("image"), source=where.file, row=where.row, max_side=self.max_image_side,
                                 max_pixels=self.max_image_pixels)
        text = self.processor.apply_chat_template(
            build_messages(row["problem"], self.system_prompt), tokenize=False, add_generation_prompt=True
        )
        fitted = image
        if self.fit_images_to_prompt and self.max_prompt_length is not None:
            fitted = self._fit(image, text, where)
        return _Prepared(text, fitted, {**row, "solution": solution, "_source_row": where}, resized=fitted is not image)

    def _fit(self, image: Image.Image, text: str, where: SourceRow) -> Image.Image:
        """``image``, shrunk as little as needed for the prompt ``text`` to fit ``max_prompt_length`` (``image_fit``).

        The budget is ``max_prompt_length`` minus the prompt's text tokens, counted by the
        tokenizer the processor uses, its image placeholder excluded (the processor replaces it
        with one token per cell). A prompt too long even with the fewest image tokens is a ``BadRow``.
        """
        if self._grid is None:
            self._grid = ImageGrid.of(self.processor)
        ids = self.processor.tokenizer(text)["input_ids"]
        placeholder = getattr(self.processor, "image_token_id", None)
        text_tokens = len(ids) - ids.count(placeholder)
        limit = self.max_prompt_length
        try:
            fitted = shrink_to_fit(image, self._grid, limit - text_tokens)
        except ValueError as error:  # smart_resize's aspect-ratio limit: the processor would refuse the image too
            raise mcq.BadRow(where.file, where.row, f"the processor cannot encode it ({type(error).__name__}: "
                             f"{error})", mcq.UNENCODABLE) from error
        if fitted is None:
            rows, columns = self._grid.fewest(image.height, image.width)
            raise mcq.BadRow(
                where.file, where.row,
                f"prompt has {text_tokens} text tokens and at least {rows * columns} image tokens (the "
                f"{image.width}x{image.height} image shrunk to {columns}x{rows} cells of {self._grid.factor} px), "
                f"{text_tokens + rows * columns} in all, more than data.max_prompt_length={limit}",
                mcq.PROMPT_TOO_LONG,
            )
        return fitted

    def _encode(self, prepared: list[_Prepared], refill: _Refill) -> tuple[list[_Prepared], Any]:
        """Encode ``prepared`` as one batch.

        Returns ``(prepared, encoding)`` when the processor takes every row and each prompt
        fits ``max_prompt_length``; otherwise drops the rows it rejects (or the too-long ones)
        through ``refill`` and returns ``(the rows left, None)``, to be encoded again.
        """
        try:
            encoded = self.processor(text=[item.text for item in prepared], images=[item.image for item in prepared],
                                     padding=True, return_tensors="pt")
        except Exception:
            # e.g. an image of aspect ratio > 200: find the rows the processor rejects, one by one
            rejected = self._unencodable(prepared)
            if not rejected:
                raise
            return refill.drop_rows(prepared, rejected), None
        too_long = self._too_long(prepared, encoded)
        if too_long:
            return refill.drop_rows(prepared, too_long), None
        return prepared, encoded

    def _unencodable(self, prepared: list[_Prepared]) -> dict[int, mcq.BadRow]:
        """{position: error} of the rows the processor fails on alone."""
        rejected = {}
        for position, item in enumerate(prepared):
            try:
                self.processor(text=[item.text], images=[item.image], padding=True, return_tensors="pt")
            except Exception as error:
                reason = f"the processor cannot encode it ({type(error).__name__}: {error})"
                where = item.row["_source_row"]
                rejected[position] = mcq.BadRow(where.file, where.row, reason, mcq.UNENCODABLE)
        return rejected

    def _too_long(self, prepared: list[_Prepared], encoded) -> dict[int, mcq.BadRow]:
        """{position: error} of the prompts longer than ``max_prompt_length`` tokens."""
        lengths = encoded["attention_mask"].sum(-1).tolist()  # [B] prompt tokens, padding excluded
        limit = self.max_prompt_length
        return {
            position: mcq.BadRow(*item.row["_source_row"],
                                 f"prompt has {n} tokens, more than data.max_prompt_length={limit}",
                                 mcq.PROMPT_TOO_LONG)
            for position, (item, n) in enumerate(zip(prepared, lengths))
            if limit is not None and n > limit
        }

    def _batch(self, kept: list[_Prepared], encoded) -> PromptBatch:
        rows = [item.row for item in kept]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("image", "_index", "_source_row")}
        return PromptBatch(
            input_ids=encoded["input_ids"],  # [B, P] left-padded
            attention_mask=encoded["attention_mask"],  # [B, P]
            pixel_values=encoded["pixel_values"],  # [patches of the B images, D]
            image_grid_thw=encoded["image_grid_thw"],  # [B, 3] one image per prompt
            image_counts=[1] * len(kept),
            mm_token_type_ids=encoded.get("mm_token_type_ids"),  # [B, P] or None
            prompts=[item.text for item in kept],
            columns=columns,
            index=[r["_index"] for r in rows],
            source_rows=[r["_source_row"] for r in rows],
            images=[item.image for item in kept],
            num_resized=sum(item.resized for item in kept),
        )


def example_prompt_batch(processor, rows: list[dict[str, Any]], system_prompt: str | None = SYSTEM_PROMPT) -> PromptBatch:
    """Encode in-memory DDM rows (``image`` PIL or bytes dict) into a ``PromptBatch`` (for probes and tests)."""
    collate = PromptCollator(
        processor, source="<memory>", system_prompt=system_prompt, max_image_side=None, max_prompt_length=None,
        on_bad_row="error",
    )
    return collate([{**row, "_index": i} for i, row in enumerate(rows)])


__all__ = ["PromptCollator", "example_prompt_batch"]
