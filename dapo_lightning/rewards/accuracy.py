"""Accuracy reward: 1.0 when the completion's chosen letter is the solution (SPEC section 2).

The prediction is read in this order (SPEC section 2, "accuracy"):

1. The first ``<answer>(.*?)</answer>`` (dotall): the prediction is the whole
   stripped inner text, so ``<answer>C. red</answer>`` is "C. RED", not "C".
2. Otherwise ``<think>...</think>`` blocks are dropped and the lines are scanned
   from the bottom. Only lines containing answer/答案/选项/choice/option (any
   case) are tried, against three patterns in order:
   (1) ``(final answer|answer|答案) (is|为|是)? [:：-]? (option|choice|选项)? [([ ]* <letter>``,
   (2) ``(option|choice|选项) (is|为|是)? [:：-]? [([ ]* <letter>``,
   (3) the line ends in ``(<letter>)`` or ``<letter>``.
   The first line with a match decides; within it, the first pattern that matches.
3. Otherwise the last standalone letter of the text (with the think blocks dropped).

Letters are A-J and the full-width Ａ-Ｊ, which count as their ASCII letters.
The prediction and the solution are compared after stripping, mapping full-width
letters to ASCII and upper-casing, so the solution may be "C", " c" or "Ｃ".

Two departures from the original's parser are deliberate, and SPEC section 2 states them:
they fix its false positives and keep all 672 recorded rewards (each pinned by a test).

- In steps 2 and 3 a letter is a capital: outside ``<answer>`` lower-case letters never
  count (SPEC section 2). With any case allowed, English words read as answers: "The answer is
  clear" would pick C and "the option a user wants" A (the original scored "I answered B"
  as E). Inside ``<answer>`` the comparison is case-insensitive, as the SPEC says.
- A letter must stand alone, so a word's first letter is not an answer (SPEC section 2): the next character (and in
  pattern (3) and step 3 the previous one too) is not an ASCII or full-width letter, digit
  or underscore, so "The answer is Dog" picks nothing. CJK characters may touch it:
  "答案是B选项" reads B.

Choices where SPEC section 2 leaves room (each pinned by a test):

- Pattern (2)'s "..." is the connector of pattern (1) without the option word;
  the brackets before a letter may also be full-width （ and ［.
- ``<think>``/``</think>``/``<answer>`` are matched case-sensitively, as written,
  and a dropped think block leaves a space, so the text around it does not join
  into one word (as the original code did).
- Steps 2 and 3 read only the last ``SCAN_WINDOW`` characters, starting at a line
  boundary. Completions are capped at ``max_completion_length`` tokens, far
  below this, so normal inputs get the full SPEC rule. A megabyte of adversarial
  text is scored in milliseconds; without the window Python's regex engine needs
  ~0.1 s per megabyte of "answer answer ...". Runs of whitespace are folded to
  one space before the patterns run (it changes no match), so the chained
  ``\s*`` cannot backtrack polynomially over a long run.
"""

from __future__ import annotations

import re
from typing import Any

from dapo_lightning.rewards.completions import completion_text
from dapo_lightning.rewards.registry import register_reward

SCAN_WINDOW = 32_768  # characters; about 8k tokens of English reasoning

_FULLWIDTH_TO_ASCII = str.maketrans("ＡＢＣＤＥＦＧＨＩＪａｂｃｄｅｆｇｈｉｊ", "ABCDEFGHIJabcdefghij")
_LINE_BREAKS = ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")  # str.splitlines' besides \n
_ANY_LINE_BREAK = "\n" + "".join(_LINE_BREAKS)

_LETTER = "[A-JＡ-Ｊ]"
_WORD_CHAR = "A-Za-z0-9_Ａ-Ｚａ-ｚ０-９"  # characters that may not touch a standalone letter
_LETTER_END = f"({_LETTER})(?![{_WORD_CHAR}])"
_OPENERS = r"[(\[（［\s]*"
_IS = r"(?:(?i:is)|为|是)?"
_COLON = r"[:：\-]?"
_OPTION_WORD = r"(?:(?i:option|choice)|选项)"

