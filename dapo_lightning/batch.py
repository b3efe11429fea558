"""The two objects that flow through a step: ``PromptBatch`` (data -> rollout) and ``RolloutBatch``.

Shapes: B prompts (groups), G completions per prompt (``num_generations``),
N = B * G rows, P prompt tokens (left-padded), T completion tokens (right-padded),
D pixel-patch features. Row ``i`` of a rollout belongs to group ``i // G``.

Prompt-side tensors are stored once per group, not per row: a group is the unit
that the replay buffer and dynamic sampling move around, and it always carries its
own prompt and image with its completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from dapo_lightning.annotations import Annotation, RowValues

if TYPE_CHECKING:
    from dapo_lightning.data.rows import BadRow
    from dapo_lightning.guards import Fault


class SourceRow(NamedTuple):
    """Where a prompt's question is stored: the parquet file (``name[split]`` for a hub dataset) and its row there.

    Rows are numbered from 0 within their own file (in a folder of parquet files too), as
    ``python -m dapo_lightning.data_prep validate`` numbers them, whatever split or shuffle the
    question went through; ``str()`` gives ``"file: row 5"``, the form of a ``BadRow`` message.
    """

    file: str
    row: int

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}"


@dataclass
class PromptBatch:
    """B tokenised prompts with their images, as the processor encodes them."""

    input_ids: Tensor  # [B, P] left-padded
    attention_mask: Tensor  # [B, P]
    pixel_values: Tensor  # [sum of patches over the B prompts' images, D]
    image_grid_thw: Tensor  # [I, 3] one row per image, in prompt order
    image_counts: list[int]  # [B] images per prompt
    mm_token_type_ids: Tensor | None = None  # [B, P] 0 text, 1 image
    prompts: list[str] = field(default_factory=list)  # [B] rendered chat text
    columns: dict[str, list] = field(default_factory=dict)  # dataset columns per prompt ("solution", "problem", ...)
    index: list[int] = field(default_factory=list)  # [B] position of each prompt in its dataset (for lookups)
    # [B] the parquet file and row of each prompt (for messages); empty when the batch was built without them
    source_rows: list[SourceRow] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # [B] decoded PIL images, as encoded (the rewards' ``image``)
    num_skipped: int = 0  # unusable rows the collator dropped from this batch (data.on_bad_row=skip)
    skipped: list[BadRow] = field(default_factory=list)  # [num_skipped] why each of them was dropped, in order
    num_resized: int = 0  # rows of this batch whose image the collator shrank to fit data.max_prompt_length

    @classmethod
    def empty(cls) -> PromptBatch:
        """A batch with no prompts (every row of a validation batch was unusable)."""
        return cls(input_ids=torch.zeros(0, 0, dtype=torch.long), attention_mask=torch.zeros(0, 0, dtype=torch.long),
                   pixel_values=torch.zeros(0, 0), image_grid_thw=torch.zeros(0, 3, dtype=torch.long), image_counts=[])

    def with_skipped(self, dropped: list[BadRow]) -> PromptBatch:
        """This batch counting ``dropped``: the unusable rows the collator left out of it."""
        return replace(self, num_skipped=self.num_skipped + len(dropped), skipped=[*self.skipped, *dropped])

    def locations(self) -> list[SourceRow] | list[int]:
        """[B] what messages name each prompt by: its ``source_rows`` (a batch built without them: its ``index``)."""
        return self.source_rows or self.index

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def patch_counts(self) -> list[int]:
        """Pixel-patch rows of each prompt (sum over its images of t*h*w)."""
        per_image = self.image_grid_thw.prod(-1).tolist()
        counts, start = [], 0
        for n in self.image_counts:
            counts.append(int(sum(per_image[start : start + n])))
            start += n
        return counts

    def model_inputs(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Keyword arguments of the policy's forward over the prompts alone (pixel values cast to ``dtype``)."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values if dtype is None else self.pixel_values.to(dtype),
            "image_grid_thw": self.image_grid_thw,
        }
        if self.mm_token_type_ids is not None:
            inputs["mm_token_type_ids"] = self.mm_token_type_ids
        return inputs

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptBatch:
        pixel_values = self.pixel_values.to(device, dtype=dtype) if dtype is not None else self.pixel_values.to(device)
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pixel_values,
            image_grid_thw=self.image_grid_thw.to(device),
            mm_token_type_ids=None if self.mm_token_type_ids is None else self.mm_token_type_ids.to(device),
        )

    def select(self, groups: list[int] | Tensor) -> PromptBatch:
        """The prompts ``groups`` (repeats allowed), left padding trimmed to the longest of them."""
        groups = [int(g) for g in groups]
        patch_starts = _offsets(self.patch_counts)
        image_starts = _offsets(self.image_counts)
        idx = torch.tensor(groups, dtype=torch.long, device=self.input_ids.device)
        attention_mask = self.attention_mask.index_select(0, idx)  # [b, P]
        keep = _trim_left(attention_mask)
        return PromptBatch(
            input_ids=self.input_ids.index_select(0, idx)[:, keep:],
            attention_mask=attention_mask[:, keep:],
            mm_token_type_ids=None
            if self.mm_token_type_ids is None
            else self.mm_token_type_ids.index_select(0, idx)[:, keep:],
            pixel_values=torch.cat([self.pixel_values[patch_starts[g] : patch_starts[g + 1]] for g in groups]),
            image_grid_thw=torch.cat([self.image_grid_thw[image_starts[g] : image_starts[g + 1]] for g in groups]),
            image_counts=[self.image_counts[g] for g in groups],
            prompts=[self.prompts[g] for g in groups] if self.prompts else [],
            columns={k: [v[g] for g in groups] for k, v in self.columns.items()},
            index=[self.index[g] for g in groups] if self.index else [],
            source_rows=[self.source_rows[g] for g in groups] if self.source_rows else [],
            images=[self.images[g] for g in groups] if self.images else [],
        )


@dataclass
class RolloutBatch:
    """One rollout: B prompts, G sampled completions each, and everything computed from them.

    Filled in order by the module: generation (``completion_*``), an optional
    teacher-forced pass (``old_logps``, ``ref_logps``), callbacks' annotations
    (``annotations``, e.g. ``annotations["vgr"]``), scoring (``rewards_*``, ``advantages``),
    and callbacks again (``token_weights``, replayed groups) before the loss.
    """

    prompts: PromptBatch  # B groups
    num_generations: int  # G
    completion_ids: Tensor  # [N, T] right-padded
    completion_mask: Tensor  # [N, T] 1 up to and including EOS
    completions: list[str]  # [N] decoded text
    stage: str = "train"  # "train" or "val"
    # None: the step's own rollout (or the module's own validation rollout); else the callback that asked for an
    # extra one ("dynamic_sampling", "probe:<variant>"); see ``is_extra``
    requested_by: str | None = None
    truncated: Tensor | None = None  # [N] bool: no EOS within max_completion_length
    old_logps: Tensor | None = None  # [N, T] log-probs under the policy that sampled (None: use current, detached)
    ref_logps: Tensor | None = None  # [N, T] log-probs under the frozen reference (beta > 0)
    reward_names: list[str] = field(default_factory=list)  # [K]
    reward_weights: Tensor | None = None  # [K] set by the module, may be changed by a callback before scoring
    rewards_per_func: Tensor | None = None  # [N, K] NaN where a reward gave no value
    rewards: Tensor | None = None  # [N] weighted total
    advantages: Tensor | None = None  # [N]
    token_weights: Tensor | None = None  # [N, T] per-token advantage multipliers (None: all 1)
    replayed: Tensor | None = None  # [N] bool: row comes from the replay buffer
    annotations: dict[str, Annotation] = field(default_factory=dict)  # per-row values by name (annotations.py)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase ("generate", "score", ...)
    # the step's own rows as scored, before callbacks moved groups (replay, dynamic sampling): train only
    sampled_rewards: Tensor | None = None  # [N] total rewards
    sampled_accuracy: Tensor | None = None  # [N] in {0, 1}
    faults: list[Fault] = field(default_factory=list)  # NaN/inf found in it (guards.py); its training step is skipped
    reward_errors: dict[str, int] = field(default_factory=dict)  # samples per reward that raised and scored 0

    @property
    def is_extra(self) -> bool:
        """Whether a callback asked for this rollout besides the step's own (dynamic sampling's rounds, probes).

        A callback that acts once per step (a replay buffer, a log writer) returns early on extra rollouts.
        """
        return self.requested_by is not None

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return self.num_rows // self.num_generations

    @property
    def groups(self) -> Tensor:
        """Group (prompt) index of each row."""
        return torch.arange(self.num_rows, device=self.completion_ids.device) // self.num_generations  # [N]

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)  # [N]

    def row_columns(self) -> dict[str, list]:
        """Dataset columns repeated to one entry per row (TRL's reward keyword arguments)."""
        G = self.num_generations
        return {k: [v for v in values for _ in range(G)] for k, values in self.prompts.columns.items()}

    def reward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every reward function (see ``rewards.registry``), one entry per row where per-row:
        the dataset columns, ``prompts``, ``completion_ids``, ``image`` (the decoded picture, as TRL passes a vision
        dataset's image column), ``num_generations`` and the ``RowValues`` annotations as lists."""
        G = self.num_generations
        ids = [row[mask.bool()].tolist() for row, mask in zip(self.completion_ids, self.completion_mask)]
        kwargs: dict[str, Any] = {
            **self.row_columns(),
            "prompts": [p for p in self.prompts.prompts for _ in range(G)],
            "completion_ids": ids,
            "num_generations": G,
        }
        if self.prompts.images:
            kwargs["image"] = [image for image in self.prompts.images for _ in range(G)]
        kwargs.update({name: a.tolist() for name, a in self.annotations.items() if isinstance(a, RowValues)})
        return kwargs

    def model_inputs(self, rows: list[int] | Tensor, width: int | None = None) -> dict[str, Tensor]:
        """Teacher-forcing inputs (prompt + completion) for ``rows``, padding trimmed.

        Returns ``input_ids``/``attention_mask``/``mm_token_type_ids`` of shape [n, P' + T'],
        ``pixel_values``/``image_grid_thw`` of the rows' prompts, and ``completion_ids``/
        ``completion_mask`` [n, T'] for the positions whose log-probs are wanted. ``width``
        T' is the rows' longest completion (computed when not given: a device sync).
        """
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        prompts = self.prompts.select((rows_t // self.num_generations).tolist())
        completion_mask = self.completion_mask.index_select(0, rows_t)  # [n, T]
        width = self.completion_width(rows_t) if width is None else width
        completion_ids = self.completion_ids.index_select(0, rows_t)[:, :width]  # [n, T']
        completion_mask = completion_mask[:, :width]  # [n, T']
        inputs = {
            "input_ids": torch.cat([prompts.input_ids, completion_ids], dim=1),
            "attention_mask": torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], dim=1),
            "pixel_values": prompts.pixel_values,
            "image_grid_thw": prompts.image_grid_thw,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
        }
        if prompts.mm_token_type_ids is not None:
            zeros = torch.zeros_like(completion_ids, dtype=prompts.mm_token_type_ids.dtype)
            inputs["mm_token_type_ids"] = torch.cat([prompts.mm_token_type_ids, zeros], dim=1)
        return inputs

    def completion_width(self, rows: list[int] | Tensor) -> int:
        """T': the longest completion among ``rows`` (at least 1)."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.completion_mask.device)
        lengths = self.completion_mask.index_select(0, rows_t).sum(-1)  # [n]
        return max(int(lengths.max()) if lengths.numel() else 0, 1)

    @classmethod
    def row_fields(cls) -> list[str]:
        """Names of the tensor fields with one entry per row (first dimension N)."""
        per_row = {"completion_ids", "completion_mask", "truncated", "old_logps", "ref_logps", "rewards_per_func",
                   "rewards", "advantages", "token_weights", "replayed"}
        return [f.name for f in fields(cls) if f.name in per_row]


def _offsets(counts: list[int]) -> list[int]:
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    return offsets


def _trim_left(attention_mask: Tensor) -> int:
    """Number of leading columns that are padding in every row."""
    if attention_mask.numel() == 0:
        return 0
    real = attention_mask.bool().any(dim=0)  # [P]
    nonzero = real.nonzero()
    return int(nonzero[0].item()) if len(nonzero) else 0
