"""A NaN or inf anywhere in a step is caught before the optimizer step, named, and the step is skipped.

Each fault is injected into a real fit of the tiny model: a reward returning NaN, a callback
writing NaN/inf into the advantages or the token weights, log-probs with a NaN (a patched
``completion_logps``), a loss that overflows with finite log-probs, a gradient hook producing
inf. The skipped steps leave the weights, the optimizer state and the learning-rate schedule
untouched; ``max_bad_steps`` in a row stop the run with a checkpoint; under DDP the processes
skip together.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from lightning.pytorch import Callback
from rel_helpers import (
    _calls,
    cli_config,
    fit,
    make_module,
    parameters,
    scalars,
    start_cli,
    write_config,
)

from dapo_lightning.guards import Fault, gradient_fault, nonfinite_rows, row_fault
from dapo_lightning.models import load_policy
from dapo_lightning.module import NonFiniteStepError
from dapo_lightning.hooks import RolloutCallback


class PoisonRollout(RolloutCallback):
    """Writes a NaN or inf into one tensor of each training rollout after scoring (before the loss)."""

    def __init__(self, target: str):
        self.target = target

    def on_rollout_scored(self, trainer, module, rollout):
        if rollout.stage != "train":
            return
        if self.target == "advantages":
            rollout.advantages[3] = math.nan
        elif self.target == "token_weights":
            rollout.token_weights = torch.ones_like(rollout.completion_mask, dtype=torch.float32)
            rollout.token_weights[2, 0] = math.inf


class InfGradient(Callback):
    """A backward hook that turns one parameter's gradient into inf/NaN."""

    name = "model.language_model.layers.1.mlp.down_proj.weight"

    def on_train_start(self, trainer, module):
        dict(module.policy.named_parameters())[self.name].register_hook(lambda grad: grad * math.inf)


def nan_logps(module):
    original = module.completion_logps

    def patched(rollout, rows, **kwargs):
        out = original(rollout, rows, **kwargs)
        if "with_entropy" in kwargs and 1 in rows:  # the update's passes, not the teacher-forced one
            out.logps = out.logps.clone()
            out.logps[rows.index(1), 0] = math.nan
        return out

    module.completion_logps = patched


def inf_loss(monkeypatch):
    """Finite log-probs, but the loss overflows (as a ratio exp(logp - old_logp) can): only the loss check sees it."""
    import dapo_lightning.update as update_file

    original = update_file.dapo_policy_loss

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = out.loss * math.inf
        return out

    monkeypatch.setattr(update_file, "dapo_policy_loss", patched)


