"""Chat prompts for multiple-choice visual questions (SPEC section 1).

The prompt is ChatML: a system message, then a user message holding the image
followed by the question text. The processor's chat template renders it, so a
real Qwen2.5-VL checkpoint and the offline tiny model format it identically.

Dataset text is untrusted: a question containing one of the tokenizer's special tokens
(``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) would be encoded as that
control token, not as text: it could close the user turn, open a fake assistant turn,
or break the image placeholders (the processor then fails, or the attention masks of
SPEC section 3 describe the wrong keys). :func:`special_tokens_in` finds them; the data
module rejects such rows (``data.on_bad_row``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SYSTEM_PROMPT = (
    "A conversation between user and assistant. The user asks a multiple-choice question about an image, "
    "and the assistant solves it. The assistant first thinks about the reasoning process in the mind and "
    "then provides the user with the answer. The reasoning process is enclosed within <think></think> tags, "
    "and the final answer must be enclosed within <answer></answer> tags as exactly one capital letter from "
    "A to J with no extra text or symbols. The response must end immediately after the closing </answer> tag. "
    "For example:\n<think>\nThis is my reasoning.\n</think>\n<answer>C</answer>"
)


def build_messages(problem: str, system_prompt: str | None = SYSTEM_PROMPT, num_images: int = 1) -> list[dict[str, Any]]:
    """Messages for one question: optional system turn, then the image(s) and the problem text."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": problem})
    messages.append({"role": "user", "content": content})
    return messages


def special_token_strings(tokenizer) -> list[str]:
    """The tokenizer's control tokens as text (added tokens flagged special; not ``<think>`` and the like)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {t.content for t in decoder.values() if getattr(t, "special", False)}
    tokens |= set(getattr(tokenizer, "all_special_tokens", None) or [])
    return sorted(t for t in tokens if t)


def special_tokens_in(text: str, tokens: Iterable[str]) -> list[str]:
    """The tokens of ``tokens`` that occur in ``text``, in order of first occurrence."""
    found = [(text.find(t), t) for t in tokens]
    return [t for position, t in sorted(found) if position >= 0]
