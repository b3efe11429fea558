"""The text of one completion, whichever of TRL's two shapes it comes in.

Rewards receive ``completions`` as plain strings (SPEC section 2). TRL's
conversational format passes each completion as a list of chat messages
instead, ``[{"role": "assistant", "content": "..."}]``; a reward written for
either shape gets the same text from :func:`completion_text`.
"""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The completion as one string.

    A string is returned unchanged. A list of chat messages gives the last
    message's ``content``; content given as a list of parts
    (``[{"type": "text", "text": ...}, ...]``) gives its text parts joined.
    Anything else raises ``TypeError``.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text")
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")
