"""ModalityProbe: the variants really change what the model sees, and the logged numbers are exact counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dyn_helpers import fit, make_data, make_module, scalars

from dapo_lightning.callbacks import ModalityProbe
from dapo_lightning.callbacks.modality_probe import NEUTRAL_PROMPT, blank_image, neutral_problem
from dapo_lightning.annotations import RowValues
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.module import DAPOModule
from dapo_lightning.rewards import registry
from dapo_lightning.rewards.registry import RewardSpec


def test_neutral_problem_keeps_only_the_options():
    problem = "What colour is the shape in the image?\nA: red\nB: green\nC: blue"
    assert neutral_problem(problem, "Choose.") == "Choose.\nA: red\nB: green\nC: blue"
    assert neutral_problem("Line one\nline two\nA: x\nB： y") == f"{NEUTRAL_PROMPT}\nA: x\nB： y"
    # one grammar of option lines, the data format's (rows.OPTION_LINE): "A." is not one (such rows never load)
    assert neutral_problem("Line one\nA. x") == NEUTRAL_PROMPT


def test_blank_images():
    assert np.asarray(blank_image((5, 3), "black")).tolist() == np.zeros((3, 5, 3), dtype=np.uint8).tolist()
    assert (np.asarray(blank_image((5, 3), "white")) == 255).all()
    noise = np.asarray(blank_image((40, 30), "noise", seed=1))
    assert noise.shape == (30, 40, 3) and noise.std() > 50
    assert np.array_equal(noise, np.asarray(blank_image((40, 30), "noise", seed=1)))


@pytest.mark.parametrize("variants", [["image_text", "colour_only"], [], ["text_black", "text_black"]])
def test_unknown_or_repeated_variants_name_the_key(variants):
    with pytest.raises(ValueError, match=r"ModalityProbe\.variants"):
        ModalityProbe(variants=variants)


class ProbeRollouts(RolloutCallback):
    def __init__(self):
        self.val = {}

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "val":
            self.val.setdefault(rollout.requested_by, []).append(rollout)


def image_has_structure(completions, sees_image, **kwargs):
    """Stands in for the accuracy reward: right when the row's image has any structure (see ``SeesImages``)."""
    return list(sees_image)


class SeesImages(DAPOModule):
    """Counts an answer right when its image has any structure: a stand-in for a model that reads pictures,
    so that every variant's accuracy is known in advance (image 1, black 0, white 0, noise 1, no question 1).
    Each sampled row is annotated with it, and ``image_has_structure`` stands in for the accuracy reward."""

    def sample(self, batch, stage, requested_by=None):
        rollout = super().sample(batch, stage, requested_by)
        right, start = [], 0
        for n in rollout.prompts.patch_counts:
            patches = rollout.prompts.pixel_values[start : start + n]
            start += n
            right.append(0.0 if (patches == patches[0]).all() else 1.0)
        rollout.annotations["sees_image"] = RowValues(torch.tensor(right).repeat_interleave(rollout.num_generations))
        return rollout


def test_probe_variants_and_logged_accuracies(tmp_path, tiny_model_dir, synthetic_parquet, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "accuracy", RewardSpec("accuracy", image_has_structure))
    probe, seen = ModalityProbe(), ProbeRollouts()
    module = make_module(tiny_model_dir, rewards=("accuracy",), eval_greedy=True, cls=SeesImages)
    data = make_data(synthetic_parquet, tiny_model_dir, eval_limit=3)  # two validation batches: 2 + 1 questions
    fit(tmp_path, module, data, steps=1, callbacks=[probe, seen], val_every=1, limit_val_batches=2)
    expected = {"image_text": 1.0, "image_only": 1.0, "text_black": 0.0, "text_white": 0.0, "text_noise": 1.0}
    assert set(seen.val) == {None, "probe:image_only", "probe:text_black", "probe:text_white", "probe:text_noise"}
    own = seen.val[None][0]
    n_patches = own.prompts.pixel_values.shape[0]
    for kind in ("black", "white"):
        probe_rollout = seen.val[f"probe:text_{kind}"][0]
        assert probe_rollout.prompts.index == own.prompts.index  # the same questions...
        assert probe_rollout.prompts.prompts == own.prompts.prompts  # ...with the same text
        pixels = probe_rollout.prompts.pixel_values
        assert pixels.shape[0] == n_patches  # an image of the original's size...
        assert (pixels == pixels[0]).all()  # ...every patch identical: a uniform picture
    assert not (own.prompts.pixel_values == own.prompts.pixel_values[0]).all()
    noise = seen.val["probe:text_noise"][0].prompts.pixel_values
    assert not (noise == noise[0]).all()
    image_only = seen.val["probe:image_only"][0]
    assert torch.equal(image_only.prompts.pixel_values, own.prompts.pixel_values)
    for text, original in zip(image_only.prompts.prompts, own.prompts.prompts):
        question = original.split("<|vision_end|>")[1].split("\n")[0]  # e.g. "How many shapes are in the image?"
        assert NEUTRAL_PROMPT in text and question not in text and "\nA: " in text
    # logged: each variant's accuracy over the 3 held-out questions, image_text equal to the module's val/accuracy
    assert [len(r.prompts) for r in seen.val["probe:text_black"]] == [2, 1]
    logged = {tag: scalars(tmp_path, f"val/probe/{tag}/accuracy") for tag in expected}
    assert {tag: [v for _, v in points] for tag, points in logged.items()} == {k: [v] for k, v in expected.items()}
    assert scalars(tmp_path, "val/accuracy")[0][1] == 1.0  # image_text is the module's own validation
    assert [v for _, v in scalars(tmp_path, "val/probe/visual_reliance")] == [1.0]  # 1.0 - 0.0
    assert probe.last["val/probe/visual_reliance"] == 1.0
