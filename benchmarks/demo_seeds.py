"""Do DAPO's mechanisms matter? Several seeds of GRPO-style and full-DAPO training on the demo task.

On the demo (configs/demo.yaml: a tiny random Qwen2.5-VL answering colour questions) a
policy can collapse to one constant answer: every completion of a group gets the
same reward, ``frac_reward_zero_std`` goes to 1, the advantages are 0 and learning
stalls. This script trains, with the same step budget and seeds,

- ``grpo``: symmetric clipping 0.2, no dynamic sampling, no replay buffer
  (benchmarks/configs/demo_grpo.yaml);
- ``dapo``: clip-higher 0.28, dynamic sampling and the replay buffer
  (benchmarks/configs/demo_dapo.yaml);

and prints, per seed, the final greedy validation accuracy and the first step at which
it reached the threshold, then the fraction of seeds that learned (final accuracy >=
threshold). Each run is one ``dapo-lightning fit`` subprocess; the table is also
written as Markdown and JSON under ``--out``.

    python benchmarks/demo_seeds.py                      # 5 seeds x 2 variants, 500 steps, 2 runs at a time
    python benchmarks/demo_seeds.py --seeds 0 1 --steps 200 --variants dapo --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the worktree's packages first
    sys.path.insert(0, str(ROOT))

from benchmarks.scalars import scalar_curves  # noqa: E402

VARIANTS = {
    "grpo": ROOT / "benchmarks" / "configs" / "demo_grpo.yaml",
    "dapo": ROOT / "benchmarks" / "configs" / "demo_dapo.yaml",
}


def read_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    return scalar_curves(run_dir).get(tag, [])


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / f"{variant}-seed{seed}"
    command = [
        sys.executable, "-m", "dapo_lightning.cli", "fit",
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--config", str(VARIANTS[variant]),
        f"--seed_everything={seed}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.eval_every}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.export_final=false",
    ]
    if args.model:
        command.append(f"--model.policy.model_name_or_path={args.model}")
    if args.data:
        command.append(f"--data.train_path={args.data}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = run_dir / "fit.log"
    done = args.reuse and log_path.exists() and f"max_steps={args.steps}` reached" in log_path.read_text()
    start = time.time()
    if not done:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        with open(log_path, "w") as log:
            code = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise RuntimeError(f"{variant} seed {seed} failed (exit {code}); see {log_path}")
    seconds = time.time() - start
    accuracy = read_scalars(run_dir, "val/accuracy")  # logged at global steps eval_every-1, 2*eval_every-1, ...
    reached = next((step + 1 for step, value in accuracy if value >= args.threshold), None)
    final = accuracy[-1][1] if accuracy else float("nan")
    return {
        "variant": variant,
        "seed": seed,
        "final_accuracy": final,
        "first_step_at_threshold": reached,
        "learned": final >= args.threshold,
        "no_signal_last50": no_signal_fraction(run_dir),
        "seconds": None if done else round(seconds, 1),
    }


def no_signal_fraction(run_dir: Path, last: int = 50) -> float:
    """Share of freshly generated groups whose rewards did not vary, over the last steps.

    Without dynamic sampling that is ``train/frac_reward_zero_std``; with it, that metric describes the
    filtered batch (so it is about 0), and the fresh groups are counted by the callback's logs.
    """
    generated = [v for _, v in read_scalars(run_dir, "train/dynamic_sampling/generated_groups")[-last:]]
    if generated:
        filtered = [v for _, v in read_scalars(run_dir, "train/dynamic_sampling/filtered_groups")[-last:]]
        return sum(filtered) / sum(generated)
    tail = [v for _, v in read_scalars(run_dir, "train/frac_reward_zero_std")[-last:]]
    return sum(tail) / len(tail) if tail else float("nan")


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"| variant | seed | final greedy accuracy | first step >= {args.threshold} "
        "| generated groups without signal (last 50 steps) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        step = r["first_step_at_threshold"] if r["first_step_at_threshold"] is not None else "never"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['final_accuracy']:.3f} | {step} | "
                     f"{r['no_signal_last50']:.2f} |")
    lines.append("")
    lines.append("| variant | seeds learned (final accuracy >= %g) |" % args.threshold)
    lines.append("|---|---|")
    for variant in args.variants:
        rows = [r for r in results if r["variant"] == variant]
        learned = sum(r["learned"] for r in rows)
        lines.append(f"| {variant} | {learned}/{len(rows)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["grpo", "dapo"])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run (the demo's budget)")
    parser.add_argument("--eval-every", type=int, default=50, help="greedy validation every this many steps")
    parser.add_argument("--threshold", type=float, default=0.8, help="accuracy that counts as learned")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo_seeds"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --out, train only the others")
    parser.add_argument("--model", default=None, help="another folder for the demo's model (default: the demo's)")
    parser.add_argument("--data", default=None, help="another parquet for the demo's data (default: the demo's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps % args.eval_every:
        raise SystemExit("--steps must be a multiple of --eval-every (the final accuracy is measured at the last step)")
    jobs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    results = [run_one(*jobs[0], args)]  # alone first: it builds the offline model and data if they are missing
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results += list(pool.map(lambda job: run_one(*job, args), jobs[1:]))
    for r in results:
        print(json.dumps(r))
    text = table(results, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
