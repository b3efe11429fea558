"""Multiple-choice visual questions: the row format (``rows``), the collator that encodes them (``collate``),
the samplers (``samplers``), the data module (``module``)."""

from dapo_lightning.data.collate import PromptCollator, example_prompt_batch
from dapo_lightning.data.module import SyntheticData, VisualMCQDataModule, VisualMCQDataset
from dapo_lightning.data.samplers import ResumableShuffleSampler, ShardSampler

__all__ = [
    "PromptCollator",
    "ResumableShuffleSampler",
    "ShardSampler",
    "SyntheticData",
    "VisualMCQDataModule",
    "VisualMCQDataset",
    "example_prompt_batch",
]
