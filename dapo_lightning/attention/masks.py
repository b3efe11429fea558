"""Which prompt keys are text and which are vision, the attention sink, and the generation rows (SPEC 3).

Shapes: n rows, P prompt tokens (left-padded), T completion tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the modality masks need (SPEC 3)."""

    image_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    not_text: tuple[int, ...]  # bos, eos, pad, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        vocab = tokenizer.get_vocab()
        names = {
            "image_pad": "<|image_pad|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
        }
        missing = [token for token in names.values() if token not in vocab]
        if missing:
            raise ValueError(
                f"attention metrics need Qwen-VL's special tokens; the tokenizer lacks {', '.join(missing)}"
            )
        ids = {key: int(vocab[token]) for key, token in names.items()}
        named = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, vocab.get("<|endoftext|>")]
        not_text = {i for i in named if i is not None}
        not_text.update(ids[k] for k in ("vision_start", "vision_end", "im_start", "im_end"))
        return cls(**ids, not_text=tuple(sorted(int(i) for i in not_text)))


@dataclass(frozen=True)
class ModalityMasks:
    """Which prompt keys are vision (V) and which are text (T), per row."""

    text: Tensor  # [n, P] bool
    vision: Tensor  # [n, P] bool

    @property
    def num_text(self) -> Tensor:
        return self.text.sum(-1)  # [n]

    @property
    def num_vision(self) -> Tensor:
        return self.vision.sum(-1)  # [n]


def modality_masks(input_ids: Tensor, attention_mask: Tensor, special: SpecialTokens) -> ModalityMasks:
    """SPEC 3 masks over the prompt keys of each row (left padding allowed).

    V = ``<|image_pad|>`` tokens strictly between a ``<|vision_start|>`` and the next
    ``<|vision_end|>``. T = every other real prompt token except the special tokens of
    ``special.not_text`` and the first system segment (the first ``<|im_start|>`` through
    the next ``<|im_end|>``, or to the end of the prompt when it is never closed).
    Qwen's chat template always opens with a system turn, so this never removes the question.
    """
    n, P = input_ids.shape
    real = attention_mask.bool()  # [n, P]
    positions = torch.arange(P, device=input_ids.device).expand(n, P)  # [n, P]
    none = torch.full_like(positions, -1)
    is_start = (input_ids == special.vision_start) & real
    is_end = (input_ids == special.vision_end) & real
    # nearest <|vision_start|> and <|vision_end|> strictly to the left of each position
    last_start = _shift_right(torch.where(is_start, positions, none).cummax(-1).values, -1)  # [n, P]
    last_end = _shift_right(torch.where(is_end, positions, none).cummax(-1).values, -1)  # [n, P]
    ends_to_the_right = is_end.flip(-1).long().cumsum(-1).flip(-1) - is_end.long()  # [n, P]
    inside = (last_start > last_end) & (ends_to_the_right > 0)  # an open bracket that closes later
    vision = inside & (input_ids == special.image_pad) & real  # [n, P]

    is_im_start = (input_ids == special.im_start) & real
    is_im_end = (input_ids == special.im_end) & real
    first_open = torch.where(is_im_start, positions, torch.full_like(positions, P)).min(-1).values  # [n] P when absent
    closes = is_im_end & (positions >= first_open.unsqueeze(-1))
    first_close = torch.where(closes, positions, torch.full_like(positions, P - 1)).min(-1).values  # [n]
    system = (positions >= first_open.unsqueeze(-1)) & (positions <= first_close.unsqueeze(-1))  # [n, P]

    not_text = torch.isin(input_ids, torch.tensor(special.not_text, device=input_ids.device))
    text = real & ~vision & ~not_text & ~system  # [n, P]
    return ModalityMasks(text=text, vision=vision)


def _shift_right(values: Tensor, fill: int) -> Tensor:
    """[n, P] -> [n, P], column j holds column j - 1 (the first holds ``fill``)."""
    return torch.cat([torch.full_like(values[:, :1], fill), values[:, :-1]], dim=-1)


def first_real_position(attention_mask: Tensor) -> Tensor:
    """Column of each row's first non-padding token: the attention sink of SPEC 3. [n, S] -> [n]"""
    return attention_mask.long().argmax(-1)


def generation_rows(completion_mask: Tensor) -> Tensor:
    """[N, T] completion mask -> [N, T - 1] bool: row r exists when r < C - 1."""
    T = completion_mask.shape[1]
    lengths = completion_mask.sum(-1)  # [N]
    positions = torch.arange(max(T - 1, 0), device=completion_mask.device)
    return positions.unsqueeze(0) < (lengths - 1).unsqueeze(-1)  # [N, T - 1]


@dataclass(frozen=True)
class KeySets:
    """The three key sets whose attention mass the capture measures, per row, as 0/1 columns."""

    indicators: Tensor  # [n, P, 3] float32: kept prompt key (real, not the sink), text key, vision key (both kept)
    num_text: Tensor  # [n] |T| (the sink is never a text or vision key of a Qwen prompt: it is <|im_start|>)
    num_vision: Tensor  # [n] |V|


def key_sets(input_ids: Tensor, attention_mask: Tensor, special: SpecialTokens) -> KeySets:
    """Indicators of the kept prompt keys (not padding, not the sink), the text keys and the vision keys. [n, P] inputs

    The first column is what each generation row is renormalised over (SPEC 3: the sink column is
    zeroed, then the row sums to 1 over the prompt keys); the other two are what A_T and A_V sum.
    """
    masks = modality_masks(input_ids, attention_mask, special)  # [n, P]
    sink = first_real_position(attention_mask)  # [n]
    kept = attention_mask.bool().clone()  # [n, P]
    kept[torch.arange(kept.shape[0], device=kept.device), sink] = False  # SPEC 3: the sink column is zeroed
    indicators = torch.stack([kept, masks.text & kept, masks.vision & kept], dim=-1).float()  # [n, P, 3]
    return KeySets(indicators=indicators, num_text=masks.num_text, num_vision=masks.num_vision)
