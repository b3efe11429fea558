"""Accuracy reward (SPEC section 2): what is read as the prediction, and how it is scored."""

import pytest

from dapo_lightning.rewards import accuracy as accuracy_module
from dapo_lightning.rewards.accuracy import SCAN_WINDOW, accuracy, drop_think, extract_answer, scan_window

# (id, completion text, prediction)
EXTRACT_CASES = [
    # 1. <answer> tags: the whole stripped inner text, full-width mapped, upper-cased.
    ("tag", "<think>\nred car\n</think>\n<answer>C</answer>", "C"),
    ("tag_fullwidth", "<answer>Ｃ</answer>", "C"),
    ("tag_fullwidth_lower", "<answer>ｃ</answer>", "C"),
    ("tag_lower_padded", "<answer> c </answer>", "C"),
    ("tag_multiline_inner", "<answer>\nD\n</answer>", "D"),
    ("tag_with_text_is_whole_inner", "<answer>C. red</answer>", "C. RED"),
    ("tag_with_parens_is_whole_inner", "<answer>(C)</answer>", "(C)"),
    ("tag_empty_does_not_fall_back", "Answer: B\n<answer></answer>", ""),
    ("tag_beats_later_answer_line", "<answer>A</answer>\nThe answer is B", "A"),
    ("first_of_two_tags", "<answer>A</answer><answer>B</answer>", "A"),
    ("nested_open_tag_kept_in_inner", "<answer><answer>B</answer>", "<ANSWER>B"),
    ("tag_inside_think_still_counts", "<think><answer>E</answer></think>", "E"),
    ("unclosed_tag_falls_back_to_line_end", "<answer>B", "B"),
    ("close_before_open_falls_back", "</answer>Answer: D<answer>", "D"),
    # 2. keyword lines, bottom-up; pattern (1)
    ("zh_answer_fullwidth", "答案是Ｂ", "B"),
    ("zh_answer_colon_option_paren", "答案为：选项（Ｄ）", "D"),
    ("zh_letter_touching_cjk", "答案是B选项", "B"),
    ("answer_is_paren_period", "The answer is (B).", "B"),
    ("final_answer_option", "Final answer: option D", "D"),
    ("final_answer_is_colon", "The final answer is: E", "E"),
    ("answer_upper_keyword", "ANSWER IS C", "C"),
    ("answer_bracket_spaces", "answer   is \t (  [ C ]", "C"),
    ("answer_dash", "Answer - J", "J"),
    ("answer_word_not_letter", "The answer is clear: A", "A"),  # "clear" is not C; the line ends in A
    ("answer_lowercase_letter_ignored", "answer: b", None),
    ("option_then_article", "the option a user wants", None),
    ("answer_letter_then_digit", "Answer: E2", None),
    ("answer_capital_word", "The answer is Dog", None),
    ("answer_letter_past_j", "The answer is K", None),
    ("pattern1_beats_earlier_pattern2", "Option B is wrong, so the answer is C", "C"),
    ("first_pattern1_match_in_line", "The answer is (B), not answer A", "B"),
    # pattern (2)
    ("zh_option", "选项 A", "A"),
    ("option_is", "I think option is: F", "F"),
    ("choice_paren", "Best choice (G) here", "G"),
    # pattern (3): a keyword line ending in (X) or X
    ("line_end_paren", "The correct option, I think, is (C)\nB is wrong", "C"),
    ("line_end_fullwidth_paren", "Looking at each option… （Ｈ）", "H"),
    ("line_end_letter", "Every choice considered, I go with H\nmaybe A", "H"),
    ("line_end_needs_keyword", "I pick (D)\nB", "B"),  # neither line has a keyword: last standalone letter
    ("line_end_not_standalone", "answer in RED", None),
    # bottom-up: the last keyword line with a match decides
    ("last_letter_differs_from_answer_line", "Answer: B\nI also considered C", "B"),
    ("bottom_answer_line_wins", "Answer: B\nOn reflection the answer is D", "D"),
    ("keyword_line_without_match_skipped", "Answer: B\nthe answer needs care", "B"),
    ("crlf_lines", "Answer: B\r\nso C", "B"),
    ("unicode_line_separator", "Answer: B\u2028maybe C", "B"),
    # <think> blocks are dropped before the scan
    ("think_dropped", "<think>The answer is A</think>\nSo B", "B"),
    ("think_only", "<think>The answer is A</think>", None),
    ("two_think_blocks", "<think>answer A</think> mid <think>answer B</think> choose E", "E"),
    ("unclosed_think_kept", "<think>The answer is A", "A"),
    ("think_leaves_a_space", "B<think>x</think>C", "C"),
    ("uppercase_think_not_a_tag", "<THINK>answer: A</THINK> then C", "A"),
    # 3. the last standalone letter
    ("stray_letter", "No tags at all, I guess C is it", "C"),
    ("last_of_several_letters", "A or B? Probably F.", "F"),
    ("fullwidth_stray_letter", "我选Ｅ", "E"),
    ("letters_inside_words_ignored", "ABC DEF", None),
    ("empty", "", None),
    ("whitespace", "  \n\t ", None),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in EXTRACT_CASES], ids=[case[0] for case in EXTRACT_CASES])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# (id, completion, solution, reward)
