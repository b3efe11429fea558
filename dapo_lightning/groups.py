"""Groups: one prompt, its image, its G completions and everything computed for them.

The replay buffer and dynamic sampling rebuild a rollout from groups of other rollouts.
:func:`take_group` copies group ``g`` out of a rollout as a :class:`Group`, and
:func:`assemble` writes a list of groups back into a rollout, in place (the module and
the other callbacks hold that object), re-padding prompts on the left and completions on
the right. Because a group carries its own prompt side, its annotations and its faults,
a group can never be paired with another group's image or question, its per-row
annotations (``annotations.py``) always describe its own rows, and a NaN found in it
skips the step that trains on it, whichever rollout it came from.

A stored group (the replay buffer's) is checkpointed as plain tensors, strings and lists
(:meth:`Group.state`; Lightning reads checkpoints with ``weights_only=True``):

    {"prompt": {"input_ids": [1, P], "attention_mask": [1, P], "mm_token_type_ids": [1, P] | None,
                "pixel_values": [patches, D], "image_grid_thw": [images, 3], "image_counts": [1],
                "prompts": [1], "columns": {name: [1]}, "index": [1], "source_rows": [1] of (file, row)},
     "rows": {field: [G, T_g] or [G]},       # RolloutBatch.row_fields() that are set, T_g = the group's longest
     "completions": [G], "extras": {name: [G]}}   # extras: its RowValues annotations
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from dapo_lightning.annotations import Annotation, RowValues, concat_all, select_all
from dapo_lightning.batch import PromptBatch, RolloutBatch, SourceRow
from dapo_lightning.guards import Fault

_PAD_VALUE = {"completion_mask": 0, "old_logps": 0.0, "ref_logps": 0.0, "token_weights": 1.0}
_FILL_WHEN_MISSING = {"token_weights": 1.0, "replayed": False}


@dataclass
class Group:
    """One prompt with its G completions; moved whole between rollouts."""

    prompt: PromptBatch  # one prompt, its left padding trimmed, with its images
    completions: list[str]  # [G]
    rows: dict[str, Tensor]  # the RolloutBatch.row_fields() that are set: [G, T_g] or [G] ([G, K] rewards_per_func)
    annotations: dict[str, Annotation] = field(default_factory=dict)  # [G] each
    faults: tuple[Fault, ...] = ()  # NaN/inf found in its rows when it was scored; rows 0..G-1 of the group

    @property
    def num_generations(self) -> int:
        return len(self.completions)

    def for_storage(self) -> Group:
        """What the replay buffer keeps: no faults (that step was skipped), weights 1 (SPEC 6), RowValues only.

        Per-rollout diagnostics (the attention report, per-token masses) are not kept: a replayed
        row is never reweighted and its statistics describe a policy long gone.
        """
        rows = {k: v for k, v in self.rows.items() if k != "token_weights"}
        annotations = {k: v for k, v in self.annotations.items() if isinstance(v, RowValues)}
        prompt = replace(self.prompt, images=[])  # its rewards are scored: the pictures are not needed again
        return replace(self, prompt=prompt, rows=rows, annotations=annotations, faults=())

    def as_replayed(self) -> Group:
        """This group with its rows marked as replayed."""
        rows = dict(self.rows)
        rows["replayed"] = torch.ones(self.num_generations, dtype=torch.bool)
        rows.pop("token_weights", None)
        return replace(self, rows=rows)

    # --- checkpoints ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Plain values a ``weights_only`` checkpoint holds (the layout of the module docstring)."""
        prompt = self.prompt
        return {
            "prompt": {
                "input_ids": prompt.input_ids,
                "attention_mask": prompt.attention_mask,
                "mm_token_type_ids": prompt.mm_token_type_ids,
                "pixel_values": prompt.pixel_values,
                "image_grid_thw": prompt.image_grid_thw,
                "image_counts": list(prompt.image_counts),
                "prompts": list(prompt.prompts),
                "columns": {k: _plain_column(v) for k, v in prompt.columns.items()},
                "index": list(prompt.index),
                "source_rows": [(str(file), int(row)) for file, row in prompt.source_rows],  # plain tuples
            },
            "rows": dict(self.rows),
            "completions": list(self.completions),
            "extras": {k: v.values for k, v in self.annotations.items() if isinstance(v, RowValues)},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Group:
        p = state["prompt"]
        prompt = PromptBatch(
            input_ids=p["input_ids"], attention_mask=p["attention_mask"], mm_token_type_ids=p["mm_token_type_ids"],
            pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"], image_counts=list(p["image_counts"]),
            prompts=list(p["prompts"]), columns=dict(p["columns"]), index=list(p["index"]),
            source_rows=[SourceRow(*r) for r in p.get("source_rows", ())],  # absent from groups stored before them
        )
        annotations = {k: RowValues(v) for k, v in (state.get("extras") or {}).items()}
        return cls(prompt=prompt, completions=list(state["completions"]), rows=dict(state["rows"]),
                   annotations=annotations)


def _plain_column(value: Any) -> Any:
    """Dataset column values as checkpoint-safe primitives."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_column(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_column(v) for k, v in value.items()}
    return str(value)


def _move(t: Tensor | None, device, dtype=None) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)


def take_group(rollout: RolloutBatch, g: int, *, device=None, pixel_dtype: torch.dtype | None = None) -> Group:
    """Group ``g`` of ``rollout``, copied (``device`` None keeps it where it is).

    ``pixel_dtype`` stores the image features in the policy's dtype (what the model sees anyway).
    """
    G = rollout.num_generations
    start, stop = g * G, (g + 1) * G
    prompt = rollout.prompts.select([g])  # left padding trimmed to this prompt
    device = device if device is not None else rollout.completion_ids.device
    width = max(int(rollout.completion_mask[start:stop].sum(-1).max()), 1)
    rows: dict[str, Tensor] = {}
    for name in RolloutBatch.row_fields():
        value = getattr(rollout, name)
        if value is None:
            continue
        value = value[start:stop]
        if value.dim() == 2 and name != "rewards_per_func":
            value = value[:, :width]
        rows[name] = value.detach().to(device).clone()
    own_rows = torch.arange(start, stop, device=rollout.completion_ids.device)  # [G]
    prompt = replace(
        prompt,
        input_ids=prompt.input_ids.to(device).clone(),
        attention_mask=prompt.attention_mask.to(device).clone(),
        mm_token_type_ids=None if prompt.mm_token_type_ids is None else prompt.mm_token_type_ids.to(device).clone(),
        pixel_values=_move(prompt.pixel_values.detach(), device, pixel_dtype).clone(),
        image_grid_thw=prompt.image_grid_thw.to(device).clone(),
        columns={k: _plain_column(v) for k, v in prompt.columns.items()},
    )
    question = rollout.prompts.locations()[g : g + 1]
    faults = tuple(f.within(start, stop).located(question, G) for f in rollout.faults if f.touches(start, stop))
    return Group(prompt=prompt, completions=list(rollout.completions[start:stop]), rows=rows,
                 annotations=select_all(rollout.annotations, own_rows), faults=faults)


def _left_pad(t: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)


def _right_pad(t: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def assemble(rollout: RolloutBatch, groups: Sequence[Group], *, pad_id: int) -> None:
    """Make ``rollout`` hold exactly ``groups``, in that order (in place).

    Everything per prompt and per row comes from the groups, and so do the faults (a group
    that leaves takes its faults with it); the rollout keeps its stage, origin, G, reward
    names and weights, timings, sampled statistics and reward-error counts.
    """
    if not groups:
        raise ValueError("assemble: no groups")
    G = rollout.num_generations
    device = rollout.completion_ids.device
    pixel_dtype = rollout.prompts.pixel_values.dtype
    prompts = [group.prompt for group in groups]

    # prompt side: left-pad to the longest prompt
    P = max(p.input_ids.shape[1] for p in prompts)
    with_mm = [p.mm_token_type_ids is not None for p in prompts]
    if any(with_mm) and not all(with_mm):
        raise ValueError("assemble: groups with and without mm_token_type_ids cannot share a rollout")
    columns = {key: [v for p in prompts for v in p.columns.get(key, [None])] for key in prompts[0].columns}
    rollout.prompts = PromptBatch(
        input_ids=torch.cat([_left_pad(p.input_ids.to(device), P, pad_id) for p in prompts]),
        attention_mask=torch.cat([_left_pad(p.attention_mask.to(device), P, 0) for p in prompts]),
        mm_token_type_ids=torch.cat([_left_pad(p.mm_token_type_ids.to(device), P, 0) for p in prompts])
        if all(with_mm)
        else None,
        pixel_values=torch.cat([p.pixel_values.to(device=device, dtype=pixel_dtype) for p in prompts]),
        image_grid_thw=torch.cat([p.image_grid_thw.to(device) for p in prompts]),
        image_counts=[n for p in prompts for n in p.image_counts],
        prompts=[t for p in prompts for t in p.prompts],
        columns=columns,
        index=[i for p in prompts for i in p.index],
        # a group stored before source_rows existed has none: then the rollout names positions, not file rows
        source_rows=[r for p in prompts for r in p.source_rows] if all(p.source_rows for p in prompts) else [],
        images=[i for p in prompts for i in p.images] if all(p.images for p in prompts) else [],
        num_skipped=rollout.prompts.num_skipped,
        num_resized=rollout.prompts.num_resized,
    )

    # row side: right-pad to the longest completion
    T = max(group.rows["completion_ids"].shape[1] for group in groups)
    for name in RolloutBatch.row_fields():
        present = [name in group.rows for group in groups]
        if not any(present):
            setattr(rollout, name, None)
            continue
        parts = []
        for group in groups:
            value = group.rows.get(name)
            if value is None:
                if name not in _FILL_WHEN_MISSING:
                    raise ValueError(f"assemble: a group has no {name} while others do; they cannot share a rollout")
                like = next(g.rows[name] for g in groups if name in g.rows)
                shape = (G, T) if like.dim() == 2 else (G, *like.shape[1:])
                value = torch.full(shape, _FILL_WHEN_MISSING[name], dtype=like.dtype)
            value = value.to(device)
            if value.dim() == 2 and name != "rewards_per_func":
                pad = pad_id if name == "completion_ids" else _PAD_VALUE.get(name, 0)
                value = _right_pad(value, T, pad)
            parts.append(value)
        setattr(rollout, name, torch.cat(parts))
    rollout.completions = [c for group in groups for c in group.completions]
    # per-row annotations: joined; a group without one gets a blank (a stored group keeps only RowValues)
    rollout.annotations = concat_all([group.annotations for group in groups], [G] * len(groups))
    rollout.faults = [fault.shifted(k * G) for k, group in enumerate(groups) for fault in group.faults]
