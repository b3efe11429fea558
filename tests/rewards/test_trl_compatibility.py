"""A reward written for TRL's GRPOTrainer works unchanged: keyword call, conversational completions,
``trainer_state``, the images (issue 13)."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import TrainerState

from dapo_lightning import DAPOModule, PolicyConfig, RewardConfig, RolloutConfig
from tests.test_module import fit

SEEN: list[dict] = []


def trl_style_reward(prompts, completions, trainer_state, image, **kwargs):
    """Written the TRL way: prompts first, by keyword; conversational completions; TRL's state; the row's image."""
    SEEN.append({"completions": completions, "step": trainer_state.global_step, "state": trainer_state,
                 "image": image, "prompts": prompts})
    return [1.0 if c[0]["content"].strip()[:1] == "A" else 0.0 for c in completions]


def test_a_reward_written_for_trl_works_unchanged(tmp_path, tiny_model_dir, synthetic_parquet):
    SEEN.clear()
    module = DAPOModule(policy=PolicyConfig(model_name_or_path=str(tiny_model_dir)),
                        rollout=RolloutConfig(num_generations=4, max_completion_length=3),
                        rewards=RewardConfig(reward_funcs=[trl_style_reward], completions_format="conversational"))
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2)
    assert [s["step"] for s in SEEN] == [0, 1]  # one training rollout per step, the step it trains
    first = SEEN[0]
    assert isinstance(first["state"], TrainerState) and first["state"].max_steps == 2
    N = len(first["completions"])
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in first["completions"])
    assert len(first["image"]) == N and all(isinstance(i, Image.Image) for i in first["image"])
    assert len(first["prompts"]) == N and isinstance(first["prompts"][0], str)


def test_the_completions_format_names_its_key():
    with pytest.raises(ValueError, match="model.rewards.completions_format"):
        RewardConfig(completions_format="messages")
