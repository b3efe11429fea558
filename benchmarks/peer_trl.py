"""Training-step speed and memory of dapo-lightning against TRL's ``GRPOTrainer``, side by side (issue 6).

Both systems train fresh copies of the same offline checkpoint on the same
synthetic questions in the same order: B prompts x G completions per step, every
completion forced to exactly T tokens (EOS suppressed), DAPO loss, beta 0,
clip 0.2 / 0.28, one optimizer step per rollout, AdamW at a constant learning rate,
gradient clipping 1.0, rewards ``accuracy`` + ``format``, no attention metrics,
no gradient checkpointing. Each system runs in its own process; the processes take
turns step by step (the order rotates every step), so load from other jobs on the
machine hits all of them alike, and each reports its own peak RSS. Warm-up steps
are dropped; the report gives seconds per step (median, min-max), completion tokens
per second, the speed ratio to TRL (ratio of medians, and the median of the
step-by-step ratios), peak RSS, and where our step's time goes.

    pip install -e .[bench]          # TRL: benchmark only, never a core dependency
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/peer_trl.py --threads 1 --steps 6 --warmup 2
    python benchmarks/peer_trl.py --shapes 3b --device cuda --dtype bfloat16   # on a GPU

Systems: ``ours`` (shared prompt: each image encoded and each prompt prefilled once
per group), ``ours-noshare`` (``model.rollout.shared_prompt: false``, what sharing
buys) and ``trl``. Shapes: see ``benchmarks/bench_setup.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the worktree's packages first
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_setup import SHAPES, shape_summary  # noqa: E402
from benchmarks.bench_workers import SYSTEMS, run_worker  # noqa: E402
from benchmarks.phases import OTHER, PHASES  # noqa: E402

TARGETS = {"small": 1.25, "long": 1.8}  # issue 6: our steps/s over TRL's on a 2-core CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,long", help=f"comma-separated, from {','.join(SHAPES)} (default small,long)")
    parser.add_argument("--systems", default="ours,ours-noshare,trl", help=f"comma-separated, from {','.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per system and shape (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step, B (default 1)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt, G (default 8)")
    parser.add_argument("--completion-length", type=int, default=128, help="tokens per completion, forced (default 128)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per system (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="parameter dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--no-phases", action="store_true", help="skip the per-phase clock (hooks and wrappers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "bench"), help="models and results (default .cache/bench)")
    parser.add_argument("--out", default=None, help="JSON results file (default <cache>/peer_trl-<time>.json)")
    args = parser.parse_args(argv)
    args.shapes = _choices(args.shapes, SHAPES, "--shapes")
    args.systems = _choices(args.systems, SYSTEMS, "--systems")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.generations < 2:
        parser.error("--generations must be >= 2")
    return args


def _choices(text: str, known, flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise SystemExit(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return values


# --- preparation (in a child process, so the parent never holds a model or a CUDA context) ----------


def prepare_shape(name: str, cache: str, dtype: str, rows: int) -> dict:
    from benchmarks.bench_setup import model_folder, prompt_length, question_rows, system_prompt_for
    from dapo_lightning.models import load_processor

    shape = SHAPES[name]
    folder = model_folder(Path(cache), shape, dtype)
    processor = load_processor(str(folder))
    sample = question_rows(shape, rows)
    system_prompt = system_prompt_for(processor, shape, sample)
    lengths = [prompt_length(processor, row, system_prompt) for row in sample]
    return {"folder": str(folder), "system_prompt": system_prompt, "prompt_lengths": lengths}


# --- the run ----------------------------------------------------------------------------------------


def run_shape(ctx, name: str, prepared: dict, args, tmp: str) -> dict:
    total = args.warmup + args.steps
    job = {
        "shape": shape_summary(SHAPES[name]), "folder": prepared["folder"], "system_prompt": prepared["system_prompt"],
        "prompts": args.prompts, "generations": args.generations, "completion_length": args.completion_length,
        "lr": args.lr, "warmup": args.warmup, "steps": args.steps, "threads": args.threads, "device": args.device,
        "dtype": args.dtype, "phases": not args.no_phases, "seed": args.seed, "tmp": tmp,
    }
    workers = {}
    try:
        for system in args.systems:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=run_worker, args=(child, {**job, "system": system}), name=f"bench-{system}")
            process.start()
            child.close()
            workers[system] = (process, parent)
        ready = {system: _expect(workers[system], "ready", system) for system in args.systems}
        load_before = os.getloadavg()
        steps: dict[str, list[dict]] = {system: [] for system in args.systems}
        for k in range(total):
            shift = k % len(args.systems)
            for system in args.systems[shift:] + args.systems[:shift]:
                workers[system][1].send("go")
                record = _expect(workers[system], "step", system)
                steps[system].append(record)
                print(f"  [{name}] step {k + 1}/{total} {system:<13} {record['seconds']:7.3f} s"
                      f"{'  (warm-up)' if k < args.warmup else ''}", flush=True)
        done = {}
        for system in args.systems:
            workers[system][1].send("finish")
            done[system] = _expect(workers[system], "done", system)
            workers[system][0].join(timeout=120)
    finally:
        for process, _ in workers.values():
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
    return {"job": job, "ready": ready, "steps": steps, "done": done, "loadavg": [load_before, os.getloadavg()]}


def _expect(worker, kind: str, system: str, timeout: float = 3600.0):
    process, conn = worker
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"{system}: worker exited (code {process.exitcode}) while waiting for {kind!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{system}: no {kind!r} after {timeout:.0f} s")
    message, payload = conn.recv()
    if message == "error":
        raise RuntimeError(f"{system} worker failed:\n{payload}")
    if message != kind:
        raise RuntimeError(f"{system}: expected {kind!r}, got {message!r}")
    return payload


# --- the report -------------------------------------------------------------------------------------


def summarize(result: dict, warmup: int) -> dict:
    out = {}
    for system, records in result["steps"].items():
        timed = records[warmup:]
        seconds = [r["seconds"] for r in timed]
        tokens = [r["tokens"] for r in timed]
        phases = {}
        for phase in {p for r in timed for p in r["phases"]}:
            phases[phase] = statistics.fmean(r["phases"].get(phase, 0.0) for r in timed)
        done = result["done"][system]
        out[system] = {
            "seconds": seconds,
            "median": statistics.median(seconds),
            "min": min(seconds),
            "max": max(seconds),
            "mean": statistics.fmean(seconds),
            "tokens_per_step": statistics.median(tokens),
            "tokens_per_second": statistics.median(tokens) / statistics.median(seconds),
            "completion_length_range": [min(r["min_length"] for r in records), max(r["max_length"] for r in records)],
            "loss_finite": all(r.get("loss") is not None and r["loss"] == r["loss"] and abs(r["loss"]) != float("inf")
                               for r in records),
            "params_changed": done["params_changed"],
            "peak_rss_mb": done["peak_rss_mb"],
            "rss_start_mb": done["rss_start_mb"],
            "rss_growth_mb": done["peak_rss_mb"] - done["rss_start_mb"],
            "gpu_peak_mb": done["gpu_peak_mb"],
            "phases": phases,
            "parameters": result["ready"][system]["parameters"],
        }
    if "trl" in out:
        trl = out["trl"]
        for system, s in out.items():
            s["speedup_vs_trl"] = trl["median"] / s["median"]
            paired = [t / o for t, o in zip(trl["seconds"], s["seconds"])]
            s["paired_speedup_vs_trl"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
            s["peak_rss_vs_trl"] = s["peak_rss_mb"] / trl["peak_rss_mb"]
    return out


def report(name: str, prepared: dict, summary: dict, loadavg, args) -> str:
    shape = SHAPES[name]
    lengths = prepared["prompt_lengths"]
    cuda = args.device == "cuda"
    lines = [
        f"### Shape `{name}`: {shape.description}",
        "",
        f"{args.prompts} prompt(s) x {args.generations} completions x {args.completion_length} tokens per step; "
        f"{shape.image_tokens} image tokens per image; prompts of {min(lengths)}-{max(lengths)} tokens; "
        f"{args.device} {args.dtype}, {args.threads} thread(s); {args.steps} timed steps per system after "
        f"{args.warmup} warm-up steps, systems alternating step by step; machine load average "
        f"{loadavg[0][0]:.1f} before, {loadavg[1][0]:.1f} after.",
        "",
        "| system | s/step median [min-max] | completion tok/s | speed vs TRL (medians) | step-by-step ratio median [min-max] "
        f"| peak RSS MB | RSS growth MB |{' GPU peak MB |' if cuda else ''}",
        f"|---|---|---|---|---|---|---|{'---|' if cuda else ''}",
    ]
    for system, s in summary.items():
        lines.append(_row(system, s, cuda))
    lines += ["", "Checks: " + "; ".join(
        f"{system}: completions {s['completion_length_range'][0]}-{s['completion_length_range'][1]} tokens, "
        f"loss {'finite' if s['loss_finite'] else 'NOT FINITE'}, "
        f"{sum(s['params_changed'].values())}/{len(s['params_changed'])} probed tensors changed"
        for system, s in summary.items())]
    if name in TARGETS and "ours" in summary and "trl" in summary:
        ours, trl = summary["ours"], summary["trl"]
        speed_ok = ours["speedup_vs_trl"] >= TARGETS[name]
        memory_ok = ours["peak_rss_mb"] <= trl["peak_rss_mb"]
        lines += ["", f"Target (issue 6): >= {TARGETS[name]}x TRL's steps/s -> {ours['speedup_vs_trl']:.2f}x "
                      f"({'met' if speed_ok else 'NOT met'}); peak RSS <= TRL's -> {ours['peak_rss_mb']:.0f} vs "
                      f"{trl['peak_rss_mb']:.0f} MB ({'met' if memory_ok else 'NOT met'})."]
    lines += ["", "Mean seconds per step by phase (exclusive: nested phases are not counted in their parent):", ""]
    systems = list(summary)
    lines.append("| phase | " + " | ".join(SYSTEMS[s] for s in systems) + " |")
    lines.append("|---|" + "---|" * len(systems))
    for phase in PHASES:
        if any(summary[s]["phases"].get(phase, 0.0) > 0 for s in systems):
            lines.append(f"| {phase} | " + " | ".join(_seconds(summary[s]["phases"].get(phase)) for s in systems) + " |")
    other = {s: summary[s]["mean"] - sum(summary[s]["phases"].values()) for s in systems}
    lines.append(f"| {OTHER} | " + " | ".join(_seconds(other[s]) for s in systems) + " |")
    lines.append("| **step (mean)** | " + " | ".join(f"**{summary[s]['mean']:.3f}**" for s in systems) + " |")
    return "\n".join(lines)


def _row(system: str, s: dict, cuda: bool) -> str:
    paired = s.get("paired_speedup_vs_trl")
    speed = f"{s['speedup_vs_trl']:.2f}x" if "speedup_vs_trl" in s else "-"
    ratio = f"{paired['median']:.2f}x [{paired['min']:.2f}-{paired['max']:.2f}]" if paired else "-"
    gpu = f" {s['gpu_peak_mb']:.0f} |" if cuda else ""
    return (f"| {SYSTEMS[system]} | {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] | {s['tokens_per_second']:.0f} "
            f"| {speed} | {ratio} | {s['peak_rss_mb']:.0f} | {s['rss_growth_mb']:.0f} |{gpu}")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers inherit it before importing torch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "trl" in args.systems:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: pip install -e .[bench]") from None
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    command = "python benchmarks/peer_trl.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"command": command, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "python": platform.python_version()},
               "args": {k: v for k, v in vars(args).items()}, "shapes": {}}
    texts = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="peer_trl-") as tmp:
        for name in args.shapes:
            print(f"[{name}] preparing the model and data ...", flush=True)
            rows = args.prompts * (args.warmup + args.steps)
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                prepared = pool.submit(prepare_shape, name, str(cache), args.dtype, rows).result()
            result = run_shape(ctx, name, prepared, args, tmp)
            summary = summarize(result, args.warmup)
            text = report(name, prepared, summary, result["loadavg"], args)
            print("\n" + text + "\n", flush=True)
            texts.append(text)
            results["shapes"][name] = {"prepared": prepared, "summary": summary, "raw": result}
    results["wall_seconds"] = time.time() - started
    out = Path(args.out) if args.out else cache / f"peer_trl-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"command: {command}\nwall time {results['wall_seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
