"""``ModalityProbe``: how much the answers depend on the image and on the question (validation only).

The Debias-DAPO paper evaluates a model on the same questions with one modality
removed or blanked. For every validation batch this callback rolls the batch's
questions out again, once per variant, with the module's validation sampling:

- ``image_text``: the question and its image, as validated (taken from the module's own
  validation rollout, so it equals ``val/accuracy``);
- ``image_only``: the image, with the question's text replaced by ``neutral_prompt``
  (the option lines ``A: ...`` are kept, so an answer is still a letter);
- ``text_black`` / ``text_white`` / ``text_noise``: the question with a black, white or
  uniform-noise image of the original's size.

It logs ``val/probe/<variant>/accuracy`` and ``val/probe/visual_reliance``, the accuracy
with the image minus the accuracy with a black image: near 0, the answers do not depend
on the picture. Counts are summed over batches and processes, so the numbers are
exact over the held-out set. The probe rollouts are requested as ``probe:<variant>``
(``rollout.is_extra``), so log writers and metrics of the module's own validation skip them.
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from dapo_lightning import distributed
from dapo_lightning.data import rows as mcq
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.metrics import row_accuracy

VARIANTS = ("image_text", "image_only", "text_black", "text_white", "text_noise")
NEUTRAL_PROMPT = "Look at the image and choose the correct option."


def neutral_problem(problem: str, neutral_prompt: str = NEUTRAL_PROMPT) -> str:
    """The problem with every line before the first option line (``rows.OPTION_LINE``) replaced by ``neutral_prompt``."""
    lines = problem.split("\n")
    first_option = mcq.first_option_line(problem)
    return "\n".join([neutral_prompt, *lines[len(lines) if first_option is None else first_option :]])


def blank_image(size: tuple[int, int], kind: str, seed: int = 0) -> Image.Image:
    """A black, white or uniform-noise RGB image of ``size`` (width, height)."""
    if kind == "black":
        return Image.new("RGB", size, (0, 0, 0))
    if kind == "white":
        return Image.new("RGB", size, (255, 255, 255))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")
    raise ValueError(f"blank_image: unknown kind {kind!r}")


class ModalityProbe(RolloutCallback):

    def __init__(self, variants: list[str] = list(VARIANTS), neutral_prompt: str = NEUTRAL_PROMPT, noise_seed: int = 0):
        """
        Args:
            variants: Which of image_text, image_only, text_black, text_white, text_noise to evaluate.
            neutral_prompt: Replaces the question's text in the ``image_only`` variant (options are kept).
            noise_seed: Seed of the noise images (image i of the held-out set uses noise_seed + i).
        """
        super().__init__()
        variants = list(variants)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise ValueError(f"ModalityProbe.variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        if len(set(variants)) != len(variants):
            raise ValueError(f"ModalityProbe.variants: listed twice: {variants}")
        self.variants = variants
        self.neutral_prompt = neutral_prompt
        self.noise_seed = noise_seed
        self._sums = torch.zeros(len(variants), 2, dtype=torch.float64)  # [variants, (correct, rows)]
        self._image_text: tuple[float, float] | None = None
        self.last: dict[str, float] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._sums.zero_()

    def on_rollout_scored(self, trainer, pl_module, rollout) -> None:
        if rollout.stage == "val" and not rollout.is_extra:  # the module's own validation rollout
            accuracy = row_accuracy(rollout)
            self._image_text = (float(accuracy.sum()), float(accuracy.numel()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if len(batch) == 0:  # every row of the batch was unusable and skipped: nothing was validated
            return
        loader = trainer.val_dataloaders
        dataset, collate = loader.dataset, loader.collate_fn
        rows = [dataset[i] for i in batch.index]
        for k, variant in enumerate(self.variants):
            if variant == "image_text":
                if self._image_text is not None:
                    self._sums[k] += torch.tensor(self._image_text, dtype=torch.float64)
                continue
            probe_rows = [self._variant_row(row, variant, collate) for row in rows]
            prompts = trainer.strategy.batch_to_device(trainer.precision_plugin.convert_input(collate(probe_rows)))
            rollout = pl_module.make_rollout(prompts, "val", requested_by=f"probe:{variant}")
            accuracy = row_accuracy(rollout)
            self._sums[k] += torch.tensor([float(accuracy.sum()), float(accuracy.numel())], dtype=torch.float64)
        self._image_text = None

    def _variant_row(self, row: dict, variant: str, collate) -> dict:
        if variant == "image_only":
            return {**row, "problem": neutral_problem(row["problem"], self.neutral_prompt)}
        where = collate.where(row)  # the parquet file and row, for the message of an unusable image
        image = mcq.decode_image(row.get("image"), source=where.file, row=where.row,
                                 max_side=getattr(collate, "max_image_side", None),
                                 max_pixels=getattr(collate, "max_image_pixels", None))
        kind = variant.removeprefix("text_")
        return {**row, "image": blank_image(image.size, kind, seed=self.noise_seed + int(row["_index"]))}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        sums = distributed.global_sum(self._sums.to(trainer.strategy.root_device)).cpu()
        values = {}
        for k, variant in enumerate(self.variants):
            correct, count = sums[k].tolist()
            if count > 0:
                values[f"val/probe/{variant}/accuracy"] = correct / count
        if "val/probe/image_text/accuracy" in values and "val/probe/text_black/accuracy" in values:
            values["val/probe/visual_reliance"] = (
                values["val/probe/image_text/accuracy"] - values["val/probe/text_black/accuracy"]
            )
        self.last = values
        summary = ", ".join(f"{k.removeprefix('val/probe/')} {v:.3f}" for k, v in values.items())
        rank_zero_info(f"[probe] step {trainer.global_step}: {summary}")
        if not trainer.sanity_checking and values:
            pl_module.log_dict(values, sync_dist=False, rank_zero_only=False)
