"""Training-step speed and memory of dapo-lightning against TRL's ``GRPOTrainer``, side by side (issues 6, 15).

Both systems train fresh copies of the same offline checkpoint on the same
synthetic questions in the same order: B prompts x G completions per step, every
completion forced to exactly T tokens (EOS suppressed), DAPO loss, beta 0,
clip 0.2 / 0.28, one optimizer step per rollout, AdamW at a constant learning rate,
gradient clipping 1.0, rewards ``accuracy`` + ``format``, no attention metrics,
no gradient checkpointing. Each system runs in its own process; the processes take
turns step by step (the order rotates every step), so load from other jobs on the
machine hits all of them alike, and each reports its own peak RSS. Warm-up steps
are dropped; the report gives seconds per step (median, min-max), completion tokens
per second, the speed ratio to the tuned TRL (ratio of medians, and the median of the
step-by-step ratios) and to stock TRL, peak RSS, where our step's time goes, and each
system's decode forward beside the decode floor (``benchmarks/decode_floor.py``: a
compiled hand-written step on the same weights, measured after the systems, in its own
process).

    pip install -e .[bench]          # TRL: benchmark only, never a core dependency
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/peer_trl.py --threads 1 --steps 6 --warmup 2
    python benchmarks/peer_trl.py --shapes 3b --device cuda --dtype bfloat16   # on a GPU

Systems: ``ours`` (shared prompt: each image encoded and each prompt prefilled once
per group; the lean decode step), ``ours-noshare`` (``model.rollout.shared_prompt: false``,
what sharing buys: ``model.generate`` decodes), ``trl`` (stock ``GRPOTrainer`` with the
matched settings) and ``trl-static`` (the same, tuned as a TRL user would for this shape:
``bench_workers.TRL_TUNED``). Shapes: see ``benchmarks/bench_setup.py``.
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

# issue 15: our steps/s over the tuned TRL's (``trl-static``) on a 2-core CPU, 1 thread, at 1 x 8 x 128 (``small`` at
# other group sizes or lengths, e.g. G = 4 or 8 x 256: SMALL_VARIANT_TARGET); our decode forward over the floor
TARGETS = {"small": 2.0, "long": 3.5}
SMALL_VARIANT_TARGET = 1.3
FLOOR_TARGET = 1.15
BASELINES = ("trl-static", "trl")  # the first one present is "TRL" in the speed ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,long", help=f"comma-separated, from {','.join(SHAPES)} (default small,long)")
    parser.add_argument("--systems", default="ours,ours-noshare,trl,trl-static",
                        help=f"comma-separated, from {','.join(SYSTEMS)} (default all)")
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
    parser.add_argument("--floor", default=None, action=argparse.BooleanOptionalAction,
                        help="measure the decode floor, a compiled hand-written step (benchmarks/decode_floor.py); "
                             "default on for cpu, off for cuda (its compilation takes minutes on the 3b shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "bench"), help="models and results (default .cache/bench)")
    parser.add_argument("--out", default=None, help="JSON results file (default <cache>/peer_trl-<time>.json)")
    args = parser.parse_args(argv)
    args.shapes = _choices(args.shapes, SHAPES, "--shapes")
    args.systems = _choices(args.systems, SYSTEMS, "--systems")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.floor = args.device == "cpu" if args.floor is None else args.floor
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


def shape_floor(name: str, prepared: dict, args) -> dict:
    """``decode_floor.measure_floor`` for the shape's first step's prompts (B x G rows, T - 1 steps)."""
    from benchmarks.bench_setup import question_rows
    from benchmarks.decode_floor import measure_floor

    rows = question_rows(SHAPES[name], args.prompts)
    return measure_floor(prepared["folder"], prepared["system_prompt"], rows, args.generations,
                         args.completion_length, args.dtype, args.device, args.threads)


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
    baseline = next((b for b in BASELINES if b in out), None)
    if baseline is not None:  # "TRL" is the tuned one when it ran
        trl = out[baseline]
        for system, s in out.items():
            s["baseline"] = baseline
            s["speedup_vs_trl"] = trl["median"] / s["median"]
            paired = [t / o for t, o in zip(trl["seconds"], s["seconds"])]
            s["paired_speedup_vs_trl"] = {"median": statistics.median(paired), "min": min(paired), "max": max(paired)}
            s["peak_rss_vs_trl"] = s["peak_rss_mb"] / trl["peak_rss_mb"]
            if "trl" in out:
                s["speedup_vs_stock_trl"] = out["trl"]["median"] / s["median"]
    floor = result.get("floor")
    for s in out.values():
        s["decode_forward_mean"] = s["phases"].get("decode forward")
        if floor is not None and s["decode_forward_mean"]:
            s["decode_vs_floor"] = s["decode_forward_mean"] / floor["compiled"]["median"]
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
        f"| system | s/step median [min-max] | completion tok/s | speed vs {_baseline_name(summary)} (medians) "
        "| step-by-step ratio median [min-max] | speed vs stock TRL | decode forward s/step | x decode floor "
        f"| peak RSS MB | RSS growth MB |{' GPU peak MB |' if cuda else ''}",
        f"|---|---|---|---|---|---|---|---|---|---|{'---|' if cuda else ''}",
    ]
    for system, s in summary.items():
        lines.append(_row(system, s, cuda))
    floor = prepared.get("floor")
    if floor is not None:
        lines += ["", f"Decode floor (benchmarks/decode_floor.py: the hand-written step on the same weights, "
                      f"{floor['rows']} rows x {floor['steps']} steps, static cache of P + T positions, median of "
                      f"{len(floor['compiled']['seconds'])}): compiled {floor['compiled']['median']:.3f} s "
                      f"[{floor['compiled']['min']:.3f}-{max(floor['compiled']['seconds']):.3f}], eager "
                      f"{floor['eager']['median']:.3f} s; compilation {floor['compile_seconds']:.0f} s."]
    elif prepared.get("floor_error"):
        lines += ["", f"Decode floor: not measured ({prepared['floor_error']})."]
    lines += ["", "Checks: " + "; ".join(
        f"{system}: completions {s['completion_length_range'][0]}-{s['completion_length_range'][1]} tokens, "
        f"loss {'finite' if s['loss_finite'] else 'NOT FINITE'}, "
        f"{sum(s['params_changed'].values())}/{len(s['params_changed'])} probed tensors changed"
        for system, s in summary.items())]
    if name in TARGETS and "ours" in summary and "trl-static" in summary:
        ours, trl = summary["ours"], summary["trl-static"]
        default_shape = (args.prompts, args.generations, args.completion_length) == (1, 8, 128)
        target = TARGETS[name] if default_shape or name != "small" else SMALL_VARIANT_TARGET
        speed_ok = ours["speedup_vs_trl"] >= target
        memory_ok = ours["peak_rss_mb"] <= trl["peak_rss_mb"]
        line = (f"Targets (issue 15): >= {target}x the tuned TRL's steps/s -> {ours['speedup_vs_trl']:.2f}x "
                f"({'met' if speed_ok else 'NOT met'}); peak RSS <= its -> {ours['peak_rss_mb']:.0f} vs "
                f"{trl['peak_rss_mb']:.0f} MB ({'met' if memory_ok else 'NOT met'})")
        if "decode_vs_floor" in ours:
            floor_ok = ours["decode_vs_floor"] <= FLOOR_TARGET
            line += (f"; decode forward <= {FLOOR_TARGET}x the floor -> {ours['decode_vs_floor']:.2f}x "
                     f"({'met' if floor_ok else 'NOT met'})")
        lines += ["", line + "."]
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
    stock = f"{s['speedup_vs_stock_trl']:.2f}x" if "speedup_vs_stock_trl" in s else "-"
    ratio = f"{paired['median']:.2f}x [{paired['min']:.2f}-{paired['max']:.2f}]" if paired else "-"
    decode = _seconds(s.get("decode_forward_mean"))
    floor = f"{s['decode_vs_floor']:.2f}x" if "decode_vs_floor" in s else "-"
    gpu = f" {s['gpu_peak_mb']:.0f} |" if cuda else ""
    return (f"| {SYSTEMS[system]} | {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] | {s['tokens_per_second']:.0f} "
            f"| {speed} | {ratio} | {stock} | {decode} | {floor} | {s['peak_rss_mb']:.0f} | {s['rss_growth_mb']:.0f} |{gpu}")


def _baseline_name(summary: dict) -> str:
    baseline = next((s["baseline"] for s in summary.values() if "baseline" in s), None)
    return {"trl-static": "tuned TRL", "trl": "stock TRL"}.get(baseline, "TRL")


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
            if args.floor:  # after the systems, in its own process, on the same machine state
                print(f"[{name}] measuring the decode floor (compiling the hand-written step) ...", flush=True)
                try:
                    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                        result["floor"] = pool.submit(shape_floor, name, prepared, args).result()
                    prepared["floor"] = result["floor"]
                except Exception as error:  # noqa: BLE001 - a missing compiler must not lose the systems' table
                    prepared["floor_error"] = f"{type(error).__name__}: {error}"
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
