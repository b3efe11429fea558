"""Two processes, DDP on the CPU (gloo): the whole loop with attention metrics, token weights, warm-up, dynamic
sampling, replay, the probe and Markdown logs; per-rank data, rank-zero files, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

CALLBACKS = [
    {"class_path": "dapo_lightning.callbacks.AttentionMetrics", "init_args": {"every_n_steps": 1}},
    {"class_path": "dapo_lightning.callbacks.TokenWeights", "init_args": {"smooth_sigma": 1.0, "clip": [0.2, 3.0]}},
    {"class_path": "dapo_lightning.callbacks.RewardWeightWarmup",
     "init_args": {"early_reward_weights": [2.0, 0.0], "warmup_ratio": 0.5}},
    {"class_path": "dapo_lightning.callbacks.DynamicSampling", "init_args": {"oversample_factor": 0.5, "max_tries": 1}},
    {"class_path": "dapo_lightning.callbacks.ReplayBuffer", "init_args": {"replay_buffer_size": 4}},
    {"class_path": "dapo_lightning.callbacks.ModalityProbe", "init_args": {"variants": ["image_text", "text_black"]}},
]


def config(tmp, model_dir, parquet, callbacks, *, record):
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 4, "default_root_dir": str(tmp),
            "val_check_interval": 4, "check_val_every_n_epoch": None, "limit_val_batches": 2,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                *callbacks,
                {"class_path": "dapo_lightning.callbacks.MarkdownRolloutLog", "init_args": {"dirpath": str(tmp / "md")}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1}},
                {"class_path": "dyn_helpers.RankRecorder", "init_args": {"path": str(tmp / record)}},
            ],
        },
        "model": {
            "policy": {"model_name_or_path": str(model_dir)},
            "rollout": {"num_generations": 4, "max_completion_length": 3, "eval_num_generations": 2},
            "rewards": {"reward_funcs": ["dyn_helpers.starts_with_abc", "vgr"], "reward_weights": [1.0, 0.1]},
            "optim": {"learning_rate": 1e-2, "micro_batch_size": 3},
        },
        "data": {"train_path": str(parquet), "batch_size": 2, "eval_batch_size": 2, "eval_limit": 3,
                 "system_prompt": None},
    }


def launch(tmp, cfg, *extra):
    path = tmp / f"config-{len(list(tmp.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    result = subprocess.run([sys.executable, "-m", "dapo_lightning.cli", "fit", "--config", str(path), *extra],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    tmp = tmp_path_factory.mktemp("ddp")
    straight = config(tmp / "straight", tiny_model_dir, synthetic_parquet, CALLBACKS, record="straight")
    launch(tmp, straight)
    resumed = config(tmp / "resumed", tiny_model_dir, synthetic_parquet, CALLBACKS, record="resumed")
    launch(tmp, resumed, "--ckpt_path", str(tmp / "straight" / "ckpt" / "epoch=0-step=2.ckpt"))
    records = {name: [json.loads((tmp / name / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
               for name in ("straight", "resumed")}
    return tmp, records


def test_every_rank_trains_its_own_prompts_with_equal_shapes(ddp_runs):
    _, records = ddp_runs
    rank0, rank1 = records["straight"]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["steps"]) == len(rank1["steps"]) == 4
    for a, b in zip(rank0["steps"], rank1["steps"]):
        assert a["rows"] == b["rows"] == 2 * 4  # B groups of G on every rank, replayed or not
        assert a["micro_batches"] == b["micro_batches"] == 3  # 8 rows in chunks of 3: equal all-reduce counts
    for rank, (record, other) in enumerate(((rank0, rank1), (rank1, rank0))):
        assert record["drawn"]  # dynamic sampling did roll out extra prompts
        for draw in record["drawn"]:
            mine, theirs = record["shards"][str(draw["epoch"])], other["shards"][str(draw["epoch"])]
            # drawn from the rows the loader gives this rank this epoch, never from another rank's
            assert set(draw["index"]) <= set(mine) and set(draw["index"]).isdisjoint(theirs), (draw, rank)
        for step, loader in zip(record["steps"], record["loader"]):
            extra = [i for i, replayed in zip(step["index"], step["replayed"]) if i not in loader and not replayed]
            assert set(extra) <= {i for draw in record["drawn"] for i in draw["index"]}  # kept groups come from there
    for loader0, loader1 in zip(rank0["loader"], rank1["loader"]):
        assert set(loader0).isdisjoint(loader1)  # the loader's per-rank shards


def test_validation_sees_every_held_out_question_once(ddp_runs):
    _, records = ddp_runs
    rank0, rank1 = records["straight"]
    assert sorted(rank0["val_index"] + rank1["val_index"]) == [0, 1, 2]


def test_rank_zero_checkpoint_holds_both_ranks_states(ddp_runs):
    tmp, _ = ddp_runs
    checkpoint = torch.load(tmp / "straight" / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    assert len(checkpoint["rng_states"]) == 2
    buffer = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ReplayBuffer"))
    assert len(buffer["per_rank"]) == 2
    sampling = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("DynamicSampling"))
    assert len(sampling["per_rank"]) == 2


def test_resumed_ddp_run_continues_exactly(ddp_runs):
    tmp, records = ddp_runs
    for rank in (0, 1):
        straight, resumed = records["straight"][rank]["steps"], records["resumed"][rank]["steps"]
        assert len(resumed) == 2
        assert [s["index"] for s in resumed] == [s["index"] for s in straight[2:]], rank
        assert [s["replayed"] for s in resumed] == [s["replayed"] for s in straight[2:]], rank
    final = {name: torch.load(tmp / name / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)["state_dict"]
             for name in ("straight", "resumed")}
    for key, value in final["straight"].items():
        torch.testing.assert_close(final["resumed"][key], value, rtol=0, atol=1e-6, msg=key)


def test_probe_counts_are_summed_over_ranks(ddp_runs):
    tmp, _ = ddp_runs
    from dyn_helpers import scalars

    assert len(scalars(tmp / "straight", "val/probe/text_black/accuracy")) == 1
    assert scalars(tmp / "straight", "val/probe/image_text/accuracy") == scalars(tmp / "straight", "val/accuracy")


def test_attention_metrics_and_markdown_logs_under_ddp(ddp_runs):
    tmp, _ = ddp_runs
    from dyn_helpers import scalars

    run = tmp / "straight"
    assert len(scalars(run, "train/attention/all/vgr")) == 4  # one value a step, reduced over both ranks
    assert len(scalars(run, "train/rewards/vgr/mean")) == 4
    markdown = sorted(p.name for p in (run / "md").iterdir())
    assert "rollout_results.md" in markdown and "eval_results.md" in markdown  # rank 0 writes them, once
    assert (run / "md" / "rollout_results.md").read_text().count("\n# ") == 0  # one title, steps appended
