"""fit --ckpt_path: model, optimizer, scheduler, RNG, data order, warm-up and replay buffer come back exactly."""

from __future__ import annotations

import pytest
import torch
import yaml
from dyn_helpers import RolloutLog, fit, make_data, make_module, make_trainer, parameters
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from dapo_lightning.callbacks import DynamicSampling, ReplayBuffer, RewardWeightWarmup
from dapo_lightning.cli import main
from dapo_lightning.models import load_policy

REWARDS = ("dyn_helpers.starts_with_abc", "format")


class StopAfter(Callback):
    """Interrupts a run configured for more steps (the schedule and warm-up see the full run's length)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def callbacks(tmp, **buffer):
    return [
        RewardWeightWarmup(early_reward_weights=[2.0, 0.5], warmup_ratio=0.5),
        DynamicSampling(max_tries=1, oversample_factor=0.5),
        ReplayBuffer(replay_buffer_size=buffer.get("size", 3)),
        ModelCheckpoint(dirpath=str(tmp / "ckpt"), every_n_train_steps=2, save_top_k=-1, save_last=True),
        RolloutLog(),
    ]


def run(tmp, model_dir, parquet, *, steps=4, stop_after=None, ckpt_path=None, cbs=None, module=None):
    cbs = cbs if cbs is not None else callbacks(tmp)
    if stop_after is not None:
        cbs = [*cbs, StopAfter(stop_after)]
    module = module or make_module(model_dir, rewards=REWARDS, weights=[1.0, 1.0])
    # 36 training rows / batch 2 = 18 batches an epoch: steps 2 -> 4 stay inside the first epoch
    trainer = fit(tmp, module, make_data(parquet, model_dir), steps=steps, callbacks=cbs, checkpoint=True,
                  ckpt_path=ckpt_path, val_every=3, num_sanity_val_steps=1)
    return trainer, module, cbs


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    straight_dir, split_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("split")
    _, straight, straight_cbs = run(straight_dir, tiny_model_dir, synthetic_parquet)
    run(split_dir, tiny_model_dir, synthetic_parquet, stop_after=2)
    trainer, resumed, resumed_cbs = run(split_dir, tiny_model_dir, synthetic_parquet,
                                        ckpt_path=str(split_dir / "ckpt" / "epoch=0-step=2.ckpt"))
    return straight, straight_cbs, resumed, resumed_cbs, trainer, split_dir


def test_two_steps_resume_two_steps_equals_four_steps(straight_and_resumed):
    straight, straight_cbs, resumed, resumed_cbs, trainer, _ = straight_and_resumed
    assert trainer.global_step == 4
    a, b = parameters(straight), parameters(resumed)
    assert a.keys() == b.keys()
    initial = dict(load_policy(straight.policy_cfg.model_name_or_path).named_parameters())
    moved = max(float((a[n] - p.detach()).abs().max()) for n, p in initial.items())
    assert moved > 1e-3  # the steps did change the weights
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_resumed_steps_see_the_same_prompts_rewards_and_replays(straight_and_resumed):
    _, straight_cbs, _, resumed_cbs, _, _ = straight_and_resumed
    straight_log, resumed_log = straight_cbs[4].steps, resumed_cbs[4].steps
    assert len(straight_log) == 4 and len(resumed_log) == 2
    # the compared steps exercise replay and dynamic sampling's extra prompts (indices beyond the loader's B=2)
    assert any(bool(s["replayed"].any()) for s in straight_log[2:]), [s["replayed"] for s in straight_log]
    for s, r in zip(straight_log[2:], resumed_log):
        assert r["index"] == s["index"]  # data order (and dynamic sampling's extra prompts) continue
        assert torch.equal(r["replayed"], s["replayed"])
        torch.testing.assert_close(r["rewards"], s["rewards"], rtol=0, atol=0)  # same sampled completions


def test_replay_buffer_and_warmup_state_are_restored(straight_and_resumed):
    _, straight_cbs, _, resumed_cbs, _, _ = straight_and_resumed
    warm_a, warm_b = straight_cbs[0], resumed_cbs[0]
    assert warm_a.boundary == warm_b.boundary == 2  # int(4 * 0.5)
    buffer_a, buffer_b = straight_cbs[2], resumed_cbs[2]
    assert len(buffer_a) == len(buffer_b) > 0
    assert buffer_a.scores == pytest.approx(buffer_b.scores, abs=1e-6)
    for (_, _, ra), (_, _, rb) in zip(buffer_a._heap, buffer_b._heap):
        assert torch.equal(ra.prompt.input_ids, rb.prompt.input_ids)
        assert torch.equal(ra.rows["completion_ids"], rb.rows["completion_ids"])
    assert torch.equal(buffer_a._generator.get_state(), buffer_b._generator.get_state())


def test_checkpoint_loads_with_weights_only_and_holds_every_state(straight_and_resumed):
    *_, split_dir = straight_and_resumed
    checkpoint = torch.load(split_dir / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)  # only plain data
    assert checkpoint["global_step"] == 2
    assert {"optimizer_states", "lr_schedulers", "rng_states", "VisualMCQDataModule"} <= checkpoint.keys()
    assert len(checkpoint["rng_states"]) == 1  # one per rank
    states = {key.split("{")[0]: value for key, value in checkpoint["callbacks"].items()}
    assert states["RewardWeightWarmup"]["boundary"] == 2
    buffer = states["ReplayBuffer"]
    assert buffer["replay_buffer_size"] == 3 and len(buffer["per_rank"]) == 1
    group = buffer["per_rank"][0]["groups"][0]["record"]
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= group["prompt"].keys()
    assert {"completion_ids", "completion_mask", "advantages", "old_logps", "rewards"} <= group["rows"].keys()


def test_buffer_contents_can_be_left_out(tmp_path, tiny_model_dir, synthetic_parquet):
    cbs = callbacks(tmp_path)
    cbs[2] = ReplayBuffer(replay_buffer_size=3, save_in_checkpoint=False)
    run(tmp_path, tiny_model_dir, synthetic_parquet, stop_after=2, cbs=cbs)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    buffer = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ReplayBuffer"))
    assert len(cbs[2]) > 0 and buffer["per_rank"][0]["groups"] == [] and not buffer["contents_saved"]


@pytest.mark.parametrize(
    "change, message",
    [
        ("early_weights", "RewardWeightWarmup.early_reward_weights"),
        ("buffer_size", "ReplayBuffer.replay_buffer_size"),
        ("num_generations", "model.rollout.num_generations"),
    ],
)
def test_resuming_with_another_config_names_the_key(straight_and_resumed, tiny_model_dir, synthetic_parquet,
                                                    tmp_path, change, message):
    *_, split_dir = straight_and_resumed
    cbs = callbacks(tmp_path, size=5 if change == "buffer_size" else 3)
    if change == "early_weights":
        cbs[0] = RewardWeightWarmup(early_reward_weights=[1.0, 1.0], warmup_ratio=0.5)
    module = make_module(tiny_model_dir, rewards=REWARDS, weights=[1.0, 1.0],
                         G=2 if change == "num_generations" else 4)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run(tmp_path, tiny_model_dir, synthetic_parquet, cbs=cbs, module=module,
            ckpt_path=str(split_dir / "ckpt" / "epoch=0-step=2.ckpt"))


def test_resuming_with_another_batch_size_names_the_key(straight_and_resumed, tiny_model_dir, synthetic_parquet,
                                                        tmp_path):
    *_, split_dir = straight_and_resumed
    module = make_module(tiny_model_dir, rewards=REWARDS, weights=[1.0, 1.0])
    trainer = make_trainer(tmp_path, steps=4, callbacks=callbacks(tmp_path), checkpoint=True)
    with pytest.raises(ValueError, match=r"data\.batch_size: the checkpoint was trained with 2 prompts per step"):
        trainer.fit(module, make_data(synthetic_parquet, tiny_model_dir, batch_size=3),
                    ckpt_path=str(split_dir / "ckpt" / "epoch=0-step=2.ckpt"))


def test_the_cli_refuses_a_checkpoint_of_another_experiment(straight_and_resumed, tiny_model_dir, synthetic_parquet,
                                                           tmp_path):
    """Lightning's CLI would silently replace the model config by the checkpoint's; a structural change is an error."""
    *_, split_dir = straight_and_resumed
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_steps": 4, "default_root_dir": str(tmp_path)},
        "model": {"policy": {"model_name_or_path": str(tiny_model_dir)},
                  "rollout": {"num_generations": 2, "max_completion_length": 3},
                  "rewards": {"reward_funcs": list(REWARDS)}},
        "data": {"train_path": str(synthetic_parquet), "batch_size": 2, "system_prompt": None},
    }))
    with pytest.raises(ValueError, match=r"model\.rollout\.num_generations: checkpoint .* was trained with 4, "
                                         r"this configuration has 2"):
        main(["fit", "--config", str(config), "--ckpt_path", str(split_dir / "ckpt" / "epoch=0-step=2.ckpt")])


def cli_config(tmp_path, tiny_model_dir, synthetic_parquet):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 4, "default_root_dir": str(tmp_path / "run"), "log_every_n_steps": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "dapo_lightning.callbacks.RewardWeightWarmup", "init_args": {"early_reward_weights": [2.0, 0.5]}},
                {"class_path": "dapo_lightning.callbacks.ReplayBuffer", "init_args": {"replay_buffer_size": 3}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_last": True}},
            ],
        },
        "model": {"policy": {"model_name_or_path": str(tiny_model_dir)},
                  "rollout": {"num_generations": 4, "max_completion_length": 3},
                  "rewards": {"reward_funcs": list(REWARDS)}, "export_final": False},
        "data": {"train_path": str(synthetic_parquet), "batch_size": 2, "system_prompt": None},
    }))
    return config


def test_fit_ckpt_path_last_through_the_cli(tmp_path, tiny_model_dir, synthetic_parquet):
    """The documented command: ``dapo-lightning fit --config ... --ckpt_path last``."""
    config = cli_config(tmp_path, tiny_model_dir, synthetic_parquet)
    main(["fit", "--config", str(config), "--trainer.max_steps=2"])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    buffer = next(v for k, v in resumed["callbacks"].items() if k.startswith("ReplayBuffer"))
    assert buffer["per_rank"][0]["counter"] > 0  # the buffer went on filling after the resume


def test_a_resume_at_an_epoch_boundary_continues_exactly(tmp_path, tiny_model_dir, synthetic_parquet):
    """Epochs of 2 steps: the step-2 checkpoint is the end of epoch 0, and the resumed run's epoch 1 is the straight
    run's (the sampler's next shuffle, dynamic sampling's and the buffer's generators, the weights)."""

    def run_epochs(root, *, stop_after=None, ckpt_path=None):
        cbs = [*callbacks(root), *([StopAfter(stop_after)] if stop_after else [])]
        module = make_module(tiny_model_dir, rewards=REWARDS, weights=[1.0, 1.0])
        trainer = fit(root, module, make_data(synthetic_parquet, tiny_model_dir), steps=4, callbacks=cbs,
                      checkpoint=True, ckpt_path=ckpt_path, limit_train_batches=2)
        return trainer, module, cbs[4].steps

    _, straight, straight_log = run_epochs(tmp_path / "straight")
    run_epochs(tmp_path / "split", stop_after=2)
    trainer, resumed, resumed_log = run_epochs(tmp_path / "split",
                                               ckpt_path=str(tmp_path / "split" / "ckpt" / "epoch=0-step=2.ckpt"))
    assert trainer.global_step == 4 and trainer.current_epoch == 2 and len(resumed_log) == 2
    assert straight_log[0]["index"] != straight_log[2]["index"]  # epoch 1 is a new shuffle, not a replay of epoch 0
    for s, r in zip(straight_log[2:], resumed_log):
        assert r["index"] == s["index"]
        torch.testing.assert_close(r["rewards"], s["rewards"], rtol=0, atol=0)
    a, b = parameters(straight), parameters(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_a_resume_uses_the_given_configuration_and_names_what_differs(tmp_path, tiny_model_dir, synthetic_parquet):
    """An explicit checkpoint file behaves like ``last``: the configuration given wins (Lightning's CLI would take
    the checkpoint's settings instead, silently), and the differences are listed."""
    config = cli_config(tmp_path, tiny_model_dir, synthetic_parquet)
    main(["fit", "--config", str(config), "--trainer.max_steps=2"])
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    with pytest.warns(UserWarning, match="resuming with settings that differ") as caught:
        main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--model.rollout.temperature=0.7",
              "--model.optim.learning_rate=1e-7"])
    message = next(str(w.message) for w in caught if "resuming with settings" in str(w.message))
    assert "model.rollout.temperature: 1.0 in the checkpoint, 0.7 now" in message
    assert "model.optim.learning_rate: the optimizer and learning-rate scheduler states" in message
    assert "max_completion_length" not in message  # only what differs
    resumed = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["hyper_parameters"]["rollout"]["temperature"] == 0.7


