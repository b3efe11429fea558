"""Multiple-choice visual questions: the row format, the collator that encodes them, the samplers, the data module."""

from dapo_lightning.data.module import (
    PromptCollator,
    ResumableShuffleSampler,
    ShardSampler,
    SyntheticData,
    VisualMCQDataModule,
    VisualMCQDataset,
    example_prompt_batch,
)

__all__ = [
    "PromptCollator",
    "ResumableShuffleSampler",
    "ShardSampler",
    "SyntheticData",
    "VisualMCQDataModule",
    "VisualMCQDataset",
    "example_prompt_batch",
]
