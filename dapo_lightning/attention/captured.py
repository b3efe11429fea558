"""What the recorders leave behind: per layer and generation row, the attention mass on text and vision keys.

Shapes: N rows (completions), R generation rows per completion (R = T - 1 for T completion
tokens), L decoder layers. A :class:`CapturedAttention` is an annotation
(``dapo_lightning.annotations``): it travels with its groups when the replay buffer or dynamic
sampling move them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CapturedAttention:
    """What the capture keeps: per layer and generation row, renormalised mass on T and V keys.

    ``text[l, i, r]`` is Σ over text keys of row r of completion i at layer l after
    head-averaging, zeroing the sink and renormalising over the prompt keys (``variant``
    "original"), or the head average of per-head shares within T ∪ V ("paper").
    Rows that do not exist (r >= C_i - 1) hold 0. A row that was not captured (a blank
    row) has ``captured`` False, zeros and no text or vision keys.
    """

    text: Tensor  # [L, N, R] float32
    vision: Tensor  # [L, N, R] float32
    rows: Tensor  # [N, R] bool: generation row r exists for completion i
    num_text: Tensor  # [N] |T|
    num_vision: Tensor  # [N] |V|
    captured: Tensor  # [L, N] bool: layer l was captured for completion i
    variant: str = "original"

    @property
    def num_layers(self) -> int:
        return self.text.shape[0]

    @property
    def num_rows(self) -> int:
        return self.text.shape[1]

    @property
    def num_generation_rows(self) -> Tensor:
        return self.rows.sum(-1)  # [N]

    def layer_masses(self) -> tuple[Tensor, Tensor]:
        """A_T and A_V of SPEC 3 per layer: sums over generation rows. -> [L, N], [L, N] (float64)"""
        return self.text.double().sum(-1), self.vision.double().sum(-1)

    def token_masses(self) -> tuple[Tensor, Tensor]:
        """a_T[r] and a_V[r] of SPEC 4: per generation row, averaged over the captured layers. -> [N, R], [N, R]"""
        layers = self.captured.any(-1)  # [L]
        if not layers.any():
            zeros = torch.zeros_like(self.text[0])
            return zeros, zeros
        return self.text[layers].mean(0), self.vision[layers].mean(0)  # [N, R]

    # --- annotations.Annotation -------------------------------------------------------------------------

    def select(self, rows: Tensor) -> CapturedAttention:
        """Completions ``rows`` [n] (the N axis), in order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.text.device)
        return CapturedAttention(
            text=self.text.index_select(1, rows),  # [L, n, R]
            vision=self.vision.index_select(1, rows),
            rows=self.rows.index_select(0, rows),  # [n, R]
            num_text=self.num_text.index_select(0, rows),  # [n]
            num_vision=self.num_vision.index_select(0, rows),
            captured=self.captured.index_select(1, rows),  # [L, n]
            variant=self.variant,
        )

    def blank(self, num_rows: int) -> CapturedAttention:
        """``num_rows`` completions that were not captured: no layer, zeros, no generation rows, no keys."""
        L, _, R = self.text.shape
        device = self.text.device
        return CapturedAttention(
            text=torch.zeros(L, num_rows, R, dtype=self.text.dtype, device=device),
            vision=torch.zeros(L, num_rows, R, dtype=self.vision.dtype, device=device),
            rows=torch.zeros(num_rows, R, dtype=torch.bool, device=device),
            num_text=torch.zeros(num_rows, dtype=self.num_text.dtype, device=device),
            num_vision=torch.zeros(num_rows, dtype=self.num_vision.dtype, device=device),
            captured=torch.zeros(L, num_rows, dtype=torch.bool, device=device),
            variant=self.variant,
        )

    @classmethod
    def concat(cls, parts: Sequence[CapturedAttention]) -> CapturedAttention:
        """The parts' completions one after another; generation rows padded to the longest (zeros, ``rows`` False)."""
        same_setup("CapturedAttention", "layers", [p.num_layers for p in parts])
        same_setup("CapturedAttention", "variant", [p.variant for p in parts])
        R = max(p.text.shape[2] for p in parts)
        device = parts[0].text.device

        def pad(t: Tensor) -> Tensor:  # [..., r] -> [..., R]
            return torch.nn.functional.pad(t.to(device), (0, R - t.shape[-1]))

        return cls(
            text=torch.cat([pad(p.text) for p in parts], dim=1),  # [L, ΣN, R]
            vision=torch.cat([pad(p.vision) for p in parts], dim=1),
            rows=torch.cat([pad(p.rows) for p in parts]),  # [ΣN, R] (bool pads with False)
            num_text=torch.cat([p.num_text.to(device) for p in parts]),
            num_vision=torch.cat([p.num_vision.to(device) for p in parts]),
            captured=torch.cat([p.captured.to(device) for p in parts], dim=1),  # [L, ΣN]
            variant=parts[0].variant,
        )


def same_setup(kind: str, what: str, values: list) -> None:
    if any(v != values[0] for v in values):
        raise ValueError(f"{kind}.concat: the parts differ in {what} ({values}); they come from different set-ups")
