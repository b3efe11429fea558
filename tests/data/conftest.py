"""Fixtures of the data tests: the tiny model with Qwen2.5-VL-7B's image processor, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen7b_vision_dir(tmp_path_factory):
    """The tiny decoder with Qwen2.5-VL-7B-Instruct's vision settings (patch 14, merge 2, 3136..12845056 pixels)."""
    from dapo_lightning.data_prep.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-7b-vision", size="tiny-7b-vision",
                            system_prompt_words=True)


@pytest.fixture(scope="session")
def qwen7b_processor(qwen7b_vision_dir):
    from dapo_lightning.models import load_processor

    return load_processor(str(qwen7b_vision_dir))
