"""Moving whole groups between rollouts: one prompt, its image, its G completions and everything computed for them.

The replay buffer and dynamic sampling both rebuild a rollout from groups of other
rollouts. A group is taken out as a *record*, a dict of plain tensors, strings and
lists (checkpoint-safe: Lightning reads checkpoints with ``weights_only=True``):

    {"prompt": {"input_ids": [1, P], "attention_mask": [1, P], "mm_token_type_ids": [1, P] | None,
                "pixel_values": [patches, D], "image_grid_thw": [images, 3], "image_counts": [1],
                "prompts": [1], "columns": {name: [1]}, "index": [1]},
     "rows": {field: [G, T_g] or [G]},       # RolloutBatch.row_fields() that are set, T_g = the group's longest
     "completions": [G], "extras": {key: [G]}}

and :func:`assemble` writes a list of records back into a rollout, in place (the module
and the other callbacks hold that object), re-padding prompts on the left and
completions on the right. Because the prompt side travels inside the record, a
group can never be paired with another group's image or question.

Per-row annotations in ``rollout.extras`` (lists, tuples or tensors with one entry per
row) move with their groups. Any other ``extras`` value (an object indexed by the old
rows) is dropped when a rollout is reassembled, since it would describe the wrong rows;
a callback whose annotations must survive replay and dynamic sampling stores them per
row. For the same reason a callback that reads such an object (token weights from
captured attention) must run before the callbacks that move groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dapo_lightning.batch import PromptBatch, RolloutBatch

# Callbacks that read rollout-level objects by row position, so they must see a rollout before groups move.
READ_BY_ROW_POSITION = ("TokenWeights",)


def check_runs_after_row_readers(trainer, mover) -> None:
    """Raise if a callback of :data:`READ_BY_ROW_POSITION` is listed after ``mover`` in ``trainer.callbacks``."""
    callbacks = list(trainer.callbacks)
    for callback in callbacks[callbacks.index(mover) + 1 :]:
        name = type(callback).__name__
        if name in READ_BY_ROW_POSITION:
            raise ValueError(
                f"trainer.callbacks: list {name} before {type(mover).__name__} ({name} reads each rollout's own "
                f"attention capture by row position; {type(mover).__name__} moves groups between rollouts)"
            )


_PAD_VALUE = {"completion_mask": 0, "old_logps": 0.0, "ref_logps": 0.0, "token_weights": 1.0}
_FILL_WHEN_MISSING = {"token_weights": 1.0, "replayed": False}


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


def per_row_extras(rollout: RolloutBatch) -> list[str]:
    """Keys of ``rollout.extras`` holding one value per row (a list, tuple or tensor of length N)."""
    n = rollout.num_rows
    keys = []
    for key, value in rollout.extras.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
            keys.append(key)
        elif isinstance(value, (list, tuple)) and len(value) == n:
            keys.append(key)
    return keys


def group_record(rollout: RolloutBatch, g: int, *, device=None, pixel_dtype: torch.dtype | None = None) -> dict:
    """Group ``g`` of ``rollout`` as a record (see the module docstring); ``device`` None keeps it where it is.

    ``pixel_dtype`` stores the image features in the policy's dtype (what the model sees anyway).
    """
    G = rollout.num_generations
    rows = slice(g * G, (g + 1) * G)
    prompt: PromptBatch = rollout.prompts.select([g])  # left padding trimmed to this prompt
    device = device if device is not None else rollout.completion_ids.device
    width = max(int(rollout.completion_mask[rows].sum(-1).max().item()), 1)
    record_rows: dict[str, Tensor] = {}
    for name in RolloutBatch.row_fields():
        value = getattr(rollout, name)
        if value is None:
            continue
        value = value[rows]
        if value.dim() == 2 and name != "rewards_per_func":
            value = value[:, :width]
        record_rows[name] = value.detach().to(device).clone()
    extras = {}
    for key in per_row_extras(rollout):
        value = rollout.extras[key]
        extras[key] = value[rows].detach().to(device).clone() if isinstance(value, Tensor) else list(value[rows])
    pixel_values = prompt.pixel_values.detach()
    return {
        "prompt": {
            "input_ids": prompt.input_ids.to(device).clone(),
            "attention_mask": prompt.attention_mask.to(device).clone(),
            "mm_token_type_ids": None
            if prompt.mm_token_type_ids is None
            else prompt.mm_token_type_ids.to(device).clone(),
            "pixel_values": _move(pixel_values, device, pixel_dtype).clone(),
            "image_grid_thw": prompt.image_grid_thw.to(device).clone(),
            "image_counts": list(prompt.image_counts),
            "prompts": list(prompt.prompts),
            "columns": {k: _plain_column(v) for k, v in prompt.columns.items()},
            "index": list(prompt.index),
        },
        "rows": record_rows,
        "completions": list(rollout.completions[rows]),
        "extras": extras,
    }


def _left_pad(t: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)


def _right_pad(t: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def assemble(rollout: RolloutBatch, records: list[dict], *, pad_id: int) -> None:
    """Make ``rollout`` hold exactly the groups ``records``, in that order (in place).

    Everything per prompt and per row comes from the records; the rollout keeps its
    stage, tag, G, reward names and weights, timings and non-per-row extras.
    """
    if not records:
        raise ValueError("assemble: no groups")
    G = rollout.num_generations
    device = rollout.completion_ids.device
    pixel_dtype = rollout.prompts.pixel_values.dtype
    prompts = [r["prompt"] for r in records]
    stale_extras = per_row_extras(rollout)

    # prompt side: left-pad to the longest prompt
    P = max(p["input_ids"].shape[1] for p in prompts)
    with_mm = [p["mm_token_type_ids"] is not None for p in prompts]
    if any(with_mm) and not all(with_mm):
        raise ValueError("assemble: groups with and without mm_token_type_ids cannot share a rollout")
    columns: dict[str, list] = {}
    for key in prompts[0]["columns"]:
        columns[key] = [v for p in prompts for v in p["columns"].get(key, [None])]
    rollout.prompts = PromptBatch(
        input_ids=torch.cat([_left_pad(p["input_ids"].to(device), P, pad_id) for p in prompts]),
        attention_mask=torch.cat([_left_pad(p["attention_mask"].to(device), P, 0) for p in prompts]),
        mm_token_type_ids=torch.cat([_left_pad(p["mm_token_type_ids"].to(device), P, 0) for p in prompts])
        if all(with_mm)
        else None,
        pixel_values=torch.cat([p["pixel_values"].to(device=device, dtype=pixel_dtype) for p in prompts]),
        image_grid_thw=torch.cat([p["image_grid_thw"].to(device) for p in prompts]),
        image_counts=[n for p in prompts for n in p["image_counts"]],
        prompts=[t for p in prompts for t in p["prompts"]],
        columns=columns,
        index=[i for p in prompts for i in p["index"]],
        num_skipped=rollout.prompts.num_skipped,
    )

    # row side: right-pad to the longest completion
    T = max(r["rows"]["completion_ids"].shape[1] for r in records)
    for name in RolloutBatch.row_fields():
        present = [name in r["rows"] for r in records]
        if not any(present):
            setattr(rollout, name, None)
            continue
        parts = []
        for r in records:
            value = r["rows"].get(name)
            if value is None:
                if name not in _FILL_WHEN_MISSING:
                    raise ValueError(f"assemble: a group has no {name} while others do; they cannot share a rollout")
                like = next(x["rows"][name] for x in records if name in x["rows"])
                shape = (G, T) if like.dim() == 2 else (G, *like.shape[1:])
                value = torch.full(shape, _FILL_WHEN_MISSING[name], dtype=like.dtype)
            value = value.to(device)
            if value.dim() == 2 and name != "rewards_per_func":
                pad = pad_id if name == "completion_ids" else _PAD_VALUE.get(name, 0)
                value = _right_pad(value, T, pad)
            parts.append(value)
        setattr(rollout, name, torch.cat(parts))
    rollout.completions = [c for r in records for c in r["completions"]]

    # per-row annotations: concatenated; a group without one gets None (NaN for tensors)
    keys = dict.fromkeys(k for r in records for k in r["extras"])
    for key in stale_extras:
        if key not in keys:
            rollout.extras[key] = [None] * rollout.num_rows
    for key in [k for k in rollout.extras if k not in keys and k not in stale_extras]:
        # an object indexed by the old rows (e.g. an attention report) would now describe the wrong rows
        del rollout.extras[key]
    for key in keys:
        values = [r["extras"].get(key) for r in records]
        if all(isinstance(v, Tensor) for v in values):
            rollout.extras[key] = torch.cat([v.to(device) for v in values])
        else:
            out: list = []
            for v in values:
                out.extend([None] * G if v is None else (v.tolist() if isinstance(v, Tensor) else list(v)))
            rollout.extras[key] = out
