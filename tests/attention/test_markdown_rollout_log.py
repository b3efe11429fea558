"""MarkdownRolloutLog (SPEC 7): the files, their sections, and model text that cannot break the document."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from dapo_lightning.callbacks.markdown_log import MarkdownRolloutLog
from dapo_lightning.callbacks.markdown_render import cell, fence
from dapo_lightning.attention import CapturedAttention, attention_report
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.update import UpdateResult

import markdown_it  # noqa: E402  (a test dependency: setup.cfg [test])

ADVERSARIAL = [
    "a | b | c\n| --- | --- |\n| x | y |",
    "```\n# Fake heading\n```\n````python\nevil()\n````\n`` ` ``",
    "</details>\n\n# Fake heading\n\n<details><summary>fake</summary>\n\n## Step 999",
    "<script>alert(1)</script>\r\n### Samples\n\x00\x1b[31m",
]
TOKENS = ["`", "|", "</details>", "# H", "```"]


class FakeTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [TOKENS[i % len(TOKENS)] for i in ids]

    def decode(self, ids):
        return " ".join(TOKENS[i % len(TOKENS)] for i in ids)


def adversarial_rollout(stage="train") -> RolloutBatch:
    N, T = 4, 5
    prompts = PromptBatch(
        input_ids=torch.zeros(2, 3, dtype=torch.long),
        attention_mask=torch.ones(2, 3, dtype=torch.long),
        pixel_values=torch.zeros(8, 4),
        image_grid_thw=torch.tensor([[1, 2, 2], [1, 2, 2]]),
        image_counts=[1, 1],
        prompts=["<|im_start|>user\nWhich | one? </details>\n# not a heading<|im_end|>", "```\nprompt two\n```"],
        columns={"solution": ["A | </details> `x`", "B\n# H"]},
    )
    rollout = RolloutBatch(
        prompts=prompts,
        num_generations=2,
        completion_ids=torch.arange(N * T).reshape(N, T),
        completion_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
        completions=list(ADVERSARIAL),
        stage=stage,
        replayed=torch.tensor([False, False, True, False]),
        reward_names=["accuracy", "format"],
        rewards_per_func=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]),
    )
    rollout.rewards = rollout.rewards_per_func.sum(-1)  # [1, 0, 2, 1]
    rollout.advantages = torch.tensor([0.7, -0.7, 0.7, -0.7])
    rollout.token_weights = torch.tensor([[1.5, 0.5, 1.0, 2.0, 1.0], [0.8, 1.2, 1.0, 1.0, 1.0], [1.0] * 5, [1.0] * 5])
    text = torch.tensor([[[0.6, 0.6, 0.6, 0.6]] * 4] * 4)  # [L=4, N=4, R=4]
    vision = torch.tensor([[[0.2, 0.2, 0.2, 0.2]] * 4] * 4)
    rows = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    captured = CapturedAttention(
        text * rows,
        vision * rows,
        rows,
        torch.tensor([10] * 4),
        torch.tensor([2, 2, 2, 0]),
        torch.ones(4, 4, dtype=torch.bool),
    )
    rollout.annotations["attention"] = attention_report(captured)
    return rollout


def parse(document: str):
    return markdown_it.MarkdownIt("commonmark").enable("table").parse(document)


def headings(tokens) -> list[str]:
    return [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]


def test_model_text_stays_inside_its_sample():
    log = MarkdownRolloutLog(samples_per_step=4, completion_preview_chars=None, prompt_preview_chars=None)
    document = "# Rollouts\n\n" + log.render_step(adversarial_rollout(), 3, {"loss": 0.25}, FakeTokenizer())
    tokens = parse(document)
    # only the document's own headings: no completion, prompt or solution adds one
    assert headings(tokens) == ["Rollouts", "Step 3", "Attention (VGR / AEI)", "Token Weights", "Samples"]
    # the only HTML blocks are the samples' own <details> wrappers, balanced
    html_blocks = [t.content.strip() for t in tokens if t.type == "html_block"]
    assert [b.startswith("<details><summary>Sample ") for b in html_blocks] == [True, False] * 4
    assert html_blocks[1::2] == ["</details>"] * 4
    # every completion is the content of a code block, whole (control characters shown, \r\n as \n)
    fences = [t.content for t in tokens if t.type == "fence"]
    for completion in ADVERSARIAL:
        expected = completion.replace("\r\n", "\n").replace("\x00", "\\x00").replace("\x1b", "\\x1b")
        assert expected + "\n" in fences
    # tables keep their columns: the per-sample table has 5 cells per row whatever the solution says
    rows_cells, count = [], 0
    for t in tokens:
        if t.type == "tr_open":
            count = 0
        elif t.type in ("td_open", "th_open"):
            count += 1
        elif t.type == "tr_close":
            rows_cells.append(count)
    assert rows_cells.count(5) == 2 * 4  # header + values of each sample's table
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(document)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "A | &lt;/details&gt;" in html  # the solution cell, escaped and whole


def test_the_overall_segment_and_token_weight_tables_hold_the_numbers():
    document = MarkdownRolloutLog().render_step(adversarial_rollout(), 3, None, FakeTokenizer())
    # rewards per function: accuracy [1, 0, 1, 0] -> mean 0.5, std (unbiased) 0.577; total [1, 0, 2, 1] -> 1.0 ± 0.816
    assert "| reward accuracy | 0.500 ± 0.577 |" in document
    assert "| total reward | 1.000 ± 0.816 |" in document
    # success = accuracy 1 and format 1: only row 2
    assert "| accuracy rate | 0.500 |" in document and "| success rate | 0.250 |" in document
    # every layer and generation row: text 0.6, vision 0.2, so a row with R rows has A_T = 0.6 R, A_V = 0.2 R:
    # VGR = (0.6R/10) / (0.2R/2) = 0.6, AEI_text = (0.75)/(10/12) = 0.9, AEI_vision = 0.25/(2/12) = 1.5,
    # vision ratio 1/1.6 = 0.625, in every segment; row 3 (no generation rows) is skipped: 3 usable rows
    assert "| late | 0.600 ± 0.000 | 0.900 ± 0.000 | 1.500 ± 0.000 | 0.625 ± 0.000 | 3 |" in document
    # token weights over valid, non-replayed tokens: row 0 (5 tokens), row 1 (3), row 3 (1):
    # [1.5, 0.5, 1, 2, 1, 0.8, 1.2, 1, 1] -> mean 10/9, std 0.428, min 0.5, max 2.0, 3/9 above 1, 2/9 below 1
    assert "| 1.111 | 0.428 | 0.500 | 2.000 | 0.333 | 0.222 |" in document


def test_files_every_n_steps_the_eval_counterpart_and_rank_zero_only(tmp_path):
    log = MarkdownRolloutLog(
        dirpath=str(tmp_path),
        every_n_steps=2,
        samples_per_step=1,
        eval_samples=2,
        token_weight_samples=2,
        token_preview=3,
    )
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=0, log_dir=None, default_root_dir=str(tmp_path), sanity_checking=False
    )
    module = SimpleNamespace(tokenizer=FakeTokenizer())
    log.setup(trainer, module, "fit")
    for step in range(3):
        trainer.global_step = step + 1
        log.on_rollout_update_end(trainer, module, adversarial_rollout(), UpdateResult(False, loss=torch.tensor(0.1)))
    rollouts = (tmp_path / "rollout_results.md").read_text()
    assert headings(parse(rollouts)).count("Samples") == 2
    assert "## Step 1\n" in rollouts and "## Step 3\n" in rollouts and "## Step 2\n" not in rollouts
    token_file = (tmp_path / "token_weights.md").read_text()
    lists = [json.loads(t.content) for t in parse(token_file) if t.type == "fence"]
    # rows 0 and 2 of each logged step, first 3 tokens: token(weight)
    assert lists[0] == ["`(1.500)", "|(0.500)", "</details>(1.000)"] and len(lists) == 4
    log.on_validation_epoch_start(trainer, module)
    for _ in range(2):
        log.on_rollout_scored(trainer, module, adversarial_rollout(stage="val"))
    log.on_validation_epoch_end(trainer, module)
    evaluation = (tmp_path / "eval_results.md").read_text()
    assert "## Eval, step 3" in evaluation and "| rows | 8 |" in evaluation  # both batches in the tables
    assert [t.content.strip().startswith("<details>") for t in parse(evaluation) if t.type == "html_block"].count(
        True
    ) == 2
    assert log.seconds > 0
    # another rank writes nothing
    other = MarkdownRolloutLog(dirpath=str(tmp_path / "rank1"))
    rank1 = SimpleNamespace(**{**vars(trainer), "is_global_zero": False})
    other.setup(rank1, module, "fit")
    other.on_rollout_update_end(rank1, module, adversarial_rollout(), UpdateResult(False))
    assert not (tmp_path / "rank1").exists()


def test_escaping_helpers():
    assert fence("a ``` b ```` c") == "`````text\na ``` b ```` c\n`````\n"
    assert fence("plain") == "```text\nplain\n```\n"
    assert cell("a|b\n<i>c</i> `d`") == "a\\|b &lt;i&gt;c&lt;/i&gt; \\`d\\`"
