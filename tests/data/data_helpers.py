"""Shared pieces of the data tests: small DDM rows and parquet files, and a data module set up on one."""

from __future__ import annotations

import io

from datasets import Dataset
from PIL import Image

from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.data.rows import mcq_features


def png(size=(300, 120), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path, rows):
    Dataset.from_list(rows, features=mcq_features()).to_parquet(str(path))
    return path


def row(solution="B", image=None, problem="What colour?\nA: red\nB: blue"):
    return {"image": {"bytes": image if image is not None else png(), "path": None}, "problem": problem,
            "solution": solution}


def set_up(path, tiny_model_dir, **kwargs) -> VisualMCQDataModule:
    module = VisualMCQDataModule(train_path=str(path), processor=str(tiny_model_dir), **kwargs)
    module.setup("fit")
    return module