_KEYWORD = re.compile(r"(?i:answer|choice|option)|答案|选项")
_ANSWER_PATTERN = re.compile(
    rf"(?:(?i:final\s*answer|answer)|答案)\s*{_IS}\s*{_COLON}\s*{_OPTION_WORD}?{_OPENERS}{_LETTER_END}"
)
_OPTION_PATTERN = re.compile(rf"{_OPTION_WORD}\s*{_IS}\s*{_COLON}{_OPENERS}{_LETTER_END}")
_LINE_END_PATTERN = re.compile(rf"(?:[(（]({_LETTER})[)）]|(?<![{_WORD_CHAR}])({_LETTER}))\Z")
# The greedy prefix makes match() return the last occurrence: the engine backtracks from the end.
_LAST_STANDALONE = re.compile(rf"(?s:.*)(?<![{_WORD_CHAR}]){_LETTER_END}")
_THINK_BLOCK = re.compile(r"(?s)<think>.*?</think>")


def normalize_letter(text: str) -> str:
    """``text`` stripped, full-width Ａ-Ｊ as ASCII, upper-cased: the form predictions and solutions are compared in."""
    return text.strip().translate(_FULLWIDTH_TO_ASCII).upper()


def drop_think(text: str) -> str:
    """``re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)``, in linear time.

    No match can end past the last ``</think>``, so only the text up to it is
    searched: an unclosed ``<think>`` after it would otherwise make the lazy
    pattern rescan the rest of the text once per opening tag.
    """
    cut = text.rfind("</think>")
    if cut < 0:
        return text
    cut += len("</think>")
    return _THINK_BLOCK.sub(" ", text[:cut]) + text[cut:]


def scan_window(text: str) -> list[str]:
    """The lines of the last ``SCAN_WINDOW`` characters, split as ``str.splitlines`` does.

    When the window starts inside a line, that cut line is dropped, so every line returned is whole.
    """
    window = text[-SCAN_WINDOW:]
    for line_break in _LINE_BREAKS:
        window = window.replace(line_break, "\n")
    lines = window.split("\n")
    cut_inside_a_line = len(text) > SCAN_WINDOW and text[-SCAN_WINDOW - 1] not in _ANY_LINE_BREAK
    return lines[1:] if cut_inside_a_line else lines


def letter_in_line(line: str) -> str | None:
    """The letter patterns (1), (2), (3) of SPEC section 2 find in one line, tried in that order."""
    line = " ".join(line.split())  # one space per run: same matches, and no long runs to backtrack over
    for pattern in (_ANSWER_PATTERN, _OPTION_PATTERN):
        match = pattern.search(line)
        if match:
            return match.group(1)
    match = _LINE_END_PATTERN.search(line)
    return (match.group(1) or match.group(2)) if match else None


def extract_answer(text: str) -> str | None:
    """The prediction in ``text`` by the rules of SPEC section 2, normalised by :func:`normalize_letter`.

    Returns the ``<answer>`` content when the tags are there (possibly "" or more
    than a letter), else a letter "A".."J", else ``None``.
    """
    start = text.find("<answer>")
    if start >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end >= 0:
            return normalize_letter(text[start + len("<answer>") : end])
    lines = scan_window(drop_think(text))
    for line in reversed(lines):
        if _KEYWORD.search(line):
            letter = letter_in_line(line)
            if letter:
                return normalize_letter(letter)
    match = _LAST_STANDALONE.match("\n".join(lines))
    return normalize_letter(match.group(1)) if match else None


def score(completion: Any, solution: Any) -> float:
    """1.0 when the prediction equals the solution (both normalised), else 0.0; any error scores 0.0 (SPEC section 2)."""
    try:
        prediction = extract_answer(completion_text(completion))
        target = normalize_letter(solution)
    except Exception:
        return 0.0
    return 1.0 if prediction and prediction == target else 0.0


@register_reward("accuracy")
def accuracy(completions: list, solution: list, **kwargs: Any) -> list[float]:
    """SPEC section 2 accuracy in {0, 1} per completion; ``solution`` is the dataset column of letters."""
    if len(solution) != len(completions):
        raise ValueError(f"accuracy: {len(completions)} completions but {len(solution)} solutions")
    return [score(completion, target) for completion, target in zip(completions, solution)]