def test_settings_added_since_a_checkpoint_count_only_when_set_away_from_their_default():
    from dapo_lightning.checkpointing import changed_settings
    from dapo_lightning.config import default_settings

    defaults = default_settings()
    saved = {section: dict(values) for section, values in defaults.items()}
    del saved["rollout"]["min_p"], saved["optim"]["steps_per_generation"]  # an older checkpoint: no such keys
    current = {section: dict(values) for section, values in defaults.items()}
    assert changed_settings(saved, current, defaults) == []  # it trained with the defaults
    current["optim"]["steps_per_generation"] = 2
    assert changed_settings(saved, current, defaults) == [("model.optim.steps_per_generation", None, 2)]
    assert ("model.rollout.min_p", None, 0.0) in changed_settings(saved, current)  # without defaults: listed


def test_extending_a_finished_run_continues_its_epoch(tmp_path, tiny_model_dir, synthetic_parquet):
    """A fit that ended at max_steps 2 writes last.ckpt as if its epoch were over (Lightning); resumed with max_steps
    4, it must continue the same epoch's order, as a straight 4-step run does, not start a new shuffle."""
    from dapo_lightning.config import OptimConfig

    def run_steps(root, steps, ckpt_path=None):
        log = RolloutLog()
        module = make_module(tiny_model_dir, rewards=REWARDS, weights=[1.0, 1.0],
                             optim=OptimConfig(learning_rate=1e-2, lr_scheduler="constant"))
        cbs = [ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True), log]
        fit(root, module, make_data(synthetic_parquet, tiny_model_dir), steps=steps, callbacks=cbs,
            checkpoint=True, ckpt_path=ckpt_path)
        return module, log.loader

    straight, straight_batches = run_steps(tmp_path / "straight", 4)
    run_steps(tmp_path / "split", 2)
    resumed, resumed_batches = run_steps(tmp_path / "split", 4, ckpt_path=str(tmp_path / "split" / "ckpt" / "last.ckpt"))
    assert resumed_batches == straight_batches[2:]
    a, b = parameters(straight), parameters(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
