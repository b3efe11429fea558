"""DAPOModule end to end on the tiny model (in-process fits): hooks, updates, export, checks."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from dapo_lightning import update as update_module
from dapo_lightning.annotations import RowValues
from dapo_lightning.config import LoraSettings, LossConfig, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.models import load_policy, load_processor
from dapo_lightning.module import DAPOModule

TARGET = "A"


def contains_target(completions, **kwargs):
    """Reward 1 when the completion's first word is the target letter (policy-gradient sanity check)."""
    return [1.0 if c.split()[:1] == [TARGET] else 0.0 for c in completions]


def text_length(completions, **kwargs):
    """Varies within every group, so every step has non-zero advantages."""
    return [float(len(c)) for c in completions]


def bonus_from_callback(completions, bonus, **kwargs):
    """A reward that reads a value a callback attached to the rollout."""
    return list(bonus)


def needs_halo(completions, halo, **kwargs):
    return list(halo)


needs_halo.reward_needs = ("halo",)
needs_halo.reward_provider_hint = "tests.test_module.HaloCallback"


def make_module(tiny_model_dir, *, rewards=("accuracy",), weights=None, G=4, T=3, lr=1e-3, **overrides):
    return DAPOModule(
        policy=overrides.pop("policy", PolicyConfig(model_name_or_path=str(tiny_model_dir))),
        rollout=RolloutConfig(num_generations=G, max_completion_length=T, eval_num_generations=2),
        rewards=RewardConfig(reward_funcs=list(rewards), reward_weights=weights),
        loss=overrides.pop("loss", LossConfig()),
        optim=overrides.pop("optim", OptimConfig(learning_rate=lr)),
        **overrides,
    )


def fit(tmp_path, module, synthetic_parquet, tiny_model_dir, *, steps=2, callbacks=(), batch_size=2, val=False, seed=0):
    seed_everything(seed)
    data = VisualMCQDataModule(train_path=str(synthetic_parquet), processor=str(tiny_model_dir), batch_size=batch_size,
                         eval_limit=2, system_prompt=None)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, default_root_dir=str(tmp_path), callbacks=list(callbacks),
        logger=TensorBoardLogger(str(tmp_path), name="tb"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1 if val else 0,
        val_check_interval=steps if val else None, log_every_n_steps=1,
    )
    trainer.fit(module, data)
    return trainer


class Recorder(RolloutCallback):
    """Records the hook order and what the rollout holds at each hook; attaches a value for a reward."""

    def __init__(self):
        self.events = []

    def on_rollout_generated(self, trainer, module, rollout):
        assert rollout.rewards is None and rollout.completions
        rollout.annotations["bonus"] = RowValues([0.5] * rollout.num_rows)
        if rollout.stage == "train":
            rollout.reward_weights = torch.tensor([0.0, 2.0])  # the callback may change weights before scoring
        self.events.append(("generated", rollout.stage, rollout.old_logps is not None))

    def on_rollout_scored(self, trainer, module, rollout):
        assert rollout.advantages is not None and rollout.rewards_per_func.shape == (rollout.num_rows, 2)
        self.events.append(("scored", rollout.stage, rollout.rewards.tolist()))

    def on_rollout_update_end(self, trainer, module, rollout, result):
        self.events.append(("update_end", rollout.stage, sorted(result.metrics())))


def test_hooks_run_in_order_and_annotations_reach_rewards(tmp_path, tiny_model_dir, synthetic_parquet):
    recorder = Recorder()
    module = make_module(tiny_model_dir, rewards=("accuracy", "tests.test_module.bonus_from_callback"))
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2, callbacks=[recorder], val=True)
    train = [e for e in recorder.events if e[1] == "train"]
    assert [e[0] for e in train] == ["generated", "scored", "update_end"] * 2
    # weights [0, 2] set by the callback: every total reward is 2 * 0.5 whatever the accuracy
    for event in train:
        if event[0] == "scored":
            assert event[2] == [1.0] * 8
    assert "loss" in train[2][2] and "clip_ratio/high_mean" in train[2][2]
    val = [e[0] for e in recorder.events if e[1] == "val"]
    assert val == ["generated", "scored"]  # validation never updates
    # no callback asked for old log-probs and num_iterations is 1: no extra forward was made
    assert all(e[2] is False for e in recorder.events if e[0] == "generated")


