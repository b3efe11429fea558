"""Soak test: does a long run's memory stay flat? RSS per process, sampled every N steps.

Trains the offline tiny Qwen2.5-VL on the synthetic colour questions with every callback
on (attention metrics, token weights, reward warm-up, dynamic sampling, the replay
buffer, the modality probe, Markdown logs every step, a checkpoint every ``--every`` steps,
validation every second sample, graceful shutdown) under DDP with 2 processes on the CPU, and records each process's resident
memory (RSS, after ``gc.collect()``) every ``--every`` steps. It prints the table and the
growth of each process after warm-up, (RSS at the end - RSS at the warm-up step) / RSS at
the warm-up step; a leak (a replay buffer, a log, an attention capture that keeps
something per step) shows as growth proportional to the steps.

    python -m benchmarks.soak                                # 500 steps, samples every 50, warm-up 100
    python -m benchmarks.soak --steps 50 --every 10 --warmup 20 --out runs/soak-short

Writes ``rss.json`` (every sample) and ``rss.md`` (the table) under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent


class RSSMonitor(Callback):
    """Appends ``{"rank", "step", "rss"}`` (bytes, after a garbage collection) to ``<folder>/rss-rank<r>.jsonl``."""

    def __init__(self, folder: str, every_n_steps: int = 50):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps

    def _sample(self, trainer) -> None:
        import psutil

        gc.collect()
        record = {"rank": trainer.global_rank, "step": trainer.global_step, "rss": psutil.Process().memory_info().rss}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rss-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._sample(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._sample(trainer)


def config(out: Path, steps: int, every: int, devices: int, buffer: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "max_steps": steps, "default_root_dir": str(out / "run"), "val_check_interval": 2 * every,
            "check_val_every_n_epoch": None, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "dapo_lightning.callbacks.AttentionMetrics", "init_args": {"every_n_steps": 1}},
                {"class_path": "dapo_lightning.callbacks.TokenWeights", "init_args": {"smooth_sigma": 1.0}},
                {"class_path": "dapo_lightning.callbacks.RewardWeightWarmup",
                 "init_args": {"early_reward_weights": [1.0, 0.0, 1.0], "warmup_ratio": 0.1}},
                {"class_path": "dapo_lightning.callbacks.DynamicSampling", "init_args": {"oversample_factor": 0.5, "max_tries": 1}},
                {"class_path": "dapo_lightning.callbacks.ReplayBuffer", "init_args": {"replay_buffer_size": buffer}},
                {"class_path": "dapo_lightning.callbacks.ModalityProbe", "init_args": {"variants": ["image_text", "text_black"]}},
                {"class_path": "dapo_lightning.callbacks.MarkdownRolloutLog", "init_args": {"every_n_steps": 1, "samples_per_step": 2}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "run" / "checkpoints"), "every_n_train_steps": every,
                               "save_last": True, "save_top_k": 1}},
                {"class_path": "benchmarks.soak.RSSMonitor", "init_args": {"folder": str(out), "every_n_steps": every}},
            ],
        },
        "model": {
            "policy": {"model_name_or_path": str(ROOT / ".cache" / "models" / "tiny"), "build_tiny_if_missing": "tiny"},
            "rollout": {"num_generations": 4, "max_completion_length": 4, "eval_num_generations": 2,
                        "eval_greedy": True},
            "rewards": {"reward_funcs": ["accuracy", "vgr", "format"], "reward_weights": [1.0, 0.5, 0.2]},
            "optim": {"learning_rate": 6.0e-4, "lr_scheduler": "constant", "micro_batch_size": 8},
            "export_final": False,
        },
        "data": {
            "train_path": str(ROOT / ".cache" / "data" / "synthetic-colour-v2.parquet"),
            "build_synthetic_if_missing": {"rows": 640, "seed": 0, "image_size": 56, "question_types": ["colour"]},
            "system_prompt": None, "batch_size": 2, "eval_batch_size": 4, "eval_limit": 8,
        },
    }


def read_samples(out: Path) -> dict[int, dict[int, int]]:
    """{rank: {step: rss}}"""
    samples: dict[int, dict[int, int]] = {}
    for path in sorted(out.glob("rss-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            samples.setdefault(record["rank"], {})[record["step"]] = record["rss"]
    return samples


def growth(per_step: dict[int, int], warmup: int) -> float:
    """(RSS at the last sample - RSS at the first sample at or after ``warmup``) / the latter."""
    steps = sorted(s for s in per_step if s >= warmup)
    if len(steps) < 2:
        raise ValueError(f"need two samples at or after step {warmup}, have steps {sorted(per_step)}")
    start, end = per_step[steps[0]], per_step[steps[-1]]
    return (end - start) / start


def table(samples: dict[int, dict[int, int]], warmup: int) -> str:
    ranks = sorted(samples)
    steps = sorted(set().union(*(samples[r] for r in ranks)))
    lines = ["| step | " + " | ".join(f"rank {r} RSS (MiB)" for r in ranks) + " |",
             "|---:|" + "---:|" * len(ranks)]
    for step in steps:
        cells = [f"{samples[r][step] / 2**20:.1f}" if step in samples[r] else "" for r in ranks]
        lines.append(f"| {step}{' (warm-up)' if step == warmup else ''} | " + " | ".join(cells) + " |")
    lines.append("| growth after warm-up | " + " | ".join(f"{growth(samples[r], warmup):+.2%}" for r in ranks) + " |")
    return "\n".join(lines) + "\n"


def run(steps: int, every: int, warmup: int, devices: int, out: Path, buffer: int = 16, timeout: int | None = None) -> dict:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rss-rank*.jsonl"):
        old.unlink()
    path = out / "soak.yaml"
    path.write_text(yaml.safe_dump(config(out, steps, every, devices, buffer)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dapo_lightning.cli", "fit", "--config", str(path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"soak run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    samples = read_samples(out)
    report = {
        "steps": steps, "every": every, "warmup": warmup, "devices": devices, "seconds": round(seconds, 1),
        "samples": {str(r): {str(s): v for s, v in per.items()} for r, per in samples.items()},
        "growth_after_warmup": {str(r): growth(per, warmup) for r, per in samples.items()},
    }
    (out / "rss.json").write_text(json.dumps(report, indent=1))
    (out / "rss.md").write_text(table(samples, warmup))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="sample RSS (and checkpoint) every this many steps")
    parser.add_argument("--warmup", type=int, default=100, help="growth is measured from this step's sample")
    parser.add_argument("--devices", type=int, default=2, help="DDP processes (CPU, gloo)")
    parser.add_argument("--buffer", type=int, default=16, help="replay buffer size (groups per process)")
    parser.add_argument("--out", default="runs/soak")
    args = parser.parse_args(argv)
    report = run(args.steps, args.every, args.warmup, args.devices, Path(args.out), args.buffer)
    samples = read_samples(Path(args.out))
    print(table(samples, args.warmup))
    print(f"{args.steps} steps, {args.devices} processes, {report['seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
