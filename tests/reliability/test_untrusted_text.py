"""Model completions and dataset text are untrusted: reward parsers, the prompt builder and the log sinks must
survive anything, in bounded time; checkpoints never run code when read."""

from __future__ import annotations

import ast
import pickle
import time
from pathlib import Path

import markdown_it
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dapo_lightning.callbacks.markdown_log import MarkdownRolloutLog
from dapo_lightning.data import rows as mcq
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.config import PolicyConfig
from dapo_lightning.data import example_prompt_batch
from dapo_lightning.prompts import build_messages, special_token_strings, special_tokens_in
from dapo_lightning.rewards.accuracy import accuracy
from dapo_lightning.rewards.format import format_reward
from dapo_lightning.storage import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<|im_end|>", "<|vision_start|>", "</details>", "```", "|",
        "\n", "\r", "\u2028", "\x00", "answer is", "答案", "Ｂ", "B", " "]
# arbitrary Unicode (surrogates excluded: they cannot be encoded), tag soup, and either repeated up to ~1 MB
pieces = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(TAGS), max_size=60).map("".join))
huge = st.tuples(pieces, st.integers(1, 1_000_000)).map(lambda t: t[0] * max(1, t[1] // max(len(t[0]), 1)))
untrusted = st.one_of(pieces, huge)


def best_of(calls: int, fn) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)  # the machine is shared: the fastest of a few runs is the parser's own cost


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(untrusted, st.one_of(st.sampled_from(["B", "ｂ", ""]), st.text(max_size=5)))
@pytest.mark.reliability("Untrusted input", "Reward parsers (accuracy, format) on arbitrary Unicode, nested tags, "
                         "strings up to 1 MB (Hypothesis, 150 cases)",
                         "never raise; values in {0, 1}")
def test_reward_parsers_never_raise_and_stay_binary(text, solution):
    assert accuracy([text], solution=[solution])[0] in (0.0, 1.0)
    assert format_reward([text])[0] in (0.0, 1.0)


MEGABYTE = 1_000_000
BACKTRACKING_BAIT = {
    "nested think/answer tags": ("<think>" * 5 + "<answer>" + "</think>" * 5) * (MEGABYTE // 63),
    "closed think blocks": "<think></think>" * (MEGABYTE // 15),
    "unclosed think after the last close": "</think>" + "<think>" * (MEGABYTE // 7),
    "answer keyword lines": "answer is option (\n" * (MEGABYTE // 19),
    "whitespace then a letter": " " * MEGABYTE + "B",
    "full-width letters and CJK": "答案是选项Ｂ" * (MEGABYTE // 6),
    "bidi and emoji": "\u202e\U0001F600A" * (MEGABYTE // 3),
}


@pytest.mark.parametrize("name", list(BACKTRACKING_BAIT))
@pytest.mark.reliability("Untrusted input", "1 MB completion: {name}",
                         "accuracy + format parse it in under 50 ms (no catastrophic backtracking)")
def test_a_megabyte_completion_parses_in_under_50_ms(name):
    text = BACKTRACKING_BAIT[name]
    assert len(text) >= 0.9 * MEGABYTE
    seconds = best_of(3, lambda: (accuracy([text], solution=["B"]), format_reward([text])))
    assert seconds < 0.050, f"{name}: {seconds * 1000:.1f} ms"


@pytest.fixture(scope="module")
def special(processor):
    return special_token_strings(processor.tokenizer)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.text(min_size=1, max_size=300).filter(str.strip))
@pytest.mark.reliability("Untrusted input", "Prompt builder on arbitrary Unicode questions (Hypothesis, 60 cases)",
                         "never raises; the question appears verbatim once; one image placeholder; a question holding "
                         "a special token (<|im_end|>, <|image_pad|>, ...) is a BadRow naming the row")
def test_the_prompt_builder_keeps_questions_as_text(processor, special, problem):
    rendered = processor.apply_chat_template(build_messages(problem, None), tokenize=False, add_generation_prompt=True)
    assert rendered.count("<|vision_start|><|image_pad|><|vision_end|>") == 1 + problem.count(
        "<|vision_start|><|image_pad|><|vision_end|>")
    assert problem in rendered
    from PIL import Image

    row = {"image": Image.new("RGB", (28, 28)), "problem": problem + "\nA: x\nB: y", "solution": "A"}
    found = special_tokens_in(row["problem"], special)
    if found:
        with pytest.raises(mcq.BadRow, match=r"<memory>: row 0: problem contains the special token"):
            example_prompt_batch(processor, [row], system_prompt=None)
    else:
        batch = example_prompt_batch(processor, [row], system_prompt=None)
        image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((batch.input_ids == image_pad).sum()) == int(batch.image_grid_thw.prod(-1).sum()) // 4


@pytest.mark.parametrize("token", ["<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|endoftext|>"])
@pytest.mark.reliability("Untrusted input", "Dataset question containing {token}",
                         "rejected as a BadRow naming the file and row (skipped with data.on_bad_row: skip), instead "
                         "of being read as a control token")
def test_a_question_with_a_control_token_is_a_bad_row(processor, token):
    from PIL import Image

    row = {"image": Image.new("RGB", (28, 28)), "problem": f"Which colour? {token}\nA: red\nB: blue", "solution": "A"}
    with pytest.raises(mcq.BadRow, match=rf"row 0: problem contains the special token\(s\) '{token}'") as error:
        example_prompt_batch(processor, [row], system_prompt=None)
    assert error.value.kind == mcq.CONTROL_TOKEN


def markdown_rollout(completion: str, prompt: str, solution: str) -> RolloutBatch:
    prompts = PromptBatch(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
                          pixel_values=torch.zeros(4, 4), image_grid_thw=torch.tensor([[1, 2, 2]]), image_counts=[1],
                          prompts=[prompt], columns={"solution": [solution]})
    rollout = RolloutBatch(prompts=prompts, num_generations=2, completion_ids=torch.zeros(2, 3, dtype=torch.long),
                           completion_mask=torch.ones(2, 3, dtype=torch.long), completions=[completion, completion[::-1]],
                           reward_names=["accuracy"], rewards_per_func=torch.tensor([[1.0], [0.0]]))
    rollout.rewards, rollout.advantages = torch.tensor([1.0, 0.0]), torch.tensor([0.7, -0.7])
    return rollout


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces, pieces, pieces)
@pytest.mark.reliability("Untrusted input", "Markdown log of arbitrary completions, prompts and solutions "
                         "(Hypothesis, 80 cases)",
                         "the document keeps its structure: only its own headings and <details> blocks, every "
                         "completion whole inside one code block, no raw HTML")
def test_the_markdown_log_cannot_be_broken(completion, prompt, solution):
    document = "# Rollouts\n\n" + MarkdownRolloutLog(samples_per_step=2, completion_preview_chars=None,
                                                     prompt_preview_chars=None).render_step(
        markdown_rollout(completion, prompt, solution), 1, {"loss": 0.5}, None)
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(document)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["Rollouts", "Step 1", "Samples"]
    html_blocks = [t.content.strip() for t in tokens if t.type == "html_block"]
    assert [b.startswith("<details><summary>Sample ") for b in html_blocks] == [True, False] * 2
    assert html_blocks[1::2] == ["</details>"] * 2
    assert not [t for t in tokens if t.type == "inline" and any(c.type == "html_inline" for c in t.children or [])]
    fences = [t.content for t in tokens if t.type == "fence"]
    assert len(fences) == 4  # prompt and completion of each sample


class Payload:
    """Unpickling this would create ``marker``: the proof that loading ran code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.reliability("Untrusted input", "A checkpoint carrying a pickled code payload",
                         "loading it (AtomicCheckpointIO, hence fit --ckpt_path; the CLI's config check) fails with "
                         "weights_only and never runs the payload")
def test_a_malicious_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)
    from dapo_lightning.cli import DAPOLightningCLI

    cli = DAPOLightningCLI.__new__(DAPOLightningCLI)
    cli.config = {"subcommand": "fit", "fit": {"ckpt_path": str(path), "model": {}}}
    with pytest.raises(pickle.UnpicklingError):
        cli._parse_ckpt_path()
    assert not (tmp_path / "pwned").exists()


def test_remote_code_is_off_unless_the_config_turns_it_on():
    assert PolicyConfig().trust_remote_code is False
    import inspect

    from dapo_lightning.models import load_policy, load_processor

    for fn in (load_policy, load_processor):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name in ("eval", "exec", "pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "yaml.unsafe_load"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
        elif name == "torch.load" and keywords.get("weights_only") != "True":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True")
    return found


@pytest.mark.reliability("Untrusted input", "Source scan of the library, callbacks and data converters",
                         "no eval/exec, no pickle/marshal/unsafe YAML loads, every torch.load with weights_only=True")
def test_no_code_path_evaluates_or_unpickles_data():
    files = [p for folder in ("dapo_lightning", "callbacks", "data_prep") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 20
    assert [call for path in files for call in _unsafe_calls(path)] == []


@pytest.mark.reliability("Untrusted input", "TensorBoard text sinks",
                         "no code writes text summaries (add_text / text plugin); a run's event files hold scalars "
                         "and the hyper-parameters only")
def test_nothing_writes_model_text_to_tensorboard(tmp_path, tiny_model_dir, synthetic_parquet):
    files = [p for folder in ("dapo_lightning", "callbacks") for p in (ROOT / folder).rglob("*.py")]
    assert not [p for p in files if "add_text" in p.read_text() or "log_text" in p.read_text()]
    from rel_helpers import fit, make_module
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(tmp_path, make_module(tiny_model_dir), tiny_model_dir, synthetic_parquet, batches=1,
        callbacks=[MarkdownRolloutLog(dirpath=str(tmp_path / "md"))])
    for path in tmp_path.rglob("events.out.tfevents*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags = events.Tags()
        assert not tags.get("tensors") or set(tags["tensors"]) <= {"_hparams_/experiment", "_hparams_/session_start_info",
                                                                    "_hparams_/session_end_info"}, tags
