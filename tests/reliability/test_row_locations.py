"""Every message about a row names the parquet file and the row in it, numbered as ``data_prep validate`` numbers
it (from 0 within its own file), whether the rows were split into train and held-out parts or not: a ``BadRow``,
a ``RewardError``, the non-finite faults of a skipped step and the Markdown log's samples."""

from __future__ import annotations

import io
import math

import pytest
import torch
from datasets import Dataset
from PIL import Image

from dapo_lightning.batch import PromptBatch, RolloutBatch, SourceRow
from dapo_lightning.callbacks.markdown_render import sample_block
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.data import rows as mcq
from dapo_lightning.data_prep.validate import validate
from dapo_lightning.guards import Fault, rollout_faults
from dapo_lightning.rewards.registry import RewardSpec
from dapo_lightning.scoring import RewardError, score


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def numbered_rows(count: int, bad: int = -1) -> list[dict]:
    """``count`` rows whose problems say their own parquet row; row ``bad`` has the solution "Z" (not a letter)."""
    return [{"image": {"bytes": png(), "path": None}, "problem": f"Question {r}?\nA: red\nB: blue",
             "solution": "Z" if r == bad else "B"} for r in range(count)]


def write(path, rows):
    Dataset.from_list(rows, features=mcq.mcq_features()).to_parquet(str(path))
    return path


def first_error(module: VisualMCQDataModule) -> tuple[str, mcq.BadRow]:
    """The loader ("train" or "val") that reaches the bad row first, and the BadRow it raises."""
    for name, loader in (("train", module.train_dataloader()), ("val", module.val_dataloader())):
        try:
            for _ in loader:
                pass
        except mcq.BadRow as error:
            return name, error
    raise AssertionError("no loader raised")


# split 7:3 with seed 42, parquet rows 5, 6 and 0 are held out, in that order; row 9 is the train part's 5th row
@pytest.mark.parametrize(("bad", "split"), [(0, "val"), (5, "val"), (9, "train")])
@pytest.mark.reliability("Untrusted input", "A bad row (parquet row {bad}) in a file split into train and held-out "
                         "parts (data.eval_path unset)",
                         "BadRow names the file and the same row number data_prep validate names")
def test_a_bad_row_is_named_by_its_parquet_row_as_validate_names_it(tmp_path, tiny_model_dir, bad, split):
    path = write(tmp_path / "numbered.parquet", numbered_rows(10, bad))
    module = VisualMCQDataModule(train_path=str(path), processor=str(tiny_model_dir), eval_ratio=0.3, batch_size=1)
    module.setup("fit")
    assert module.eval_table["problem"] == [f"Question {r}?\nA: red\nB: blue" for r in (5, 6, 0)]
    expected = f"{path}: row {bad}: solution 'Z' is not a letter A-J"
    assert validate(path).examples[mcq.BAD_SOLUTION] == [expected]  # validate numbers rows from 0
    found_in, error = first_error(module)
    assert found_in == split and str(error) == expected and (error.source, error.row) == (str(path), bad)


def test_every_batch_names_the_parquet_row_of_each_prompt(tmp_path, tiny_model_dir):
    path = write(tmp_path / "numbered.parquet", numbered_rows(10))
    module = VisualMCQDataModule(train_path=str(path), processor=str(tiny_model_dir), eval_ratio=0.3, batch_size=7)
    module.setup("fit")
    for loader in (module.train_dataloader(), module.val_dataloader()):
        for batch in loader:
            # the problem of each prompt says its parquet row: "Question 5?" comes from row 5
            said = [int(p.split("?")[0].removeprefix("Question ")) for p in batch.columns["problem"]]
            assert batch.source_rows == [SourceRow(str(path), r) for r in said] and len(set(said)) == len(said)
    held_out = next(iter(module.val_dataloader()))
    assert held_out.index == [0, 1, 2] and [r.row for r in held_out.source_rows] == [5, 6, 0]  # positions vs rows


