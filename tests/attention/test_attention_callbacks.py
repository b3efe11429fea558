"""AttentionMetrics, the vgr rewards and TokenWeights in real fits of the tiny model (in-process, a few steps)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.testing import assert_close

from dapo_lightning import distributed
from dapo_lightning.attention import CapturedAttention, token_vgr_weights
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.callbacks import AttentionMetrics, MarkdownRolloutLog, TokenWeights
from dapo_lightning.config import OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.hooks import RolloutCallback
from dapo_lightning.module import DAPOModule
from dapo_lightning.rewards.vgr import vgr_reward


def completion_length(completions, **kwargs):
    """Varies within every group, so every update has non-zero advantages."""
    return [float(len(c)) for c in completions]


LENGTH = f"{__name__}.completion_length"


def make_module(tiny_model_dir, rewards=("accuracy",), weights=None, T=4, lr=1e-2):
    return DAPOModule(
        policy=PolicyConfig(model_name_or_path=str(tiny_model_dir)),
        rollout=RolloutConfig(num_generations=4, max_completion_length=T, eval_num_generations=4),
        rewards=RewardConfig(reward_funcs=list(rewards), reward_weights=weights),
        optim=OptimConfig(learning_rate=lr),
        export_final=False,
    )


def fit(tmp_path, module, synthetic_parquet, tiny_model_dir, *, steps=2, callbacks=(), val=False):
    seed_everything(0)
    data = VisualMCQDataModule(
        train_path=str(synthetic_parquet), processor=str(tiny_model_dir), batch_size=2, eval_limit=2, system_prompt=None
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0,
        val_check_interval=steps if val else None,
        log_every_n_steps=1,
    )
    trainer.fit(module, data)
    return trainer


def scalars(trainer) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(trainer.logger.log_dir)
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


class Probe(RolloutCallback):
    """Records what the rollout carries after scoring."""

    def __init__(self):
        self.seen = []

    def on_rollout_scored(self, trainer, pl_module, rollout):
        self.seen.append(
            {
                "stage": rollout.stage,
                "annotations": dict(rollout.annotations),
                "rewards": rollout.rewards_per_func.clone(),
                "names": list(rollout.reward_names),
                "token_weights": None if rollout.token_weights is None else rollout.token_weights.clone(),
                "completion_mask": rollout.completion_mask.clone(),
                "old_logps": rollout.old_logps,
            }
        )

    def on_rollout_update_end(self, trainer, pl_module, rollout, result):
        self.seen[-1]["loss"] = float(result.metrics()["loss"])


def test_metrics_reach_the_reward_and_tensorboard_for_train_and_val(tmp_path, tiny_model_dir, synthetic_parquet):
    probe = Probe()
    module = make_module(tiny_model_dir, rewards=("accuracy", "vgr"), weights=[1.0, 1.0])
    trainer = fit(tmp_path, module, synthetic_parquet, tiny_model_dir, callbacks=[AttentionMetrics(), probe], val=True)
    train = [s for s in probe.seen if s["stage"] == "train"]
    assert len(train) == 2 and [s["stage"] for s in probe.seen].count("val") == 1
    for seen in probe.seen:
        report = seen["annotations"]["attention"]
        vgr = seen["annotations"]["vgr"].tolist()
        assert len(vgr) == report.num_rows == 8
        assert isinstance(seen["annotations"]["attention_tokens"], CapturedAttention)
        assert seen["old_logps"] is None  # capturing needs no stored old log-probs
        # the reward column is the vgr reward of exactly the values attached to the rollout
        column = seen["rewards"][:, seen["names"].index("vgr")].tolist()
        assert column == pytest.approx(vgr_reward([""] * 8, vgr=vgr, num_generations=4))
        assert report.segment_layers["late"] == range(0, 2)  # 2 layers: late = all, early and middle empty
    logged = scalars(trainer)
    for stage in ("train", "val"):
        for segment in ("late", "all"):
            for metric in ("vgr", "aei_text", "aei_vision", "vision_ratio"):
                assert f"{stage}/attention/{segment}/{metric}" in logged
        for reason in ("no_attention", "no_generation_rows", "no_vision_tokens"):
            assert f"{stage}/attention/skipped/{reason}" in logged
    assert "train/attention/early/vgr" not in logged  # an empty segment is not logged
    # the logged value is the mean over the step's usable rows
    for k, seen in enumerate(train):
        report = seen["annotations"]["attention"]
        values = report.segments["late"].vgr[report.usable]
        assert logged["train/attention/late/vgr"][k] == pytest.approx(float(values.mean()), rel=1e-6)
        assert logged["train/attention/skipped/no_generation_rows"][k] == report.skip_counts()["no_generation_rows"]
    # validation: one value for the epoch, over all its rows
    (val,) = [s["annotations"]["attention"] for s in probe.seen if s["stage"] == "val"]
    assert logged["val/attention/all/aei_vision"] == [
        pytest.approx(float(val.segments["all"].aei_vision[val.usable].mean()), rel=1e-6)
    ]


class CaptureCounter(RolloutCallback):
    def __init__(self):
        self.captured = []

    def on_rollout_scored(self, trainer, pl_module, rollout):
        if rollout.stage == "train":
            self.captured.append("attention" in rollout.annotations)


@pytest.mark.parametrize(
    "rewards, expected", [(("accuracy",), [True, False, True]), (("accuracy", "vgr"), [True, True, True])]
)
def test_every_n_steps_unless_a_reward_needs_every_rollout(
    tmp_path, tiny_model_dir, synthetic_parquet, rewards, expected
):
    counter = CaptureCounter()
    module = make_module(tiny_model_dir, rewards=rewards, T=2)
    metrics = AttentionMetrics(every_n_steps=2, on_validation=False)
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=3, callbacks=[metrics, counter])
    assert counter.captured == expected
    assert metrics.state_dict() == {"train_rollouts": 3}


@pytest.mark.parametrize("reward", ["vgr", "vgr_hard_negative"])
def test_vgr_rewards_without_attention_metrics_fail_at_fit_start(tmp_path, tiny_model_dir, synthetic_parquet, reward):
    module = make_module(tiny_model_dir, rewards=("accuracy", reward), weights=[1.0, 0.5])
    with pytest.raises(ValueError, match=rf"{reward}.*add dapo_lightning\.callbacks\.AttentionMetrics to trainer\.callbacks"):
        fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=1)


@pytest.mark.parametrize(
    "rewards, callbacks, message",
    [
        (("accuracy",), [TokenWeights()], "TokenWeights needs .*add dapo_lightning.callbacks.AttentionMetrics"),
        (("vgr_hard_negative",), [AttentionMetrics()], "list the accuracy reward before it"),
        (("accuracy", "vgr", "vgr_hard_negative"), [AttentionMetrics()], "listed after 'vgr'"),
    ],
)
def test_configuration_conflicts_are_errors_at_fit_start(
    tmp_path, tiny_model_dir, synthetic_parquet, rewards, callbacks, message
):
    module = make_module(tiny_model_dir, rewards=rewards)
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=1, callbacks=callbacks)


def test_token_weights_off_is_the_core_loss_bit_for_bit_and_on_changes_the_update(
    tmp_path, tiny_model_dir, synthetic_parquet
):
    runs = {}
    for name, callbacks in (
        ("core", []),
        ("off", [AttentionMetrics(), MarkdownRolloutLog()]),  # capture and logs, no TokenWeights
        ("on", [AttentionMetrics(), TokenWeights(clip=(0.5, 2.0), topk_ratio=None)]),  # every token: sums kept
    ):
        probe = Probe()
        module = make_module(tiny_model_dir, rewards=(LENGTH,), T=6)
        fit(tmp_path / name, module, synthetic_parquet, tiny_model_dir, steps=2, callbacks=[*callbacks, probe])
        runs[name] = (module, probe)
    core, off, on = runs["core"], runs["off"], runs["on"]
    assert [s["loss"] for s in off[1].seen] == [s["loss"] for s in core[1].seen]
    assert all(s["loss"] != 0 for s in core[1].seen)
    for (key, a), b in zip(core[0].policy.state_dict().items(), off[0].policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    # on: the first rollout is the same (same seed, same policy), its weights are SPEC 4's and the update differs
    first = on[1].seen[0]
    captured = first["annotations"]["attention_tokens"]
    text, vision = captured.token_masses()
    expected = token_vgr_weights(
        text,
        vision,
        captured.rows,
        captured.num_text,
        captured.num_vision,
        first["completion_mask"].shape[1],
        clip=(0.5, 2.0),
    )
    expected = torch.where(first["completion_mask"].bool(), expected, torch.ones_like(expected))
    assert first["token_weights"].shape == first["completion_mask"].shape  # [N, T]
    assert_close(first["token_weights"], expected)
    assert not torch.equal(first["token_weights"], torch.ones_like(expected))
    # mean-normalised weights keep each row's sum at C (the last token has weight 1), so at ratio 1 the loss value is
    # the core's when nothing is clipped; the gradient is not: the weights move the update
    assert on[1].seen[0]["loss"] == pytest.approx(core[1].seen[0]["loss"], rel=1e-5)
    changed = [
        k
        for (k, a), b in zip(core[0].policy.state_dict().items(), on[0].policy.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed


def _hand_rollout(replayed):
    """Two rows of one group (G = 2), 4 completion tokens, with hand-made captured masses."""
    prompts = PromptBatch(
        input_ids=torch.zeros(1, 3, dtype=torch.long),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        pixel_values=torch.zeros(4, 8),
        image_grid_thw=torch.tensor([[1, 2, 2]]),
        image_counts=[1],
    )
    rollout = RolloutBatch(
        prompts=prompts,
        num_generations=2,
        completion_ids=torch.ones(2, 4, dtype=torch.long),
        completion_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        completions=["a", "b"],
        replayed=torch.tensor(replayed),
    )
    text = torch.tensor([[[0.5, 0.8, 0.6], [0.5, 0.0, 0.0]]])  # [L=1, N=2, R=3]
    vision = torch.tensor([[[0.5, 0.2, 0.4], [0.1, 0.0, 0.0]]])
    rows = torch.tensor([[True, True, True], [True, False, False]])
    rollout.annotations["attention_tokens"] = CapturedAttention(
        text, vision, rows, torch.tensor([10, 10]), torch.tensor([2, 2]), torch.ones(1, 2, dtype=torch.bool)
    )
    return rollout


def test_token_weights_are_one_for_replayed_rows_padding_and_last_tokens():
    weights = TokenWeights(clip=None, topk_ratio=None).weights(_hand_rollout([False, False]))
    # row 0: [180, 45, 120] / 115 (see test_attention_formulas), last token 1; row 1: one generation row -> 1, then 1s
    assert_close(
        weights, torch.tensor([[180 / 115, 45 / 115, 120 / 115, 1.0], [1.0, 1.0, 1.0, 1.0]]), atol=1e-5, rtol=0
    )
    replayed = TokenWeights(clip=None, topk_ratio=None).weights(_hand_rollout([True, False]))
    assert_close(replayed, torch.ones(2, 4))


def test_token_weights_reweight_the_top_40_percent_by_default():
    # SPEC 4: token_weights_topk_ratio defaults to 0.4; row 0 has 3 weighted tokens, max(1, floor(0.4 * 3)) = 1 stays
    weights = TokenWeights(clip=None).weights(_hand_rollout([False, False]))
    assert_close(weights, torch.tensor([[180 / 115, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), atol=1e-5, rtol=0)


def test_token_weight_arguments_are_checked():
    with pytest.raises(ValueError, match="TokenWeights.variant"):
        TokenWeights(variant="nope")
    with pytest.raises(ValueError, match="TokenWeights.topk_ratio"):
        TokenWeights(topk_ratio=1.5)
    with pytest.raises(ValueError, match="apply to variant inverse_vgr"):
        TokenWeights(variant="vision_share", topk_ratio=0.2)
    with pytest.raises(ValueError, match="AttentionMetrics.every_n_steps"):
        AttentionMetrics(every_n_steps=0)
    assert math.isclose(
        sum(TokenWeights(variant="vision_share").weights(_hand_rollout([False, False]))[0].tolist()), 1.0, rel_tol=1e-6
    )


def test_logged_values_are_reduced_over_processes_in_one_gather(monkeypatch):
    from types import SimpleNamespace

    metrics = AttentionMetrics()
    names = metrics.metric_names("train")
    mine, theirs = torch.zeros(2, len(names), dtype=torch.float64), torch.zeros(2, len(names), dtype=torch.float64)
    vgr, skips = names.index("train/attention/late/vgr"), names.index("train/attention/skipped/no_vision_tokens")
    mine[:, vgr], theirs[:, vgr] = torch.tensor([3.0, 2.0]), torch.tensor([6.0, 4.0])  # sums over 2 and 4 rows
    mine[:, skips], theirs[:, skips] = torch.tensor([1.0, -1.0]), torch.tensor([2.0, -1.0])  # skipped rows
    logged, gathers = {}, []

    def gather(tensor):
        gathers.append(tensor.shape)
        return torch.stack([tensor, theirs])  # [W, 2, M]

    monkeypatch.setattr(distributed, "gather", gather)
    module = SimpleNamespace(log=lambda key, value, **kw: logged.update({key: value}))
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    metrics._emit(trainer, module, "train", mine, on_step=True)
    assert gathers == [(2, len(names))]  # one collective for every value
    assert logged["train/attention/late/vgr"] == (3.0 + 6.0) / (2 + 4)  # the mean over all processes' rows
    assert logged["train/attention/skipped/no_vision_tokens"] == 3.0
    assert "train/attention/early/vgr" not in logged  # no rows: nothing logged


def test_capture_during_generation_makes_no_second_forward_and_matches_the_teacher_forced_pass(
    tmp_path, tiny_model_dir, synthetic_parquet, monkeypatch
):
    reports = {}
    for during in (True, False):
        probe = Probe()
        module = make_module(tiny_model_dir, rewards=("accuracy", "vgr"), weights=[1.0, 0.2])
        passes = []
        module.configure_model()  # makes the actor (fit keeps it): count its passes over the completions
        original = module.actor.completion_logps

        def counting(rollout, rows, **kwargs):
            passes.append(torch.is_grad_enabled())
            return original(rollout, rows, **kwargs)

        monkeypatch.setattr(module.actor, "completion_logps", counting)
        fit(tmp_path / str(during), module, synthetic_parquet, tiny_model_dir, steps=1,
            callbacks=[AttentionMetrics(capture_during_generation=during), probe])
        no_grad_passes = passes.count(False)
        assert no_grad_passes == (0 if during else 1)  # one chunk: the teacher-forced pass, only when needed
        reports[during] = probe.seen[0]["annotations"]["vgr"].tolist()
    # same sampled completions (same seed), same statistics from either capture
    torch.testing.assert_close(torch.tensor(reports[True]), torch.tensor(reports[False]), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
