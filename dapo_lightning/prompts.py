"""Chat prompts for multiple-choice visual questions (SPEC section 1).

The prompt is ChatML: a system message, then a user message holding the image
followed by the question text. The processor's chat template renders it, so a
real Qwen2.5-VL checkpoint and the offline tiny model format it identically.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "A conversation between user and assistant. The user asks a multiple-choice question about an image, "
    "and the assistant solves it. The assistant first thinks about the reasoning process in the mind and "
    "then provides the user with the answer. The reasoning process is enclosed within <think></think> tags, "
    "and the final answer must be enclosed within <answer></answer> tags as exactly one capital letter from "
    "A to J with no extra text or symbols. The response must end immediately after the closing </answer> tag. "
    "For example:\n<think>\nThis is my reasoning.\n</think>\n<answer>C</answer>"
)

LETTERS = "ABCDEFGHIJ"


def build_messages(problem: str, system_prompt: str | None = SYSTEM_PROMPT, num_images: int = 1) -> list[dict[str, Any]]:
    """Messages for one question: optional system turn, then the image(s) and the problem text."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": problem})
    messages.append({"role": "user", "content": content})
    return messages