CASES = {
    "reward": ({"rewards": ("rel_helpers.nan_for_row_one",)}, None,
               "rewards/rel_helpers.nan_for_row_one at rows [1]"),
    "advantages": ({}, PoisonRollout("advantages"), "advantages at rows [3]"),
    "token_weights": ({}, PoisonRollout("token_weights"), "token_weights at rows [2]"),
    "logps": ({}, "logps", "logps at rows [1]"),
    "loss": ({}, "loss", "loss at rows [0, 1, 2, 3, 4, 5, 6, 7]"),
    "gradients": ({}, InfGradient(), f"gradients of [{InfGradient.name}]"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.reliability("Faults", "Non-finite {case} injected in every step",
                         "each step skipped before the optimizer step, logged with the tensor and rows; weights, "
                         "optimizer state and LR schedule unchanged; train/bad_steps counts them")
def test_a_non_finite_value_skips_the_step_and_names_it(case, tmp_path, tiny_model_dir, synthetic_parquet, caplog,
                                                        monkeypatch):
    overrides, injector, message = CASES[case]
    module = make_module(tiny_model_dir, max_bad_steps=None, **overrides)
    callbacks = [injector] if isinstance(injector, Callback) else []
    if injector == "logps":
        module.configure_model()
        nan_logps(module)
    if injector == "loss":
        inf_loss(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dapo_lightning.module"):
        trainer = fit(tmp_path, module, tiny_model_dir, synthetic_parquet, batches=2, callbacks=callbacks)
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 2 and all(message in w for w in warnings), warnings
    assert "step 0: skipped (1 in a row)" in warnings[0] and "(2 in a row)" in warnings[1]
    if case != "gradients":  # the question of the bad rows, by parquet file and row, to find it in the data
        assert f"(from {synthetic_parquet}: rows [" in warnings[0]
    if case == "loss":
        assert "logps" not in warnings[0]  # the log-probs were finite: the loss check alone caught it
    if case == "logps":
        assert "loss at rows [0, 1, 2, 3, 4, 5, 6, 7]" in warnings[0]  # the micro-batch's loss is NaN too
    assert trainer.global_step == 0 and module.bad_steps == 2  # skipped steps are not optimizer steps
    initial = dict(load_policy(str(tiny_model_dir)).named_parameters())
    for name, value in parameters(module).items():
        torch.testing.assert_close(value, initial[name].detach(), rtol=0, atol=0, msg=name)
    optimizer = trainer.optimizers[0]
    assert not optimizer.state and all(p.grad is None for p in module.policy.parameters())
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
    assert [v for _, v in scalars(tmp_path, "train/bad_steps")] == [1.0, 2.0]


@pytest.mark.reliability("Faults", "A transient NaN reward in the first step only",
                         "that step is skipped, the next ones train; the consecutive count resets")
def test_a_transient_fault_skips_one_step_then_training_goes_on(tmp_path, tiny_model_dir, synthetic_parquet):
    _calls["nan_once"] = 0
    module = make_module(tiny_model_dir, rewards=("rel_helpers.nan_once",), max_bad_steps=1)
    with pytest.raises(NonFiniteStepError):  # max_bad_steps=1: the first bad step stops the run
        fit(tmp_path / "strict", module, tiny_model_dir, synthetic_parquet, batches=3)
    _calls["nan_once"] = 0
    module = make_module(tiny_model_dir, rewards=("rel_helpers.nan_once",), max_bad_steps=2)
    trainer = fit(tmp_path, module, tiny_model_dir, synthetic_parquet, batches=3)
    assert trainer.global_step == 2 and module.bad_steps == 1 and module.consecutive_bad_steps == 0
    assert [v for _, v in scalars(tmp_path, "train/bad_steps")] == [1.0, 1.0, 1.0]


@pytest.mark.reliability("Faults", "max_bad_steps consecutive non-finite steps (reward always NaN)",
                         "the run stops with NonFiniteStepError naming the tensor, after saving a checkpoint that "
                         "loads (weights_only) and holds the untouched weights")
def test_too_many_bad_steps_stop_the_run_with_a_checkpoint(tmp_path, tiny_model_dir, synthetic_parquet):
    module = make_module(tiny_model_dir, rewards=("rel_helpers.always_nan",), max_bad_steps=2)
    with pytest.raises(NonFiniteStepError) as stop:
        fit(tmp_path, module, tiny_model_dir, synthetic_parquet, batches=5)
    message = str(stop.value)
    path = tmp_path / "bad-steps-step=0.ckpt"
    assert "2 training steps in a row had non-finite values (model.optim.max_bad_steps=2)" in message
    assert "rewards/rel_helpers.always_nan at rows [0, 1, 2, 3, 4, 5, 6, 7]" in message and str(path) in message
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["bad_steps"] == {"total": 2, "consecutive": 2}
    initial = dict(load_policy(str(tiny_model_dir)).named_parameters())
    for name, value in checkpoint["state_dict"].items():
        if name.startswith("policy."):
            torch.testing.assert_close(value, initial[name[len("policy."):]].detach(), rtol=0, atol=0)


def test_guard_helpers_by_hand():
    values = torch.tensor([[0.0, 1.0, 2.0], [0.0, math.nan, 0.0], [math.inf, 0.0, 0.0]])  # [3, 3]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]])  # row 1's NaN is padding
    assert nonfinite_rows(values) == [1, 2]
    assert nonfinite_rows(values, mask) == [2]
    assert row_fault("logps", values, mask, rows=[10, 11, 12]) == [Fault("logps", (12,))]
    assert row_fault("logps", None) == []
    fault = Fault("rewards/x", (1, 5, 6)).located([40, 41], num_generations=4)
    assert fault.dataset_rows == (40, 41) and fault.describe() == "rewards/x at rows [1, 5, 6] (dataset rows [40, 41])"
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layer.bias.grad = torch.tensor([0.0, math.nan])
    assert gradient_fault(layer.named_parameters()) == Fault("gradients", names=("bias",))
    layer.bias.grad = torch.tensor([3e38, 3e38])  # finite, but its norm overflows float32: unusable
    assert gradient_fault(layer.named_parameters()) == Fault("gradients", names=("bias",))
    layer.bias.grad = None
    assert gradient_fault(layer.named_parameters()) is None


@pytest.mark.slow
@pytest.mark.reliability("Faults", "NaN reward on DDP rank 1 only (2 processes, gloo)",
                         "both processes skip the same step (all-reduced decision) and end with identical weights")
def test_under_ddp_every_process_skips_together(tmp_path, tiny_model_dir, synthetic_parquet):
    config = cli_config(tmp_path, tiny_model_dir, synthetic_parquet, steps=-1, callbacks=[
        {"class_path": "rel_helpers.ParamDigest", "init_args": {"path": str(tmp_path / "digest")}}])
    config["trainer"].update({"devices": 2, "strategy": "ddp", "limit_train_batches": 3, "max_epochs": 1})
    config["model"]["rewards"] = {"reward_funcs": ["rel_helpers.nan_on_rank_one_first_step"]}
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "Warmup" not in c["class_path"]]
    process = start_cli(write_config(tmp_path, config), log=tmp_path / "log.txt")
    assert process.wait(300) == 0, (tmp_path / "log.txt").read_text()[-5000:]
    ranks = [json.loads((tmp_path / f"digest.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [2, 2] and [r["bad_steps"] for r in ranks] == [1, 1]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert "[rank: 1] step 0: skipped (1 in a row), non-finite rewards/" in (tmp_path / "log.txt").read_text()
