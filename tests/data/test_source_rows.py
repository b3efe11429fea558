"""Where each prompt comes from (``PromptBatch.source_rows``): the parquet file and its row there, for one file, a
folder of files, a hub dataset and the train/held-out split; kept by ``select`` and by groups (checkpoints too)."""

import io

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import row, set_up, write
from datasets import Dataset

from dapo_lightning.batch import PromptBatch, RolloutBatch, SourceRow
from dapo_lightning.data.rows import BAD_SOLUTION, BadRow, mcq_features
from dapo_lightning.groups import Group, assemble, take_group


def numbered(count: int, start: int = 0, bad: int = -1) -> list[dict]:
    """Rows whose problems say a number (``start``, ``start + 1``, ...); the row numbered ``bad`` has solution "Z"."""
    return [row(solution="Z" if n == bad else "B", problem=f"Question {n}?\nA: red\nB: blue")
            for n in range(start, start + count)]


def said(batch: PromptBatch) -> list[int]:
    return [int(p.split("?")[0].removeprefix("Question ")) for p in batch.columns["problem"]]


def test_the_split_is_the_one_datasets_makes(synthetic_parquet, tiny_model_dir):
    """The rows of each part, in order, are those ``train_test_split`` gave before parquet rows were tracked."""
    module = set_up(synthetic_parquet, tiny_model_dir)
    split = Dataset.from_parquet(str(synthetic_parquet)).train_test_split(test_size=0.1, seed=42)
    assert module.train_table["problem"] == split["train"]["problem"]
    assert module.eval_table["problem"] == split["test"]["problem"]
    in_file = pq.read_table(synthetic_parquet, columns=["problem"])["problem"].to_pylist()
    for table, locations in ((module.train_table, module.train_locations), (module.eval_table, module.eval_locations)):
        assert [in_file[locations.at(p).row] for p in range(len(table))] == table["problem"]
        assert {locations.at(p).file for p in range(len(table))} == {str(synthetic_parquet)}


def test_a_folder_numbers_rows_within_their_own_file(tmp_path, tiny_model_dir):
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "a.parquet", numbered(3))  # Question 0-2: rows 0-2 of a.parquet
    write(folder / "b.parquet", numbered(4, start=3, bad=5))  # Question 3-6: rows 0-3 of b.parquet
    module = set_up(folder, tiny_model_dir, eval_path=str(folder), batch_size=7)
    with pytest.raises(BadRow) as error:
        next(iter(module.val_dataloader()))
    assert str(error.value) == f"{folder / 'b.parquet'}: row 2: solution 'Z' is not a letter A-J"
    module = set_up(folder, tiny_model_dir, eval_path=str(folder), batch_size=7, on_bad_row="skip")
    batch = next(iter(module.val_dataloader()))
    a, b = str(folder / "a.parquet"), str(folder / "b.parquet")
    assert said(batch) == [0, 1, 2, 3, 4, 6]
    assert batch.source_rows == [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1), (b, 3)]
    assert [(e.kind, e.source, e.row) for e in batch.skipped] == [(BAD_SOLUTION, b, 2)]


def test_a_hub_dataset_names_its_split_and_row(monkeypatch, tiny_model_dir):
    hub = Dataset.from_list(numbered(5, bad=3), features=mcq_features())
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: hub)
    module = set_up_hub(tiny_model_dir, eval_ratio=0.4)
    rows = [module.eval_locations.at(p) for p in range(len(module.eval_table))]
    assert [r.file for r in rows] == ["someone/mcq[train]"] * 2
    assert [f"Question {r.row}?" for r in rows] == [p.split("\n")[0] for p in module.eval_table["problem"]]


def set_up_hub(tiny_model_dir, **kwargs):
    from dapo_lightning.data import VisualMCQDataModule

    module = VisualMCQDataModule(dataset_name="someone/mcq", processor=str(tiny_model_dir), **kwargs)
    module.setup("fit")
    return module


def test_a_file_that_is_not_parquet_is_named(tmp_path, tiny_model_dir):
    path = tmp_path / "notes.parquet"
    path.write_text("not parquet")
    with pytest.raises(ValueError, match=rf"^{path}: cannot be read as parquet \(ArrowInvalid: "):
        set_up(path, tiny_model_dir)


def prompts(index, source_rows) -> PromptBatch:
    B = len(index)
    return PromptBatch(input_ids=torch.arange(B * 2).reshape(B, 2), attention_mask=torch.ones(B, 2, dtype=torch.long),
                       pixel_values=torch.zeros(B, 1), image_grid_thw=torch.tensor([[1, 1, 1]] * B),
                       image_counts=[1] * B, prompts=[f"p{i}" for i in index], columns={"solution": ["A"] * B},
                       index=list(index), source_rows=list(source_rows))


def test_source_rows_travel_with_their_prompts_and_groups():
    where = [SourceRow("a.parquet", 17), SourceRow("b.parquet", 3)]
    batch = prompts([10, 11], where)
    assert batch.select([1, 1, 0]).source_rows == [where[1], where[1], where[0]]
    rollout = RolloutBatch(prompts=batch, num_generations=2, completion_ids=torch.ones(4, 2, dtype=torch.long),
                           completion_mask=torch.ones(4, 2, dtype=torch.long), completions=["a", "b", "c", "d"])
    group = take_group(rollout, 1)
    assert group.prompt.source_rows == [where[1]]
    state = group.state()
    assert state["prompt"]["source_rows"] == [("b.parquet", 3)]
    assert type(state["prompt"]["source_rows"][0]) is tuple  # plain values: a weights_only checkpoint loads them
    torch.save(state, buffer := io.BytesIO())
    buffer.seek(0)
    restored = Group.from_state(torch.load(buffer, weights_only=True))
    assert restored.prompt.source_rows == [where[1]] and isinstance(restored.prompt.source_rows[0], SourceRow)
    assemble(rollout, [restored, take_group(rollout, 0)], pad_id=0)
    assert rollout.prompts.source_rows == [where[1], where[0]] and rollout.prompts.index == [11, 10]


def test_a_group_stored_before_source_rows_existed_still_loads():
    batch = prompts([10, 11], [SourceRow("a.parquet", 17), SourceRow("b.parquet", 3)])
    rollout = RolloutBatch(prompts=batch, num_generations=2, completion_ids=torch.ones(4, 2, dtype=torch.long),
                           completion_mask=torch.ones(4, 2, dtype=torch.long), completions=["a", "b", "c", "d"])
    old = take_group(rollout, 0).state()
    del old["prompt"]["source_rows"]
    restored = Group.from_state(old)
    assert restored.prompt.index == [10] and restored.prompt.source_rows == []
    # with a group that has none, the rollout names no parquet rows (its positions still look rows up)
    assemble(rollout, [restored, take_group(rollout, 1)], pad_id=0)
    assert rollout.prompts.source_rows == [] and rollout.prompts.index == [10, 11]