class ZeroTokenWeights(RolloutCallback):
    def on_rollout_scored(self, trainer, module, rollout):
        rollout.token_weights = torch.zeros_like(rollout.completion_ids, dtype=torch.float32)


def test_token_weights_multiply_the_advantages_in_the_loss(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, optim=OptimConfig(learning_rate=1e-2, weight_decay=0.0))
    before = {k: v.clone() for k, v in load_policy(str(tiny_model_dir)).state_dict().items()}
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2, callbacks=[ZeroTokenWeights()])
    # every per-token advantage is 0: zero loss and zero gradient, so AdamW (no decay) leaves every weight as it was
    for name, value in module.policy.state_dict().items():
        assert torch.equal(value, before[name]), name


class RewardTrace(RolloutCallback):
    def __init__(self):
        self.means = []

    def on_rollout_scored(self, trainer, module, rollout):
        self.means.append(float(rollout.rewards.mean()))


def _target_logprob(policy, processor, batch):
    target = processor.tokenizer.convert_tokens_to_ids(TARGET)
    with torch.no_grad():
        out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                     image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1], -1)[:, target].mean().item()


def test_policy_gradient_raises_the_probability_of_the_rewarded_token(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                     synthetic_rows):
    from dapo_lightning.data import example_prompt_batch

    processor = load_processor(str(tiny_model_dir))
    probe = example_prompt_batch(processor, synthetic_rows[:8], system_prompt=None)
    before = _target_logprob(load_policy(str(tiny_model_dir)).eval(), processor, probe)
    module = make_module(tiny_model_dir, rewards=("tests.test_module.contains_target",), G=8, T=1, lr=3e-3)
    rewards = RewardTrace()
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=20, batch_size=4, callbacks=[rewards])
    after = _target_logprob(module.policy.eval(), processor, probe)
    # near-uniform start over 78 tokens: log(1/78) = -4.36
    assert before == pytest.approx(-4.36, abs=0.3)
    assert after > before + 1.0, (before, after)
    first, last = sum(rewards.means[:5]) / 5, sum(rewards.means[-5:]) / 5
    assert last > first + 0.1, rewards.means


class OldLogpsProbe(RolloutCallback):
    needs_old_logps = False

    def __init__(self):
        self.seen = []

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage == "train":
            self.seen.append(rollout.old_logps)


def test_several_updates_per_rollout_use_stored_old_logprobs(tmp_path, tiny_model_dir, synthetic_parquet):
    probe = OldLogpsProbe()
    module = make_module(tiny_model_dir, optim=OptimConfig(learning_rate=1e-2, num_iterations=2))
    trainer = fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=4, callbacks=[probe])
    assert trainer.global_step == 4 and len(probe.seen) == 2  # two rollouts, two optimizer steps each
    old = probe.seen[0]
    assert old.shape == (2 * 4, 3)  # [N = B * G, T]
    assert torch.isfinite(old).all() and (old <= 0).all()


class GradientCapture(Callback):
    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}


def test_micro_batches_give_the_same_gradient_as_one_batch(tmp_path, tiny_model_dir, synthetic_parquet):
    """SPEC 5: dapo's normaliser spans the whole step, so accumulation must not change the gradient."""
    rewards = ("tests.test_module.text_length",)
    captures = []
    for name, micro in (("whole", None), ("split", 3)):
        capture = GradientCapture()
        module = make_module(tiny_model_dir, rewards=rewards, optim=OptimConfig(learning_rate=1e-2, micro_batch_size=micro))
        fit(tmp_path / name, module, synthetic_parquet, tiny_model_dir, steps=1, callbacks=[capture])
        captures.append(capture.grads)
    whole, split = captures
    assert len(whole) == len(split) == sum(1 for _ in load_policy(str(tiny_model_dir)).parameters())
    total = torch.cat([g.flatten() for g in whole.values()])
    assert total.norm() > 0
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6 * float(total.abs().max()), msg=name)


