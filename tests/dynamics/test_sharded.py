"""Parameter sharding (issue 16): every process makes the same forwards, so none waits forever.

Under FSDP (and DeepSpeed ZeRO-3) every forward of the policy is a collective. Two CPU processes (gloo) run the
project's passes on the tiny policy sharded with torch's FSDP2 (``sharded_worker.py``; Lightning's ``FSDPStrategy``
refuses the CPU), with each process's rows finishing at a different step: the decoders, the log-prob forward and
backward, the update's padding micro-batch and the teacher-forced pass make as many forwards on both, and give what
the same weights give unsharded on one process; the end-of-fit export gathers the full parameters. Without sharding
(one process, DDP) none of this adds a collective: the single-process run is unchanged (``test_demo_reference.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dapo_lightning import distributed, fit_checks
from dapo_lightning.config import OptimConfig
from dapo_lightning.data.samplers import ShardSampler

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(HERE / "sharded_worker.py"), str(out),
                             str(tiny_model_dir), str(synthetic_parquet)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_policy_is_sharded(sharded):
    _, (rank0, rank1) = sharded
    assert rank0["sharded"] == rank1["sharded"] == ["DTensor"]


def test_the_shared_prompt_decoder_steps_until_every_process_is_done(sharded):
    _, (rank0, rank1) = sharded
    assert (rank0["shared_width"], rank1["shared_width"]) == (1, 4)  # rows done at step 0 here, at step 3 there
    assert rank0["alone_forwards"] == 1 and rank1["alone_forwards"] == 4  # alone: a prefill, then 0 or 3 steps
    assert rank0["shared_forwards"] == rank1["shared_forwards"] == 4  # lockstep: rank 0 idles on padding 3 times
    assert rank0["shared_decode_steps"] == [] and rank1["shared_decode_steps"] == [0, 1, 2]  # no hooks when idle
    assert rank0["shared_same_as_alone"] and rank1["shared_same_as_alone"]  # same tokens as unsharded, alone


def test_generate_steps_until_every_process_is_done(sharded):
    _, (rank0, rank1) = sharded
    assert (rank0["hf_width"], rank1["hf_width"]) == (1, 4)
    assert rank0["hf_forwards"] == rank1["hf_forwards"] == 4  # synced_gpus
    assert rank0["hf_same_as_alone"] and rank1["hf_same_as_alone"]


def test_log_probs_and_their_gradients_with_one_token_completions_on_one_process(sharded):
    _, (rank0, rank1) = sharded
    assert rank0["logps_forwards"] == rank1["logps_forwards"] == 2  # prompt, completions (width 1: its token, x 0)
    for rank in (rank0, rank1):
        assert rank["logps_same_as_alone"] and rank["grads_same_as_alone"]


def test_the_updates_padding_micro_batch_runs_a_forward_and_adds_no_gradient(sharded):
    _, (rank0, rank1) = sharded
    assert rank0["padding_forwards"] == rank1["padding_forwards"] == 2
    assert rank0["padding_grads_same_as_alone"] and rank1["padding_grads_same_as_alone"]


def test_the_teacher_forced_pass_makes_as_many_forwards_as_the_busiest_process(sharded):
    _, (rank0, rank1) = sharded
    assert rank0["teacher_forced_forwards"] == rank1["teacher_forced_forwards"] == 4  # 1 chunk + 1 idle vs 2 chunks
    assert rank0["teacher_forced_same_as_alone"] and rank1["teacher_forced_same_as_alone"]


def test_the_export_gathers_the_full_parameters_to_rank_zero(sharded):
    _, (rank0, rank1) = sharded
    assert rank0["gathered_keys"] == 57 and rank1["gathered_keys"] == 0
    assert rank0["export_same_as_alone"]


# --- which strategies shard, and what they are refused ------------------------------------------------


def test_only_sharding_strategies_run_in_lockstep():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, \
        SingleDeviceStrategy

    assert not distributed.shards_parameters(None)
    assert not distributed.shards_parameters(SingleDeviceStrategy("cpu"))
    assert not distributed.shards_parameters(DDPStrategy())
    assert not distributed.shards_parameters(SimpleNamespace(strategy=DDPStrategy()))  # a trainer
    assert distributed.shards_parameters(FSDPStrategy())
    assert distributed.shards_parameters(ModelParallelStrategy())
    assert not distributed.shards_parameters(DeepSpeedStrategy(config=str(ROOT / "configs" / "deepspeed_zero2.json")))
    assert distributed.shards_parameters(DeepSpeedStrategy(config={"zero_optimization": {"stage": 3}}))


def test_without_sharding_no_collective_is_added(monkeypatch, policy, processor, prompt_batch):
    """One process and DDP decode and run their passes exactly as before: not one lockstep all-reduce."""
    from dapo_lightning.actor import Actor
    from dapo_lightning.config import PolicyConfig, RolloutConfig
    from dapo_lightning.rollout import SamplingSettings, TokenIds, generate

    def refuse(*args, **kwargs):
        raise AssertionError("a lockstep collective without sharding")

    monkeypatch.setattr(distributed, "any_process", refuse)
    monkeypatch.setattr(distributed, "most", refuse)
    token_ids = TokenIds.from_tokenizer(processor.tokenizer, policy.generation_config)
    rollout = generate(policy.eval(), prompt_batch, processor.tokenizer, SamplingSettings(2, 4), token_ids)
    actor = Actor(policy, None, processor, PolicyConfig(), RolloutConfig(num_generations=2, max_completion_length=4))
    assert actor.lockstep is False
    actor.teacher_forced(rollout, [[0, 1, 2], [3, 4, 5]], [], old=True, reference=False)
    assert rollout.old_logps.shape[0] == 6


def test_deepspeed_zero3_is_refused_at_fit_start_naming_the_setting():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(config={"zero_optimization": {"stage": 3}}), datamodule=None)
    with pytest.raises(ValueError, match=r'trainer.strategy: DeepSpeed ZeRO stage 3 \("zero_optimization": '
                                         r'\{"stage": 3\}\) is not supported'):
        fit_checks.check_strategy(trainer, OptimConfig())
    zero2 = SimpleNamespace(strategy=DeepSpeedStrategy(config=str(ROOT / "configs" / "deepspeed_zero2.json")),
                            datamodule=None)
    fit_checks.check_strategy(zero2, OptimConfig(micro_batch_size=4))  # the experiments' strategy passes


def test_skipping_unusable_rows_is_refused_under_sharding():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    data = SimpleNamespace(hparams={"on_bad_row": "skip"})
    with pytest.raises(ValueError, match="data.on_bad_row: skip cannot be used when trainer.strategy shards"):
        fit_checks.check_strategy(SimpleNamespace(strategy=FSDPStrategy(), datamodule=data), OptimConfig())
    fit_checks.check_strategy(SimpleNamespace(strategy=DDPStrategy(), datamodule=data), OptimConfig())


def test_held_out_shards_are_padded_to_equal_length_only_under_sharding():
    """5 questions on 2 processes: 3 and 2 batches of 1 would leave rank 1 out of rank 0's last forwards."""
    assert [ShardSampler(5, r, 2).indices for r in (0, 1)] == [[0, 2, 4], [1, 3]]  # DDP: each question once
    assert [ShardSampler(5, r, 2, pad=True).indices for r in (0, 1)] == [[0, 2, 4], [1, 3, 0]]
    assert [ShardSampler(3, r, 4, pad=True).indices for r in range(4)] == [[0], [1], [2], [0]]
    assert [len(ShardSampler(6, r, 3, pad=True)) for r in range(3)] == [2, 2, 2]  # even: nothing repeated
