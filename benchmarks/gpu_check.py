"""The project's GPU check (issue 16): one script, one table, under 8 minutes on one H200.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # on the GPU machine (docs/distributed.md)
    python benchmarks/gpu_check.py --device cpu --shape tiny --steps 2 --prompts 1 --generations 2 \\
        --completion-length 3                                            # the same code on the CPU (a test runs it)

A random model of Qwen2.5-VL-3B's shape (``benchmarks/bench_setup.py``, the peer benchmark's ``3b`` shape:
Qwen2.5-VL-3B-Instruct's config.json, vocabulary 151936, random weights, bf16, sdpa; built offline on first use)
trains on synthetic questions (256 image tokens each), every completion forced to ``--completion-length`` tokens:

- ``fit``: ``--steps`` DAPO steps with the shared prompt on, then off, then on with ``AttentionMetrics`` (its
  capture's overhead over the plain step), each a single-device Lightning fit in its own process: seconds per step
  (median after the first), completion tokens per second, peak GPU memory (``torch.cuda.max_memory_allocated``);
- ``deepspeed``: a single-process DeepSpeed ZeRO-2 fit (``configs/deepspeed_zero2.json``, bf16-mixed, micro-batches
  of 4), ``--deepspeed-steps`` steps, when deepspeed imports;
- ``peer``: ``benchmarks/peer_trl.py --shapes 3b --device cuda --dtype bfloat16`` (shortened: ``--peer-steps``
  timed steps after one warm-up) against TRL's ``GRPOTrainer``, when trl imports.

Each part runs in its own process under a share of ``--budget`` seconds; a part that fails, is not installed or
runs out of time is a row saying so, and the table is printed whatever happens. ``--device cpu`` runs the fits
on the CPU (the peak column is then the process's peak RSS); DeepSpeed (Lightning refuses it on the CPU) and the
peer benchmark are skipped there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the worktree's packages first
    sys.path.insert(0, str(ROOT))

FITS = {"fit-shared": "fit, shared prompt on", "fit-noshare": "fit, shared prompt off",
        "fit-attention": "fit, shared prompt on + AttentionMetrics"}
PARTS = ("prepare", *FITS, "deepspeed", "peer")
LIMITS = {"prepare": 150, "fit-shared": 110, "fit-noshare": 110, "fit-attention": 110, "deepspeed": 120, "peer": 150}
IMAGE_SIDE = {"3b": 448, "tiny": 56}  # 256 image tokens for the 3b shape (bench_setup's), 4 for the tiny model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="3b", choices=sorted(IMAGE_SIDE), help="3b (default) or tiny (dry run)")
    parser.add_argument("--steps", type=int, default=10, help="DAPO steps per fit (default 10)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (default 2)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (default 8)")
    parser.add_argument("--completion-length", type=int, default=64, help="tokens per completion, forced (default 64)")
    parser.add_argument("--deepspeed-steps", type=int, default=3, help="steps of the DeepSpeed fit (default 3)")
    parser.add_argument("--peer-steps", type=int, default=3, help="timed steps of the peer benchmark (default 3)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts (default 450)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip, from {','.join(PARTS[1:])}")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "gpu_check"), help="model and data folder")
    parser.add_argument("--out", default=None, help="JSON results file (default <cache>/gpu_check-<time>.json)")
    parser.add_argument("--part", default=None, choices=PARTS, help=argparse.SUPPRESS)  # a child's part
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)  # where a child writes its result
    args = parser.parse_args(argv)
    args.skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    if args.skip - set(PARTS[1:]):
        parser.error(f"--skip: unknown {sorted(args.skip - set(PARTS[1:]))}; choose from {', '.join(PARTS[1:])}")
    if min(args.steps, args.deepspeed_steps, args.peer_steps) < 1 or args.generations < 2:
        parser.error("--steps, --deepspeed-steps and --peer-steps must be >= 1, --generations >= 2")
    return args


# --- the parts, each in its own process ---------------------------------------------------------------------


def prepare(args) -> dict:
    """The model folder and the questions (built once into ``--cache``)."""
    from dapo_lightning.data_prep.synthetic import SyntheticConfig, write_parquet

    cache = Path(args.cache)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.shape == "3b":
        from benchmarks.bench_setup import SHAPES, model_folder

        folder = model_folder(cache, SHAPES["3b"], dtype)
    else:
        from dapo_lightning.data_prep.tiny_model import ensure_tiny_model

        folder = ensure_tiny_model(cache / "models" / "tiny")
    rows = max(64, args.prompts * (args.steps + 2))
    parquet = cache / "data" / f"questions-{IMAGE_SIDE[args.shape]}-{rows}.parquet"
    if not parquet.exists():
        write_parquet(parquet, SyntheticConfig(rows=rows, seed=0, image_size=IMAGE_SIDE[args.shape]))
    return {"folder": str(folder), "parquet": str(parquet), "dtype": dtype}


def fit(args, prepared: dict, part: str) -> dict:
    """One Lightning fit of ``args.steps`` (DeepSpeed: ``args.deepspeed_steps``) DAPO steps, clocked step by step."""
    import torch
    from lightning.pytorch import Trainer, seed_everything

    from dapo_lightning.callbacks import AttentionMetrics
    from dapo_lightning.config import OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
    from dapo_lightning.data import VisualMCQDataModule
    from dapo_lightning.hooks import RolloutCallback
    from dapo_lightning.module import DAPOModule

    cuda = args.device == "cuda"

    class StepClock(RolloutCallback):
        def __init__(self):
            self.steps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_rollout_update_end(self, trainer, pl_module, rollout, result):
            self.tokens = int(rollout.completion_mask.sum())
            self.timings = {k: float(v) for k, v in rollout.timings.items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.steps.append({"seconds": time.perf_counter() - self.start, "tokens": self.tokens,
                               "timings": self.timings})

    deepspeed = part == "deepspeed"
    T = args.completion_length
    seed_everything(0)
    module = DAPOModule(
        policy=PolicyConfig(model_name_or_path=prepared["folder"], dtype=prepared["dtype"], attn_implementation="sdpa"),
        rollout=RolloutConfig(num_generations=args.generations, max_completion_length=T, min_completion_length=T,
                              shared_prompt=part != "fit-noshare"),
        rewards=RewardConfig(reward_funcs=["accuracy", "format"]),
        optim=OptimConfig(learning_rate=1e-6, lr_scheduler="constant", micro_batch_size=4 if deepspeed else None),
        export_final=False)
    data = VisualMCQDataModule(train_path=prepared["parquet"], processor=prepared["folder"], batch_size=args.prompts,
                               eval_limit=1)
    clock = StepClock()
    callbacks = [clock, *([AttentionMetrics(every_n_steps=1)] if part == "fit-attention" else [])]
    strategy, precision = "auto", None
    if deepspeed:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy, precision = DeepSpeedStrategy(config=str(ROOT / "configs" / "deepspeed_zero2.json")), "bf16-mixed"
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as root:
        trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=precision,
                          max_steps=args.deepspeed_steps if deepspeed else args.steps, default_root_dir=root,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, data)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"steps": clock.steps, "peak_mib": peak, "parameters": sum(p.numel() for p in module.policy.parameters())}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer(args, prepared: dict) -> dict:
    """``benchmarks/peer_trl.py`` on the 3b shape, shortened to fit its share of the budget (ours against stock and
    tuned TRL; the shared-prompt-off row, the slowest, is left to a full run of that command); its JSON summary."""
    out = Path(args.cache) / "peer_trl.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "peer_trl.py"), "--shapes", "3b", "--device", "cuda",
               "--dtype", "bfloat16", "--systems", "ours,trl,trl-static", "--steps", str(args.peer_steps), "--warmup", "1", "--prompts", str(args.prompts),
               "--generations", str(args.generations), "--completion-length", str(args.completion_length),
               "--cache", str(args.cache), "--out", str(out)]  # the same cache: the 3b model folder built by prepare
    subprocess.run(command, cwd=ROOT, check=True)
    summary = json.loads(out.read_text())["shapes"]["3b"]["summary"]
    return {"command": " ".join(command[1:]), "systems": {system: {
        "median": s["median"], "tokens_per_second": s["tokens_per_second"], "gpu_peak_mb": s["gpu_peak_mb"],
        "speedup_vs_trl": s.get("speedup_vs_trl")} for system, s in summary.items()}}


def child(args) -> None:
    prepared = json.loads(os.environ.get("GPU_CHECK_PREPARED", "{}"))
    if args.part == "prepare":
        result = prepare(args)
    elif args.part == "peer":
        result = peer(args, prepared)
    else:
        result = fit(args, prepared, args.part)
    Path(args.result).write_text(json.dumps(result))


# --- the parent: parts in turn, then the table ---------------------------------------------------------------


def skipped_reason(args, part: str) -> str | None:
    if part in args.skip:
        return "skipped (--skip)"
    if part == "deepspeed":
        if args.device != "cuda":
            return "skipped: Lightning's DeepSpeedStrategy needs a GPU"
        if importlib.util.find_spec("deepspeed") is None:
            return "skipped: deepspeed is not installed (docs/distributed.md: carry its wheel)"
    if part == "peer":
        if args.device != "cuda" or args.shape != "3b":
            return "skipped: the GPU command is python benchmarks/peer_trl.py --shapes 3b --device cuda --dtype bfloat16"
        if importlib.util.find_spec("trl") is None:
            return "skipped: trl is not installed (pip install -e .[bench], or carry its wheel)"
    return None


def run_part(args, part: str, prepared: dict, deadline: float) -> dict:
    left = deadline - time.monotonic()
    if left < 20:
        return {"status": f"not run: {left:.0f} s of the --budget left"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    env = {**os.environ, "GPU_CHECK_PREPARED": json.dumps(prepared), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    limit = min(LIMITS[part] * (1 if args.shape == "3b" else 2), left)
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args.forwarded, "--part", part,
                               "--result", result_file], cwd=ROOT, env=env, timeout=limit, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit:.0f} s", "wall": time.monotonic() - start}
    wall = time.monotonic() - start
    if done.returncode != 0:
        last = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-1:] or ["?"]
        return {"status": f"failed (exit {done.returncode}): {last[0][:160]}", "wall": wall,
                "log": (done.stdout[-3000:] + done.stderr[-6000:])}
    result = json.loads(Path(result_file).read_text())
    os.unlink(result_file)
    return {"status": "ok", "wall": wall, **result}


def _without_out(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        if not arg.startswith("--out="):
            kept.append(arg)
    return kept


def short_status(result: dict) -> tuple[str, str]:
    """(a word for the status column, the rest for the note): "skipped: deepspeed is not installed" -> both parts."""
    status = str(result.get("status", "?"))
    for word in ("skipped", "failed", "timed out", "not run"):
        if status.startswith(word):
            return word, status[len(word):].lstrip(" :")
    return status, ""


def fit_row(name: str, result: dict, baseline: dict | None = None) -> list[str]:
    if result.get("status") != "ok":
        return [name, *short_status(result)[:1], "-", "-", "-", short_status(result)[1]]
    steps = result["steps"][1:] or result["steps"]  # the first step warms up (kernels, allocator)
    seconds = statistics.median(s["seconds"] for s in steps)
    tokens = statistics.median(s["tokens"] for s in steps)
    count = result["parameters"]
    size = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e3:.0f}K"
    note = f"{size} parameters, {len(result['steps'])} steps, {result['wall']:.0f} s wall"
    if baseline is not None and baseline.get("status") == "ok":
        base = statistics.median(s["seconds"] for s in (baseline["steps"][1:] or baseline["steps"]))
        note = f"capture overhead {100 * (seconds / base - 1):+.1f}% of a step; " + note
    return [name, "ok", f"{seconds:.3f}", f"{tokens / seconds:.0f}", f"{result['peak_mib']:.0f}", note]


def table(args, results: dict) -> str:
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    rows = [["part", "status", "s/step (median)", "completion tok/s", memory, "note"]]
    prep = results["prepare"]
    rows.append(["prepare (model, data)", short_status(prep)[0], "-", "-", "-",
                 f"{prep.get('wall', 0):.0f} s wall" if prep.get("status") == "ok" else short_status(prep)[1]])
    for part, name in FITS.items():
        rows.append(fit_row(name, results[part], results["fit-shared"] if part == "fit-attention" else None))
    rows.append(fit_row("DeepSpeed ZeRO-2 fit, 1 process", results["deepspeed"]))
    peer_result = results["peer"]
    if peer_result.get("status") == "ok":
        for system, s in peer_result["systems"].items():
            speed = f"{s['speedup_vs_trl']:.2f}x TRL's speed" if s.get("speedup_vs_trl") else ""
            rows.append([f"peer: {system}", "ok", f"{s['median']:.3f}", f"{s['tokens_per_second']:.0f}",
                         f"{s['gpu_peak_mb']:.0f}", speed])
    else:
        rows.append(["peer benchmark vs TRL (3b)", *short_status(peer_result)[:1], "-", "-", "-",
                     short_status(peer_result)[1]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def machine(args) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else platform.processor()
    return (f"{device or args.device}; torch {torch.__version__}; shape {args.shape}; {args.prompts} prompt(s) x "
            f"{args.generations} completions x {args.completion_length} tokens per step")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part is not None:
        child(args)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.forwarded = _without_out(list(sys.argv[1:] if argv is None else argv))  # the children's arguments
    started = time.monotonic()
    deadline = started + args.budget
    results: dict = {}
    results["prepare"] = run_part(args, "prepare", {}, deadline)
    prepared = {k: results["prepare"][k] for k in ("folder", "parquet", "dtype")} if \
        results["prepare"].get("status") == "ok" else None
    for part in PARTS[1:]:
        reason = skipped_reason(args, part) or (None if prepared else "not run: prepare failed")
        results[part] = {"status": reason} if reason else run_part(args, part, prepared, deadline)
        print(f"[gpu_check] {part}: {results[part]['status']}", flush=True)
    text = table(args, results)
    print(f"\n{machine(args)}\n\n{text}\n\ntotal {time.monotonic() - started:.0f} s", flush=True)
    out = Path(args.out) if args.out else Path(args.cache) / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
                                        if k != "forwarded"},
                               "machine": machine(args), "table": text, "results": results}, indent=1, default=str))
    for part, result in results.items():
        if "log" in result:
            print(f"\n--- {part} log (end) ---\n{result['log'][-2500:]}", file=sys.stderr)
    return 0 if all(r.get("status") == "ok" or str(r.get("status", "")).startswith("skipped")
                    for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