def rollout_of(source_rows: list[SourceRow], G: int = 2) -> RolloutBatch:
    B = len(source_rows)
    prompts = PromptBatch(input_ids=torch.zeros(B, 2, dtype=torch.long),
                          attention_mask=torch.ones(B, 2, dtype=torch.long),
                          pixel_values=torch.zeros(B, 1), image_grid_thw=torch.tensor([[1, 1, 1]] * B),
                          image_counts=[1] * B, prompts=[f"p{b}" for b in range(B)],
                          columns={"solution": ["A"] * B}, index=list(range(B)), source_rows=source_rows)
    return RolloutBatch(prompts=prompts, num_generations=G, completion_ids=torch.ones(B * G, 2, dtype=torch.long),
                        completion_mask=torch.ones(B * G, 2, dtype=torch.long),
                        completions=[f"c{i}" for i in range(B * G)], reward_names=["r"],
                        reward_weights=torch.ones(1))


WHERE = [SourceRow("a.parquet", 17), SourceRow("b.parquet", 3)]
IN_FOLDERS = [SourceRow("/data/run 1/a.parquet", 17), SourceRow("someone/mcq[train]", 3)]


@pytest.mark.reliability("Faults", "A reward that raises on the second prompt's sample (on_reward_error: raise)",
                         "RewardError names the parquet file and row of the sample's question")
def test_a_reward_error_names_the_parquet_row_of_its_question():
    fails_on_c3 = RewardSpec("fails_on_c3", lambda cs, **kw: [1 / 0 if c == "c3" else 1.0 for c in cs])
    with pytest.raises(RewardError) as error:
        score(rollout_of(WHERE), [fails_on_c3], scale_rewards="group")
    assert str(error.value).startswith("reward 'fails_on_c3' raised ZeroDivisionError: division by zero on sample 3 "
                                       "(from b.parquet: row 3); completion 'c3'.")


@pytest.mark.reliability("Faults", "A non-finite reward in rows of two questions from two parquet files",
                         "the fault names the rollout rows, then each file with its rows")
def test_a_non_finite_fault_names_the_parquet_rows_of_its_questions():
    rollout = rollout_of([SourceRow("b.parquet", 3), SourceRow("a.parquet", 17), SourceRow("b.parquet", 1)])
    nan_on_1_and_5 = RewardSpec("nan_on_1_and_5", lambda cs, **kw: [math.nan if c in ("c1", "c5") else 1.0 for c in cs])
    score(rollout, [nan_on_1_and_5], scale_rewards="group")
    # rows 1 and 5: groups 0 and 2 (G = 2), the questions b.parquet rows 3 and 1, listed by file, rows in order
    assert [f.describe() for f in rollout.faults] == [
        "rewards/nan_on_1_and_5 at rows [1, 5] (from b.parquet: rows [1, 3])"]
    rollout.advantages[2] = math.inf  # row 2: group 1, the question a.parquet row 17
    assert [f.describe() for f in rollout_faults(rollout)] == ["advantages at rows [2] (from a.parquet: rows [17])"]
    two_files = Fault("loss", (0, 2, 3)).located(WHERE, num_generations=2)
    assert two_files.describe() == "loss at rows [0, 2, 3] (from a.parquet: rows [17]; b.parquet: rows [3])"
    assert Fault("loss", (2,)).located([40, 41], 2).describe() == "loss at rows [2] (dataset rows [41])"  # positions


@pytest.mark.reliability("Untrusted input", "A logged sample in the Markdown rollout log",
                         "its summary names the rollout row, the group and the parquet file and row of its question")
def test_a_markdown_sample_names_the_rollout_row_and_the_parquet_row():
    rollout = rollout_of(IN_FOLDERS)
    rollout.rewards, rollout.advantages = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.5, -0.5, 0.0, 0.0])
    block = sample_block(rollout, 3, 2, tokenizer=None, prompt_chars=None, completion_chars=None)
    assert block.startswith("<details><summary>Sample 2: rollout row 3, group 1 (from someone/mcq[train]: row 3), "
                            "total reward 1.000, advantage 0.000</summary>")
    block = sample_block(rollout, 0, 1, tokenizer=None, prompt_chars=None, completion_chars=None)
    # a file by its name: the log reads the same wherever the data lies (data.train_path says where)
    assert block.startswith("<details><summary>Sample 1: rollout row 0, group 0 (from a.parquet: row 17), total "
                            "reward 1.000, advantage 0.500</summary>")
    rollout.prompts.source_rows = []  # a batch built without them: no parquet row to name
    block = sample_block(rollout, 3, 2, tokenizer=None, prompt_chars=None, completion_chars=None)
    assert block.startswith("<details><summary>Sample 2: rollout row 3, group 1, total reward 1.000")
