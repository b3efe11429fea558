"""Groups moved by dynamic sampling and the replay buffer keep their own attention values and token weights.

Needs the attention callbacks (AttentionMetrics, TokenWeights) and the vgr reward.
"""

from __future__ import annotations

import pytest
import torch
from dyn_helpers import fit, make_data, make_module

from dapo_lightning.callbacks import DynamicSampling, ReplayBuffer
from dapo_lightning.hooks import RolloutCallback


class BeforeMoves(RolloutCallback):
    """Listed after TokenWeights, before the callbacks that move groups: what every group looked like."""

    def __init__(self):
        self.groups = {}

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage != "train":
            return
        G = rollout.num_generations
        for g in range(rollout.num_groups):
            rows = slice(g * G, (g + 1) * G)
            key = (rollout.prompts.index[g], tuple(rollout.completions[rows]))
            vgr = rollout.annotations["vgr"].tolist()[rows]
            self.groups[key] = (rollout.token_weights[rows].clone(), vgr, rollout.requested_by)


class AfterMoves(RolloutCallback):
    def __init__(self):
        self.final = []

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train" and not rollout.is_extra:
            self.final.append(rollout)


def test_moved_groups_keep_their_vgr_and_token_weights(tmp_path, tiny_model_dir, synthetic_parquet):
    from dapo_lightning.callbacks import AttentionMetrics, TokenWeights  # the attention branch's callbacks

    before, after = BeforeMoves(), AfterMoves()
    callbacks = [AttentionMetrics(every_n_steps=1), TokenWeights(smooth_sigma=0.0), before,
                 DynamicSampling(oversample_factor=0.5, max_tries=1), ReplayBuffer(replay_buffer_size=4), after]
    module = make_module(tiny_model_dir, rewards=("dyn_helpers.starts_with_abc", "vgr"), weights=[1.0, 0.1], T=4)
    fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=4, callbacks=callbacks)
    drawn = replayed = 0
    for rollout in after.final:
        G = rollout.num_generations
        for g in range(rollout.num_groups):
            rows = slice(g * G, (g + 1) * G)
            if rollout.replayed[rows].all():
                replayed += 1
                assert (rollout.token_weights[rows] == 1).all()  # SPEC 6: replayed rows are not reweighted
                continue
            weights, vgr, tag = before.groups[(rollout.prompts.index[g], tuple(rollout.completions[rows]))]
            drawn += tag == "dynamic_sampling"
            width = weights.shape[1]
            torch.testing.assert_close(rollout.token_weights[rows, :width], weights)
            assert (rollout.token_weights[rows, width:] == 1).all()  # padding added by reassembly
            assert rollout.annotations["vgr"].tolist()[rows] == pytest.approx(vgr, nan_ok=True)
    assert drawn > 0 and replayed > 0  # groups did come from extra rounds and from the buffer
