"""Format reward (SPEC section 2): <think> first and once, closed, then <answer>...</answer>."""

import pytest

from dapo_lightning.rewards.format import format_reward, is_well_formed

# (id, completion text, reward)
FORMAT_CASES = [
    ("well_formed", "<think>r</think><answer>C</answer>", 1.0),
    ("well_formed_prompt_example", "<think>\nThis is my reasoning.\n</think>\n<answer>C</answer>", 1.0),
    ("leading_whitespace_allowed", "\n  <think>r</think><answer>C</answer>", 1.0),
    ("leading_and_trailing_whitespace_stripped", " \t<think>r</think><answer>C</answer>\n\n ", 1.0),
    ("multiline_answer", "<think>r</think><answer>\nC\n</answer>", 1.0),
    ("empty_answer_has_the_tags", "<think>r</think><answer></answer>", 1.0),
    ("text_after_answer_allowed", "<think>r</think><answer>C</answer> and more", 1.0),
    ("second_close_think_allowed", "<think>a</think>b</think><answer>C</answer>", 1.0),
    # condition 1: starts with <think>
    ("text_before_think", "x<think>r</think><answer>C</answer>", 0.0),
    ("no_think", "<answer>C</answer>", 0.0),
    ("uppercase_think", "<THINK>r</THINK><answer>C</answer>", 0.0),
    ("close_tag_first", "</think><think>r</think><answer>C</answer>", 0.0),
    # condition 2: no second <think>
    ("second_think_inside", "<think>a<think>b</think><answer>C</answer>", 0.0),
    ("second_think_after_answer", "<think>a</think><answer>C</answer><think>", 0.0),
    ("second_think_in_answer", "<think>a</think><answer><think></answer>", 0.0),
    # condition 3: </think> closes it
    ("unclosed_think", "<think>a <answer>C</answer>", 0.0),
    ("think_only_open", "<think>", 0.0),
    # condition 4: <answer>...</answer> after </think>
    ("no_answer", "<think>a</think>C", 0.0),
    ("unclosed_answer", "<think>a</think><answer>C", 0.0),
    ("answer_tags_reversed", "<think>a</think></answer>C<answer>", 0.0),
    ("answer_only_inside_think", "<think><answer>C</answer></think>", 0.0),
    ("answer_opened_inside_think", "<think><answer>C</think></answer>", 0.0),
    ("empty", "", 0.0),
]


@pytest.mark.parametrize("text, reward", [case[1:] for case in FORMAT_CASES], ids=[case[0] for case in FORMAT_CASES])
def test_format_reward(text, reward):
    assert format_reward([text]) == [reward]
    assert is_well_formed(text) is (reward == 1.0)


def test_format_reward_rows_in_order_chat_messages_and_unknown_kwargs():
    completions = [
        "<think>r</think><answer>C</answer>",
        [{"role": "assistant", "content": "<think>r</think><answer>C</answer>"}],
        [{"role": "assistant", "content": "<answer>C</answer>"}],
    ]
    assert format_reward(completions, solution=["C"] * 3, completion_ids=[[1]] * 3) == [1.0, 1.0, 0.0]


def test_format_reward_rejects_a_completion_that_is_not_text():
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        format_reward([None])