def test_export_reloads_and_never_overwrites(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir)
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=1)
    final = tmp_path / "final"
    reloaded = load_policy(str(final))
    for (name, a), b in zip(module.policy.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_processor(str(final)).tokenizer.padding_side == "left"
    second = make_module(tiny_model_dir)
    fit(tmp_path, second, synthetic_parquet, tiny_model_dir, steps=1)
    assert (tmp_path / "final-1" / "model.safetensors").exists()
    assert torch.equal(load_policy(str(final)).lm_head.weight, module.policy.lm_head.weight)


def test_lora_trains_only_adapters_and_exports_the_adapter(tmp_path, tiny_model_dir, synthetic_parquet):
    policy = PolicyConfig(model_name_or_path=str(tiny_model_dir), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = make_module(tiny_model_dir, policy=policy, optim=OptimConfig(learning_rate=1e-2))
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2)
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # q_proj and v_proj of the 2 decoder layers (the vision tower's fused qkv is not a target), A and B each
    assert len(trainable) == 2 * 2 * 2
    assert (tmp_path / "final" / "adapter_config.json").exists()
    base = load_policy(str(tiny_model_dir)).state_dict()
    for name, value in module.policy.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(value, base[key]), name


def test_kl_to_a_frozen_reference_when_beta_is_positive(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, loss=LossConfig(beta=0.1), optim=OptimConfig(learning_rate=1e-2, num_iterations=2))
    trainer = fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=4)
    kl = float(trainer.callback_metrics["train/kl"])
    # the first iteration of each rollout sees policy == reference only before the first update; after it, KL > 0
    assert kl >= 0 and math.isfinite(kl)
    reference = module.actor.reference
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())


class HaloCallback(RolloutCallback):
    provides = ("halo",)


def test_a_reward_whose_input_no_callback_provides_fails_at_fit_start(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, rewards=("accuracy", "tests.test_module.needs_halo"))
    with pytest.raises(ValueError, match=r"needs_halo.*halo.*add tests.test_module.HaloCallback to trainer.callbacks"):
        fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=1)
    # with weight 0 it is allowed: the reward has no value (NaN, logged as such) on rollouts without its input
    module = make_module(tiny_model_dir, rewards=("accuracy", "tests.test_module.needs_halo"), weights=[1.0, 0.0])
    trainer = fit(tmp_path / "zero", module, synthetic_parquet, tiny_model_dir, steps=1)
    assert math.isnan(float(trainer.callback_metrics["train/rewards/tests.test_module.needs_halo/mean"]))


def test_configuration_errors_name_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="reward 'acuracy' is not registered"):
        make_module(tiny_model_dir, rewards=("acuracy",))
    with pytest.raises(ValueError, match=r"reward_weights: has 3 weights but model.rewards.reward_funcs has 2"):
        RewardConfig(reward_funcs=["accuracy", "format"], reward_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="model.rollout.num_generations"):
        RolloutConfig(num_generations=1)
    with pytest.raises(ValueError, match="model.optim.warmup_ratio"):
        OptimConfig(warmup_ratio=1.5)


class LearningRates(RolloutCallback):
    def __init__(self):
        self.values = []

    def on_rollout_update_end(self, trainer, module, rollout, result):
        self.values.append(module.optimizers().param_groups[0]["lr"])


def test_warmup_then_cosine_schedule_over_optimizer_steps(tmp_path, tiny_model_dir, synthetic_parquet):
    lrs = LearningRates()
    module = make_module(tiny_model_dir, optim=OptimConfig(learning_rate=1e-3, warmup_ratio=0.25, lr_scheduler="cosine"))
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=8, callbacks=[lrs])
    # 8 steps, 2 warm-up steps: after optimizer step s the rate is lr * f(s) with
    # f(1) = 2/3 (warm-up (s+1)/(w+1)); then f(s) = (1 + cos(pi * (s - 2) / 6)) / 2 for s = 2..8
    expected = [1e-3 * 2 / 3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(2, 9)]
    assert lrs.values == pytest.approx(expected, rel=1e-6)


def test_gradient_checkpointing_trains(tmp_path, tiny_model_dir, synthetic_parquet):
    capture = GradientCapture()
    policy = PolicyConfig(model_name_or_path=str(tiny_model_dir), gradient_checkpointing=True)
    module = make_module(tiny_model_dir, rewards=("tests.test_module.text_length",), policy=policy)
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=1, callbacks=[capture])
    assert module.policy.is_gradient_checkpointing
    assert sum(float(g.abs().sum()) for g in capture.grads.values()) > 0


