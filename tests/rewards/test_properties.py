"""Properties of the SPEC section 2 rewards over generated text, and their cost on adversarial input.

The accuracy reward is checked against a literal transcription of the SPEC rule
(``spec_extract_answer``: ``re`` over ``str.splitlines``, no scan window, no
whitespace folding). The fast implementation must agree with it on every input
shorter than the scan window.
"""

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_lightning.rewards.accuracy import SCAN_WINDOW, accuracy, extract_answer, normalize_letter
from dapo_lightning.rewards.format import format_reward
from dapo_lightning.rewards.length import length_reward, overlong_penalty

_L = "[A-JＡ-Ｊ]"
_W = "A-Za-z0-9_Ａ-Ｚａ-ｚ０-９"
SPEC_PATTERNS = (  # SPEC section 2 (1), (2), (3), with the letter rules of dapo_lightning/rewards/accuracy.py
    re.compile(rf"(?:(?i:final\s*answer|answer)|答案)\s*(?:(?i:is)|为|是)?\s*[:：\-]?\s*(?:(?i:option|choice)|选项)?\s*[(\[（［\s]*({_L})(?![{_W}])"),
    re.compile(rf"(?:(?i:option|choice)|选项)\s*(?:(?i:is)|为|是)?\s*[:：\-]?\s*[(\[（［\s]*({_L})(?![{_W}])"),
    re.compile(rf"(?:[(（]({_L})[)）]|(?<![{_W}])({_L}))$"),
)


def spec_extract_answer(text):
    match = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if match:
        return normalize_letter(match.group(1))
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)
    for line in reversed([line.strip() for line in text.splitlines() if line.strip()]):
        if not re.search(r"(?i:answer|choice|option)|答案|选项", line):
            continue
        for pattern in SPEC_PATTERNS:
            match = pattern.search(line)
            if match:
                return normalize_letter(match.group(1) or match.group(match.lastindex))
    letters = re.findall(rf"(?<![{_W}])({_L})(?![{_W}])", text)
    return normalize_letter(letters[-1]) if letters else None


FRAGMENTS = [
    "answer", "Answer", "final answer", "ANSWER", "答案", "选项", "option", "Choice", "is", "IS", "为", "是",
    ":", "：", "-", "(", ")", "（", "）", "[", "［", " ", "  ", "\t", "\n", "\r\n", "\u2028", "\x0c",
    "A", "B", "C", "E", "J", "K", "Ａ", "Ｃ", "ｃ", "a", "c", "x", "1", ".", "。", "AB",
    "<think>", "</think>", "<answer>", "</answer>",
]  # fmt: skip
tricky_text = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
any_text = st.text(max_size=300)


@settings(max_examples=600, deadline=None)
@given(st.one_of(tricky_text, any_text))
def test_extract_answer_agrees_with_the_literal_spec_rule(text):
    assert extract_answer(text) == spec_extract_answer(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(tricky_text, any_text), st.one_of(st.sampled_from(["A", " c", "Ｊ", ""]), st.text(max_size=3)))
def test_rewards_never_raise_and_stay_binary(text, solution):
    assert accuracy([text], solution=[solution])[0] in (0.0, 1.0)
    assert format_reward([text])[0] in (0.0, 1.0)


@given(st.text(alphabet=st.characters(exclude_characters="<"), max_size=50), st.sampled_from("ABCDEFGHIJ"))
def test_a_tagged_letter_scores_one(reasoning, letter):
    text = f"<think>{reasoning}</think>\n<answer>{letter}</answer>"
    assert accuracy([text], solution=[letter]) == [1.0]
    assert format_reward([text]) == [1.0]


@given(st.integers(1, 5000), st.integers(0, 6000), st.integers(0, 6000))
def test_length_reward_is_in_range_and_never_rises_with_length(limit, cache, n):
    reward, longer = overlong_penalty(n, limit, cache), overlong_penalty(n + 1, limit, cache)
    assert -1.0 <= longer <= reward <= 0.0
    assert length_reward(["x"], completion_lengths=[n], max_completion_length=limit, soft_punish_cache=cache) == [reward]


MEGABYTE = 1_000_000
# (id, text, accuracy against solution "B")
ADVERSARIAL = [
    ("answer_words", "answer " * 150_000, 0.0),
    ("answer_lines", "answer\n" * 150_000, 0.0),
    ("open_think_tags", "<think>" * 100_000, 0.0),
    ("open_answer_tags", "<answer>" * 120_000, 0.0),
    ("think_blocks", "<think></think>" * 66_000, 0.0),
    ("nested_unclosed", "<think><answer>" * 60_000 + "</think>", 0.0),
    ("whitespace_run", "answer" + " " * MEGABYTE + "B", 0.0),  # one line longer than the scan window
    ("whitespace_run_in_window", "answer" + " " * (SCAN_WINDOW - 10) + "B", 1.0),
    ("bracket_run_in_window", "answer: option " + "（ " * (SCAN_WINDOW // 2 - 10), 0.0),
    ("letter_lines", "B\n" * 500_000, 1.0),
    ("newlines", "\n" * MEGABYTE, 0.0),
    ("answer_letter_lines", "答案是Ｂ\n" * 200_000, 1.0),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in ADVERSARIAL], ids=[case[0] for case in ADVERSARIAL])
def test_adversarial_input_is_scored_without_catastrophic_backtracking(text, expected):
    # A generous bound: catastrophic backtracking takes minutes on these; the code takes milliseconds.
    start = time.perf_counter()
    rewards = accuracy([text], solution=["B"]) + format_reward([text])
    assert time.perf_counter() - start < 1.0
    assert rewards == [expected, 0.0]
