"""The preference term (SPEC 9) in a fit of the tiny model: set-up checks, pairs made on the trained rollout (replayed
groups included), the logged scalars only when it is on."""

from __future__ import annotations

import math

import pytest
import torch
from dyn_helpers import fit, make_data, make_module, scalars, starts_with_letter

from dapo_lightning import preference
from dapo_lightning.config import LossConfig, OptimConfig
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.loss import PolicyLossSettings, PreferenceSettings
from dapo_lightning.rewards import registry
from dapo_lightning.rewards.registry import RewardSpec
from dapo_lightning.update import UpdateSettings, update_policy

TAGS = ("train/preference/pairs", "train/preference/loss", "train/preference/margin")


class Trained(RolloutCallback):
    """Listed last: each step's rollout as the update sees it."""

    def __init__(self):
        self.rollouts = []

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train" and not rollout.is_extra:
            self.rollouts.append(rollout)


@pytest.fixture()
def letter_accuracy(monkeypatch):
    """The accuracy reward stands in as "starts with an answer letter", so the tiny model has correct rows."""
    monkeypatch.setitem(registry._REGISTRY, "accuracy", RewardSpec("accuracy", starts_with_letter))


WEIGHT, BETA, MARGIN = 0.5, 0.5, 0.1


@pytest.fixture()
def trained_run(tmp_path, tiny_model_dir, synthetic_parquet, letter_accuracy):
    """4 steps of 2 passes each (num_iterations 2: the second pass measures every paired row's d with a no-grad
    forward of the real model), with a replay buffer (old log-probs kept) and AttentionMetrics."""
    from dapo_lightning.callbacks import AttentionMetrics, ReplayBuffer

    trained = Trained()
    loss = LossConfig(preference_weight=WEIGHT, preference_beta=BETA, preference_margin=MARGIN,
                      preference_pairs_per_group=1)
    module = make_module(tiny_model_dir, rewards=("accuracy",), G=4, T=4, loss=loss,
                         optim=OptimConfig(learning_rate=1e-2, num_iterations=2, micro_batch_size=3))
    callbacks = [AttentionMetrics(every_n_steps=5), ReplayBuffer(replay_buffer_size=4), trained]
    fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=4, callbacks=callbacks)
    return tmp_path, module, trained.rollouts


def test_the_term_trains_on_the_pairs_of_the_trained_rollout(trained_run):
    root, module, rollouts = trained_run
    assert module.needed_annotations >= {"vgr"}  # AttentionMetrics then records every rollout, not every 5th
    assert all("vgr" in rollout.annotations for rollout in rollouts)
    logged = {tag: [v for _, v in scalars(root, tag)] for tag in TAGS}
    expected = [len(preference.rollout_pairs(rollout, 1)) for rollout in rollouts]
    assert logged["train/preference/pairs"] == expected and sum(expected) > 0
    for pairs, loss_value, margin in zip(expected, logged["train/preference/loss"], logged["train/preference/margin"]):
        if pairs == 0:
            assert loss_value == 0 and math.isnan(margin)
        else:
            assert loss_value > 0 and math.isfinite(margin)


class GradientHost:
    """The module's own log-probs; an optimizer step only keeps the gradients (the parameters do not move)."""

    device = torch.device("cpu")

    def __init__(self, module):
        self.module, self.gradients = module, []

    def completion_logps(self, rollout, rows, *, with_entropy=False, width=None):
        return self.module.completion_logps(rollout, rows, with_entropy=with_entropy, width=width)

    def manual_backward(self, loss):
        loss.backward()

    def trainable_parameters(self):
        return [(name, p) for name, p in self.module.policy.named_parameters() if p.requires_grad]

    def step_optimizer(self):
        self.gradients.append({name: p.grad.clone() for name, p in self.trainable_parameters() if p.grad is not None})
        self.discard_gradients()
        return torch.zeros(())

    def discard_gradients(self):
        for _, p in self.trainable_parameters():
            p.grad = None


def test_on_the_real_model_the_update_adds_the_written_terms_gradient(trained_run):
    """The last rollout, its groups marked replayed (the policy moved since it was sampled: every paired row's d is
    measured): the update's gradient with the term less the one without is autograd of SPEC 9's formula."""
    _, module, rollouts = trained_run
    rollout = next(r for r in reversed(rollouts) if len(preference.rollout_pairs(r, 1)))
    rollout.replayed = torch.ones(rollout.num_rows, dtype=torch.bool)
    pairs = preference.rollout_pairs(rollout, 1)
    term = PreferenceSettings(weight=WEIGHT, beta=BETA, margin=MARGIN, pairs_per_group=1)
    grads = []
    for settings in (PolicyLossSettings(epsilon_high=0.2), PolicyLossSettings(epsilon_high=0.2, preference=term)):
        host = GradientHost(module)
        update_policy(rollout, host, UpdateSettings(loss=settings, micro_batch_size=3))
        grads.append(host.gradients[0])
    rows = list(range(rollout.num_rows))
    logps = module.completion_logps(rollout, rows)  # [N, T'] with gradients
    d = ((logps.logps - rollout.old_logps[:, : logps.logps.shape[1]]) * logps.mask).sum(-1)  # [N]
    top, bottom = torch.tensor(pairs.top), torch.tensor(pairs.bottom)
    written = WEIGHT * (-torch.nn.functional.logsigmoid(BETA * (d[top] - d[bottom]) - MARGIN)).mean()
    names = [name for name, _ in GradientHost(module).trainable_parameters()]
    expected = torch.autograd.grad(written, [p for _, p in GradientHost(module).trainable_parameters()],
                                   allow_unused=True)
    compared = 0
    for name, want in zip(names, expected, strict=True):
        got = grads[1].get(name, 0) - grads[0].get(name, 0)
        if want is None:
            assert not torch.is_tensor(got) or not got.any()
            continue
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        compared += int(want.abs().sum() > 0)
    assert compared > 10  # the term reached most of the model


def test_set_up_refuses_the_term_without_a_vgr_provider(tmp_path, tiny_model_dir, synthetic_parquet, letter_accuracy):
    module = make_module(tiny_model_dir, rewards=("accuracy",), loss=LossConfig(preference_weight=0.1))
    with pytest.raises(ValueError, match=r"model\.loss\.preference_weight: 0\.1 needs per-sample vgr values .*"
                                         r"AttentionMetrics"):
        fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=1)
    assert module.actor is None  # refused before the model loaded


def test_off_the_run_logs_no_preference_scalars(tmp_path, tiny_model_dir, synthetic_parquet, letter_accuracy):
    module = make_module(tiny_model_dir, rewards=("accuracy",), G=4, T=3)
    fit(tmp_path, module, make_data(synthetic_parquet, tiny_model_dir), steps=1)
    assert scalars(tmp_path, "train/loss") and not any(scalars(tmp_path, tag) for tag in TAGS)