SCORE_CASES = [
    ("tag_match", "<think>r</think><answer>C</answer>", "C", 1.0),
    ("tag_mismatch", "<think>r</think><answer>C</answer>", "D", 0.0),
    ("solution_lower_padded", "<answer>C</answer>", " c", 1.0),
    ("solution_newline", "答案是Ｂ", "B\n", 1.0),
    ("solution_fullwidth", "<answer>C</answer>", "Ｃ", 1.0),
    ("fullwidth_tag", "<answer>Ｃ</answer>", "C", 1.0),
    ("lower_tag", "<answer> c </answer>", "C", 1.0),
    ("tag_with_text", "<answer>C. red</answer>", "C", 0.0),
    ("empty_tag_empty_solution", "<answer></answer>", "", 0.0),
    ("nothing_found_empty_solution", "", "", 0.0),
    ("empty_completion", "", "C", 0.0),
    ("fallback_line", "The answer is (B).", "B", 1.0),
    ("solution_none_scores_zero", "<answer>C</answer>", None, 0.0),
    ("completion_none_scores_zero", None, "C", 0.0),
    ("chat_message", [{"role": "assistant", "content": "<answer>A</answer>"}], "A", 1.0),
    ("chat_last_message", [{"role": "assistant", "content": "<answer>A</answer>"}, {"role": "assistant", "content": "<answer>B</answer>"}], "B", 1.0),
    ("chat_content_parts", [{"role": "assistant", "content": [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "G</answer>"}]}], "G", 1.0),
]


@pytest.mark.parametrize(
    "completion, solution, reward", [case[1:] for case in SCORE_CASES], ids=[case[0] for case in SCORE_CASES]
)
def test_accuracy_scores(completion, solution, reward):
    assert accuracy([completion], solution=[solution]) == [reward]


def test_accuracy_scores_rows_in_order_and_ignores_unknown_kwargs():
    completions = ["<answer>A</answer>", "<answer>B</answer>", "answer: C"]
    rewards = accuracy(completions, solution=["A", "A", "C"], prompts=["p"] * 3, completion_ids=[[1], [2], [3]], vgr=[0.1] * 3)
    assert rewards == [1.0, 0.0, 1.0]


def test_an_exception_scores_zero_for_that_row_only(monkeypatch):
    real = accuracy_module.extract_answer

    def fails_on_boom(text):
        if text == "boom":
            raise RuntimeError("parser bug")
        return real(text)

    monkeypatch.setattr(accuracy_module, "extract_answer", fails_on_boom)
    assert accuracy(["<answer>A</answer>", "boom", "<answer>B</answer>"], solution=["A", "A", "B"]) == [1.0, 0.0, 1.0]


def test_mismatched_solution_column_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy(["<answer>A</answer>", "<answer>B</answer>"], solution=["A"])


@pytest.mark.parametrize(
    "text",
    ["<think>a</think>b", "<think>a</think>b<think>c</think>d", "<think>a<think>b</think>c</think>", "x<think>y", "</think><think>", ""],
)
def test_drop_think_equals_the_spec_substitution(text):
    import re

    assert drop_think(text) == re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)


def test_scan_window_keeps_whole_lines():
    # The window starts right after "\n": its first line is whole and kept.
    assert scan_window("first\n" + "y" * SCAN_WINDOW) == ["y" * SCAN_WINDOW]
    # The window starts on "\n" inside "first": the cut remainder "" is dropped.
    assert scan_window("first\n" + "y" * (SCAN_WINDOW - 1)) == ["y" * (SCAN_WINDOW - 1)]
    # Shorter than the window: every line, as str.split would give them.
    assert scan_window("a\r\nb\u2029c") == ["a", "", "b", "c"]


def test_answer_lines_older_than_the_window_are_not_read():
    near = "Answer: B\n" + "x\n" * (SCAN_WINDOW // 2 - 10)
    far = "Answer: B\n" + "x\n" * (SCAN_WINDOW // 2 + 10)
    assert (len(near) < SCAN_WINDOW, len(far) > SCAN_WINDOW) == (True, True)
    assert (extract_answer(near), extract_answer(far)) == ("B", None)
