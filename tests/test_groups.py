"""Groups move whole: prompt side, rows, per-row annotations and faults (``groups.py``, ``annotations.py``)."""

from __future__ import annotations

import io
import math

import torch

from dapo_lightning.annotations import RowValues, concat_all
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.groups import Group, assemble, take_group
from dapo_lightning.guards import Fault

PAD = 0
G = 2


def two_group_rollout() -> RolloutBatch:
    """B = 2 prompts (the first shorter, left-padded), G = 2 completions each (right-padded), by hand.

    prompt 0: [pad, 5, 6] with 1 image of 2 patches; prompt 1: [7, 8, 9] with 1 image of 4 patches.
    rows 0, 1 (group 0): completions [11, 12, eos] and [13, pad, pad]; rows 2, 3 (group 1): [21, 22, 23], [24, 25, pad].
    """
    prompts = PromptBatch(
        input_ids=torch.tensor([[PAD, 5, 6], [7, 8, 9]]),
        attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        pixel_values=torch.arange(6 * 2, dtype=torch.float32).view(6, 2),  # [2 + 4 patches, D = 2]
        image_grid_thw=torch.tensor([[1, 1, 2], [1, 2, 2]]),
        image_counts=[1, 1],
        mm_token_type_ids=torch.tensor([[0, 1, 0], [0, 1, 1]]),
        prompts=["p0", "p1"],
        columns={"solution": ["A", "B"]},
        index=[10, 11],
    )
    rollout = RolloutBatch(
        prompts=prompts,
        num_generations=G,
        completion_ids=torch.tensor([[11, 12, 99], [13, PAD, PAD], [21, 22, 23], [24, 25, PAD]]),
        completion_mask=torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0]]),
        completions=["a", "b", "c", "d"],
        truncated=torch.tensor([False, False, True, False]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        advantages=torch.tensor([0.5, -0.5, 0.0, 0.0]),
        replayed=torch.zeros(4, dtype=torch.bool),
        annotations={"vgr": RowValues([0.1, 0.2, 0.3, math.nan])},
    )
    rollout.faults = [Fault("rewards/r", (3,)).located(prompts.index, G)]  # group 1, its row 1
    return rollout


def test_row_values_select_blank_and_concat_by_hand():
    values = RowValues([1.0, None, 3.0])
    assert values.num_rows == 3 and math.isnan(values.tolist()[1])
    assert values.select(torch.tensor([2, 0, 0])).tolist() == [3.0, 1.0, 1.0]
    assert all(math.isnan(v) for v in values.blank(2).tolist())
    joined = concat_all([{"vgr": values}, {}], [3, 2])  # the second block has none: blanks
    assert joined["vgr"].tolist()[:3:2] == [1.0, 3.0] and all(math.isnan(v) for v in joined["vgr"].tolist()[3:])


def test_a_group_carries_its_prompt_rows_annotations_and_faults():
    rollout = two_group_rollout()
    group = take_group(rollout, 1)
    assert group.prompt.input_ids.tolist() == [[7, 8, 9]] and group.prompt.index == [11]
    assert group.prompt.pixel_values.shape == (4, 2)  # its own image's 4 patches
    assert group.rows["completion_ids"].tolist() == [[21, 22, 23], [24, 25, PAD]]
    assert group.annotations["vgr"].tolist()[0] == 0.3 and math.isnan(group.annotations["vgr"].tolist()[1])
    assert group.faults == (Fault("rewards/r", (1,), dataset_rows=(11,)),)  # rows of the group, its prompt's row
    assert take_group(rollout, 0).faults == ()


def test_assemble_reorders_whole_groups_and_their_faults():
    rollout = two_group_rollout()
    groups = [take_group(rollout, 1), take_group(rollout, 0)]
    assemble(rollout, groups, pad_id=PAD)
    assert rollout.prompts.index == [11, 10] and rollout.prompts.prompts == ["p1", "p0"]
    assert rollout.prompts.input_ids.tolist() == [[7, 8, 9], [PAD, 5, 6]]  # left padding redone
    assert rollout.prompts.pixel_values[:4].tolist() == torch.arange(4, 12.0).view(4, 2).tolist()  # group 1's image
    assert rollout.completion_ids.tolist() == [[21, 22, 23], [24, 25, PAD], [11, 12, 99], [13, PAD, PAD]]
    assert rollout.completions == ["c", "d", "a", "b"] and rollout.advantages.tolist() == [0.0, 0.0, 0.5, -0.5]
    assert rollout.annotations["vgr"].tolist()[2:] == [0.1, 0.2]
    assert rollout.faults == [Fault("rewards/r", (1,), dataset_rows=(11,))]  # it moved with its group
    assemble(rollout, [take_group(rollout, 1), take_group(rollout, 1)], pad_id=PAD)
    assert rollout.faults == []  # the group with the fault left the batch: its faults left with it


def test_a_stored_group_round_trips_a_weights_only_checkpoint_and_replays_with_weight_one():
    rollout = two_group_rollout()
    rollout.token_weights = torch.full((4, 3), 2.0)
    stored = take_group(rollout, 1).for_storage()
    assert stored.faults == () and "token_weights" not in stored.rows  # replayed rows are not reweighted (SPEC 6)
    buffer = io.BytesIO()
    torch.save(stored.state(), buffer)
    buffer.seek(0)
    restored = Group.from_state(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.prompt.pixel_values, stored.prompt.pixel_values)
    assert restored.annotations["vgr"].tolist()[0] == 0.3
    fresh = two_group_rollout()
    fresh.token_weights = torch.full((4, 3), 3.0)
    fresh.annotations["attention"] = RowValues([5.0, 6.0, 7.0, 8.0])  # stands in for a richer annotation
    kept = take_group(fresh, 0)
    kept.annotations.pop("attention")  # as if the stored group lacked it
    assemble(fresh, [take_group(fresh, 0), restored.as_replayed()], pad_id=PAD)
    assert fresh.replayed.tolist() == [False, False, True, True]
    assert (fresh.token_weights[:2] == 3.0).all() and (fresh.token_weights[2:] == 1.0).all()
    assert fresh.annotations["attention"].tolist()[:2] == [5.0, 6.0]
    assert all(math.isnan(v) for v in fresh.annotations["attention"].tolist()[2:])  # blank for the stored group
