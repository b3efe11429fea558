"""Format reward: 1.0 for ``<think>...</think>`` followed by ``<answer>...</answer>`` (SPEC section 2).

SPEC section 2: after stripping surrounding whitespace (as the original's later code does)
the text must begin with ``<think>``, hold no further ``<think>``, close it with
``</think>`` and have ``<answer>...</answer>`` somewhere after that. The original TRL reward
(``think_format_reward``) is the regex ``^<think>(?!.*<think>)(.*?)</think>.*$`` (dotall)
plus the answer tags. Written here with ``str.find`` it takes linear time on any input.
Stripping first means a chat template or decoder that puts a newline before ``<think>``
does not cost the format reward.

Choices where the SPEC leaves room (each pinned by a test):

- The answer must come after the first ``</think>``: an answer inside the
  reasoning is not the final answer the prompt asks for.
- ``<answer></answer>`` (empty) has the tags, so it counts; the accuracy reward
  scores its content.
- Text after ``</answer>`` is allowed: the SPEC rule does not forbid it.
"""

from __future__ import annotations

from typing import Any

from dapo_lightning.rewards.completions import completion_text
from dapo_lightning.rewards.registry import register_reward

_THINK, _END_THINK, _ANSWER, _END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"


def is_well_formed(text: str) -> bool:
    """The four conditions of SPEC section 2's format reward, in order, on the stripped text."""
    body = text.strip()
    if not body.startswith(_THINK):
        return False
    after_open = body[len(_THINK) :]
    if _THINK in after_open:  # a second <think>, anywhere
        return False
    end_think = after_open.find(_END_THINK)
    if end_think < 0:
        return False
    after_think = after_open[end_think + len(_END_THINK) :]
    start = after_think.find(_ANSWER)
    return start >= 0 and after_think.find(_END_ANSWER, start + len(_ANSWER)) >= 0


@register_reward("format")
def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """SPEC section 2 format reward in {0, 1} per completion."""
    return [1.0 if is_well_formed(completion_text(completion)) else 0.0 for completion in completions]
