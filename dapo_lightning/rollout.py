"""Generation -> ``RolloutBatch``, and teacher-forced log-probs of its completions.

Shapes as in ``batch.py``: B prompts, G completions each, N = B * G rows, P prompt
tokens, T completion tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dapo_lightning.batch import PromptBatch, RolloutBatch

# Tokens a policy must never sample: they would make the next forward expect image features.
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class SamplingSettings:
    num_generations: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass(frozen=True)
class TokenIds:
    """Token ids generation needs from the tokenizer."""

    eos: tuple[int, ...]
    pad: int
    suppress: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, generation_config=None) -> TokenIds:
        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        config_eos = getattr(generation_config, "eos_token_id", None)
        if config_eos is not None:
            eos.update(int(t) for t in ([config_eos] if isinstance(config_eos, int) else config_eos))
        if not eos:
            raise ValueError("the tokenizer has no eos_token and the generation config names none")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        vocab = tokenizer.get_vocab()
        suppress = tuple(vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab)
        return cls(eos=tuple(sorted(eos)), pad=int(pad), suppress=suppress)


def completion_mask_from_eos(completion_ids: Tensor, eos_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mask of each row's tokens up to and including its first EOS, and whether it had none.

    Returns ``mask`` [N, T] (long) and ``truncated`` [N] (bool).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    T = completion_ids.shape[1]
    has_eos = is_eos.any(dim=1)  # [N]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T - 1, dtype=torch.long))  # [N]
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)  # [1, T]
    return (positions <= first.unsqueeze(1)).long(), ~has_eos


@torch.no_grad()
def generate(
    model,
    prompts: PromptBatch,
    tokenizer,
    settings: SamplingSettings,
    token_ids: TokenIds,
    *,
    stage: str = "train",
) -> RolloutBatch:
    """Sample G completions for each prompt with ``model.generate`` (rows grouped by prompt)."""
    P = prompts.input_ids.shape[1]
    inputs = {
        "input_ids": prompts.input_ids,
        "attention_mask": prompts.attention_mask,
        "pixel_values": prompts.pixel_values,
        "image_grid_thw": prompts.image_grid_thw,
    }
    if prompts.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = prompts.mm_token_type_ids
    sampling = (
        {"do_sample": False}
        if settings.greedy
        else {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    )
    output = model.generate(
        **inputs,
        **sampling,
        num_return_sequences=settings.num_generations,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(token_ids.eos),
        pad_token_id=token_ids.pad,
        suppress_tokens=list(token_ids.suppress) or None,
        use_cache=True,
    )  # [N, P + T]
    completion_ids = output[:, P:]  # [N, T]
    if completion_ids.shape[1] == 0:  # nothing generated at all (max_new_tokens reached 0)
        completion_ids = torch.full((output.shape[0], 1), token_ids.pad, dtype=output.dtype, device=output.device)
    mask, truncated = completion_mask_from_eos(completion_ids, token_ids.eos)
    completion_ids = completion_ids.masked_fill(mask == 0, token_ids.pad)
    texts = tokenizer.batch_decode(
        [row[m.bool()] for row, m in zip(completion_ids, mask)], skip_special_tokens=True
    )
    return RolloutBatch(
        prompts=prompts,
        num_generations=settings.num_generations,
        completion_ids=completion_ids,
        completion_mask=mask,
        completions=texts,
        stage=stage,
        truncated=truncated,
        replayed=torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device),
    )


def selective_log_softmax(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax. [n, T, V], [n, T] -> [n, T]"""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [n, T]
    if logits.dtype in (torch.float32, torch.float64):
        return picked - torch.logsumexp(logits, dim=-1)  # [n, T]
    # half precision: row by row, in float32, to bound memory and keep precision
    return torch.stack([p.float() - torch.logsumexp(row.float(), dim=-1) for p, row in zip(picked, logits)])


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position. [n, T, V] -> [n, T]"""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


@dataclass
class LogProbs:
    logps: Tensor  # [n, T'] log-probs of the completion tokens
    mask: Tensor  # [n, T'] completion mask (trimmed to the rows' longest completion)
    entropy: Tensor | None = None  # [n, T'] detached


def completion_logps(model, inputs: dict[str, Tensor], *, temperature: float = 1.0, with_entropy: bool = False) -> LogProbs:
    """Teacher-forced log-probs of the completions in ``inputs`` (from ``RolloutBatch.model_inputs``).

    Gradients flow when the caller has grad enabled.
    """
    inputs = dict(inputs)
    completion_ids = inputs.pop("completion_ids")  # [n, T']
    mask = inputs.pop("completion_mask")  # [n, T']
    T = completion_ids.shape[1]
    dtype = next(model.parameters()).dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    output = model(**inputs, use_cache=False, logits_to_keep=T + 1)
    logits = output.logits[:, :-1, :]  # [n, T', V] position t predicts completion token t
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_log_softmax(logits, completion_ids)  # [n, T']
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())  # [n, T']
    return LogProbs(logps=logps, mask=mask, entropy=entropy)