def test_processes_with_fewer_micro_batches_back_propagate_zeros(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                 monkeypatch):
    """Under DDP every process must call backward equally often; the padding backward adds exactly zero."""
    grads = []
    for extra in (0, 2):
        capture = GradientCapture()
        module = make_module(tiny_model_dir, rewards=("tests.test_module.text_length",),
                             optim=OptimConfig(learning_rate=1e-2, micro_batch_size=4))
        calls = []
        original = module.manual_backward
        monkeypatch.setattr(module, "manual_backward", lambda loss: (calls.append(1), original(loss)))
        monkeypatch.setattr(update_module, "micro_batches_on_busiest_process",
                            lambda count, device: count + extra)  # as if another rank had more
        fit(tmp_path / str(extra), module, synthetic_parquet, tiny_model_dir, steps=1, callbacks=[capture])
        assert len(calls) == 2 + extra  # 8 rows in micro-batches of 4, plus the padding
        grads.append(capture.grads)
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name


class CountRollouts(RolloutCallback):
    def __init__(self):
        self.old_logps = []

    def on_rollout_scored(self, trainer, pl_module, rollout):
        if rollout.stage == "train":
            self.old_logps.append(rollout.old_logps is not None)


def test_steps_per_generation_takes_several_optimizer_steps_per_rollout(tmp_path, tiny_model_dir, synthetic_parquet):
    counter = CountRollouts()
    module = make_module(tiny_model_dir, rewards=("tests.test_module.text_length",),
                         optim=OptimConfig(learning_rate=1e-3, steps_per_generation=2))
    trainer = fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=4, callbacks=[counter])
    # max_steps counts optimizer steps: 2 rollouts of 2 mini-batch steps; after the first step the policy has
    # moved, so the sampling policy's log-probs were kept for the second
    assert trainer.global_step == 4 and counter.old_logps == [True, True]
    with pytest.raises(ValueError, match="model.optim.steps_per_generation: at most model.rollout.num_generations=4"):
        make_module(tiny_model_dir, optim=OptimConfig(steps_per_generation=5))


def test_masked_truncated_completions_do_not_train(tmp_path, tiny_model_dir, synthetic_parquet):
    """One token and EOS suppressed before it: every completion is truncated. Masked, nothing trains; unmasked, it
    does (the token's text length varies, so the advantages are not zero)."""
    before = {k: v.clone() for k, v in load_policy(str(tiny_model_dir)).state_dict().items()}
    for masked in (True, False):
        module = DAPOModule(
            policy=PolicyConfig(model_name_or_path=str(tiny_model_dir)),
            rollout=RolloutConfig(num_generations=4, max_completion_length=1, min_completion_length=1),
            rewards=RewardConfig(reward_funcs=["tests.test_module.text_length"]),
            loss=LossConfig(mask_truncated_completions=masked),
            optim=OptimConfig(learning_rate=1e-2, weight_decay=0.0),
        )
        fit(tmp_path / str(masked), module, synthetic_parquet, tiny_model_dir, steps=2)
        changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])]
        assert (changed == []) is masked, changed[:3]


class Advantages(RolloutCallback):
    def __init__(self):
        self.seen = []

    def on_rollout_scored(self, trainer, pl_module, rollout):
        if rollout.stage == "train":
            self.seen.append((rollout.rewards_per_func.clone(), rollout.reward_weights.clone(), rollout.advantages.clone()))


def test_normalize_then_sum_sets_the_advantages_of_a_training_step(tmp_path, tiny_model_dir, synthetic_parquet):
    from dapo_lightning.advantages import combine_rewards, group_advantages, normalize_then_sum

    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        probe = Advantages()
        module = DAPOModule(
            policy=PolicyConfig(model_name_or_path=str(tiny_model_dir)),
            rollout=RolloutConfig(num_generations=4, max_completion_length=3),
            rewards=RewardConfig(reward_funcs=["tests.test_module.text_length", "format"], reward_weights=[0.1, 1.0],
                                 multi_objective_aggregation=aggregation),
        )
        fit(tmp_path / aggregation, module, synthetic_parquet, tiny_model_dir, steps=2, callbacks=[probe])
        for per_func, weights, advantages in probe.seen:
            if aggregation == "normalize_then_sum":  # each reward normalised per group, then the batch
                torch.testing.assert_close(advantages, normalize_then_sum(per_func, weights, 4))
            else:
                torch.testing.assert_close(advantages, group_advantages(combine_rewards(per_func, weights), 4))
