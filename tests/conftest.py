"""Shared fixtures: the offline tiny Qwen2.5-VL and a synthetic DDM parquet, built once per session."""

from __future__ import annotations

import os

# Two cores and several test processes: one thread each avoids OpenMP oversubscription,
# which slows small CPU kernels by two orders of magnitude here.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dapo_lightning.data_prep.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_parquet(tmp_path_factory):
    from dapo_lightning.data_prep.synthetic import SyntheticConfig, write_parquet

    return write_parquet(tmp_path_factory.mktemp("data") / "synthetic.parquet", SyntheticConfig(rows=40, seed=0, image_size=56))


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from dapo_lightning.models import load_processor

    return load_processor(str(tiny_model_dir))


@pytest.fixture()
def policy(tiny_model_dir):
    from dapo_lightning.models import load_policy

    return load_policy(str(tiny_model_dir))


@pytest.fixture(scope="session")
def synthetic_rows(synthetic_parquet):
    from datasets import Dataset

    return Dataset.from_parquet(str(synthetic_parquet)).to_list()


@pytest.fixture()
def prompt_batch(processor, synthetic_rows):
    """Three prompts of different question types (so different lengths: left padding is exercised)."""
    from dapo_lightning.data import example_prompt_batch

    first_of_each = {}
    for row in synthetic_rows:
        first_of_each.setdefault(row["problem"].split("\n")[0], row)
    batch = example_prompt_batch(processor, list(first_of_each.values())[:3])
    lengths = batch.attention_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "fixture must contain padding"
    return batch
