"""The experiment table on the text-bias task: do attention rewards make the model read the image? (issue 14)

Each experiment is a stack of configs: ``configs/expN.yaml``, the ablation overlays its name
lists after ``+`` (``configs/ablations/<name>.yaml``, or this folder's ``configs/ablations/``
for the extra ones), then ``benchmarks/configs/text_bias.yaml``, which swaps the 7B model, the
GPUs and the real data for the offline tiny model on the text-bias task (docs/text_bias.md) at
the demo's CPU lengths, and keeps each experiment's rewards, weights, warm-up and replay buffer.
Every (experiment, seed) is one ``dapo-lightning fit`` subprocess with one thread, ``--jobs``
at a time. From each run's TensorBoard scalars it writes, under ``--out``:

- ``results.md``: per experiment, the mean ± standard deviation over seeds of the accuracy per
  held-out split, text reliance, visual reliance and VGR per split at the last step, the share of
  groups whose VGR gate was closed (mean over the run's steps), the first step at which each
  seed's conflict accuracy reached 0.8, and each experiment minus the baseline (``--baseline``,
  default exp1: accuracy only) in conflict accuracy against the spread over seeds; failed runs
  with the tail of their stderr (``--report`` puts these files in another folder);
- ``results.json``: every run's curves and every summary;
- ``conflict_accuracy.png``, ``text_reliance.png``, ``vgr.png`` (with matplotlib, the ``plots``
  extra): the mean over seeds per experiment, the band from the lowest to the highest seed.

    python -m benchmarks.ablations                        # 7 experiments x 5 seeds, 2 runs at a time (< 30 min, 2 cores)
    python -m benchmarks.ablations --quick                # exp1 and exp3, 2 seeds, 20 steps (~1 min)
    python -m benchmarks.ablations --experiments exp1 exp3+vgr_relative_gate --seeds 0 1 2 --reuse

docs/ablations.md explains the settings and holds the measured table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the worktree's packages first
    sys.path.insert(0, str(ROOT))

from benchmarks.scalars import Curve, scalar_curves  # noqa: E402

TEXT_BIAS = ROOT / "benchmarks" / "configs" / "text_bias.yaml"
OVERLAY_FOLDERS = (ROOT / "configs" / "ablations", ROOT / "benchmarks" / "configs" / "ablations")
DEFAULT_EXPERIMENTS = ("exp1", "exp2", "exp3", "exp4", "exp5", "exp3+preference_shaping", "exp3+grpo")
BASELINE = "exp1"  # accuracy only: what the others are compared with (--baseline)
THRESHOLD = 0.8  # conflict accuracy that counts as reading the image
GOAL = 0.10  # issue 14: an attention reward beats accuracy only by 10 points on conflict questions

CONFLICT = "val/accuracy/conflict"
# (tag, column) of the table: the value at the last step
FINAL_TAGS = (
    ("val/accuracy/aligned", "acc. aligned"),
    (CONFLICT, "acc. conflict"),
    ("val/accuracy/no_cue", "acc. no cue"),
    ("val/text_reliance", "text reliance"),
    ("val/probe/visual_reliance", "visual reliance"),
    ("val/vgr/aligned", "VGR aligned"),
    ("val/vgr/conflict", "VGR conflict"),
    ("val/vgr/no_cue", "VGR no cue"),
)
# (tag, column): the mean over the run's training steps (a per-step fraction of 8 groups is too coarse to read at one step)
RUN_MEAN_TAGS = (
    ("train/vgr_reward/gate_closed_groups", "VGR gate closed"),
    ("train/vgr_reward/accuracy_spearman", "VGR-accuracy Spearman"),
)
PLOTS = (  # file, title, tags (one panel each)
    ("conflict_accuracy.png", "accuracy on conflict questions (the cue names a wrong option)", (CONFLICT,)),
    ("text_reliance.png", "text reliance (conflict answers that pick the cue's option)", ("val/text_reliance",)),
    ("vgr.png", "VGR per held-out split (text density / image density; smaller: more on the image)",
     ("val/vgr/aligned", "val/vgr/conflict", "val/vgr/no_cue")),
)
QUICK = {"experiments": ["exp1", "exp3"], "seeds": [0, 1], "steps": 20, "eval_every": 10, "eval_limit": 24}
DEFAULTS = {"experiments": list(DEFAULT_EXPERIMENTS), "seeds": [0, 1, 2, 3, 4], "steps": 360, "eval_every": 40,
            "eval_limit": None}
STDERR_TAIL = 25  # lines of a failed run's stderr in results.md


# --- experiments --------------------------------------------------------------------------------------


def experiment_configs(name: str) -> list[Path]:
    """``expN[+overlay...]`` -> configs/expN.yaml, then each overlay (configs/ablations/, else benchmarks/configs/ablations/)."""
    base, *overlays = name.split("+")
    configs = [ROOT / "configs" / f"{base}.yaml"]
    if not base.startswith("exp") or not configs[0].exists():
        raise ValueError(f"--experiments {name!r}: {base!r} is not an experiment (configs/exp1.yaml ... exp5.yaml)")
    for overlay in overlays:
        found = [folder / f"{overlay}.yaml" for folder in OVERLAY_FOLDERS if (folder / f"{overlay}.yaml").exists()]
        if not found:
            raise ValueError(f"--experiments {name!r}: no overlay {overlay}.yaml in "
                             f"{' or '.join(str(f.relative_to(ROOT)) for f in OVERLAY_FOLDERS)}")
        configs.append(found[0])
    return configs


@dataclass(frozen=True)
class Settings:
    """What every run of one table shares."""

    out: Path
    steps: int
    eval_every: int
    overrides: tuple[str, ...] = ()  # further --key=value arguments of every fit
    reuse: bool = False


@dataclass
class RunResult:
    experiment: str
    seed: int
    run_dir: str
    returncode: int
    seconds: float | None  # the fit's wall clock (a reused run: as its first invocation measured it)
    curves: dict[str, Curve] = field(default_factory=dict)
    stderr_tail: str = ""
    reused: bool = False  # read back from an earlier invocation's run (--reuse)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def fit_command(experiment: str, seed: int, settings: Settings) -> list[str]:
    configs = [*experiment_configs(experiment), TEXT_BIAS]
    return [
        sys.executable, "-m", "dapo_lightning.cli", "fit",
        *(arg for path in configs for arg in ("--config", str(path.relative_to(ROOT)))),
        f"--seed_everything={seed}",
        f"--trainer.max_steps={settings.steps}",
        f"--trainer.val_check_interval={settings.eval_every}",
        f"--trainer.default_root_dir={run_folder(settings.out, experiment, seed)}",
        *settings.overrides,
    ]


def run_folder(out: Path, experiment: str, seed: int) -> Path:
    return Path(out).resolve() / experiment / f"seed{seed}"


def curve_tags(tags) -> list[str]:
    """The tags a run's results keep: validation (less the attention details), the VGR reward's health, train accuracy."""
    return sorted(t for t in tags if (t.startswith("val/") and not t.startswith("val/attention/"))
                  or t.startswith("train/vgr_reward/") or t == "train/accuracy")


def run_one(experiment: str, seed: int, settings: Settings) -> RunResult:
    """One fit in a subprocess (one thread); its curves, or its exit status and stderr's tail."""
    folder = run_folder(settings.out, experiment, seed)
    command = fit_command(experiment, seed, settings)
    marker = folder / "run.json"
    reused = settings.reuse and marker.exists() and json.loads(marker.read_text()).get("command") == command[1:]
    if reused:
        seconds = json.loads(marker.read_text()).get("seconds")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.rglob("events.out.tfevents.*"):  # a rerun's scalars must not mix with an older run's
            stale.unlink()
        marker.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.monotonic()
        with open(folder / "stdout.log", "w") as stdout, open(folder / "stderr.log", "w") as stderr:
            code = subprocess.call(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        seconds = round(time.monotonic() - start, 1)
        if code != 0:
            tail = "\n".join((folder / "stderr.log").read_text(errors="replace").splitlines()[-STDERR_TAIL:])
            return RunResult(experiment, seed, str(folder), code, seconds, stderr_tail=tail)
        marker.write_text(json.dumps({"command": command[1:], "seconds": seconds}))
    curves = scalar_curves(folder)
    return RunResult(experiment, seed, str(folder), 0, seconds, {t: curves[t] for t in curve_tags(curves)},
                     reused=reused)


def build_fixtures(overrides: dict[str, str]) -> None:
    """The tiny model and the text-bias files, once, before the runs that would all build them at once."""
    import yaml

    from dapo_lightning.data_prep.fixtures import build_missing

    config = yaml.safe_load(TEXT_BIAS.read_text())
    policy, data = config["model"]["policy"], config["data"]
    for section, key, name in ((policy, "model_name_or_path", "model.policy.model_name_or_path"),
                               (data, "train_path", "data.train_path"), (data, "eval_path", "data.eval_path")):
        section[key] = str(ROOT / overrides.get(name, section[key]))  # relative: to the root, where the fits run
    for what in build_missing(config):
        print(f"[ablations] wrote {what}")


# --- numbers from curves (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Finite values over seeds: mean, sample standard deviation (None for one value), lowest, highest, count."""

    mean: float
    std: float | None
    low: float
    high: float
    n: int


def spread(values: Sequence[float | None]) -> Spread | None:
    """The :class:`Spread` of the finite values; None when there is none (a missing value is left out)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return Spread(statistics.fmean(finite), std, min(finite), max(finite), len(finite))


def final_value(curve: Curve) -> float | None:
    """The value at the curve's last step; None for an empty curve."""
    return curve[-1][1] if curve else None


def run_mean(curve: Curve) -> float | None:
    """The mean of a curve's values over its steps; None for an empty curve."""
    return statistics.fmean(v for _, v in curve) if curve else None


def first_step_reaching(curve: Curve, threshold: float) -> int | None:
    """The first logged step whose value is at least ``threshold``; None (never) when no step reaches it."""
    return next((int(step) for step, value in curve if value >= threshold), None)


def mean_curve(curves: Sequence[Curve]) -> list[dict]:
    """Per step logged by every curve: {step, mean, std, low, high, n} over the curves (the seeds)."""
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    by_step = [dict(c) for c in curves]
    return [{"step": step, **asdict(spread([c[step] for c in by_step]))} for step in steps]


def summarize(runs: Sequence[RunResult]) -> dict:
    """An experiment's numbers over its successful runs (seeds)."""
    ok = [r for r in runs if r.ok]
    summary = {tag: spread([final_value(r.curves.get(tag, [])) for r in ok]) for tag, _ in FINAL_TAGS}
    summary.update({tag: spread([run_mean(r.curves.get(tag, [])) for r in ok]) for tag, _ in RUN_MEAN_TAGS})
    return {
        "seeds": [r.seed for r in ok],
        "final": {tag: asdict(s) if s else None for tag, s in summary.items()},
        "first_step_conflict": {str(r.seed): first_step_reaching(r.curves.get(CONFLICT, []), THRESHOLD) for r in ok},
        "mean_curves": {tag: mean_curve([r.curves[tag] for r in ok if tag in r.curves])
                        for tag in sorted({t for r in ok for t in r.curves})},
    }


def difference(candidate: dict | None, baseline: dict | None) -> dict | None:
    """candidate minus baseline in mean (two :class:`Spread` dicts), against the larger of their standard deviations.

    ``exceeds_spread``: |difference| > that spread (None with one seed on either side); ``meets_goal``: the candidate
    is at least ``GOAL`` higher and the difference exceeds the spread.
    """
    if candidate is None or baseline is None:
        return None
    delta = candidate["mean"] - baseline["mean"]
    stds = [candidate["std"], baseline["std"]]
    spread_ = None if None in stds else max(stds)
    exceeds = None if spread_ is None else abs(delta) > spread_
    return {"delta": delta, "spread": spread_, "exceeds_spread": exceeds,
            "meets_goal": bool(exceeds) and delta >= GOAL - 1e-12}


# --- the report ---------------------------------------------------------------------------------------


def cell(s: dict | None, digits: int = 2) -> str:
    if s is None:
        return "–"
    if s["std"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def first_steps_cell(first: dict[str, int | None]) -> str:
    return ", ".join("never" if step is None else str(step) for step in first.values()) or "–"


def yes_no(value: bool | None) -> str:
    return "n/a (one seed)" if value is None else ("yes" if value else "no")


def results_markdown(report: dict) -> str:
    """results.md from results.json's content."""
    s = report["settings"]
    baseline = s.get("baseline", BASELINE)
    lines = [
        "# Ablations on the text-bias task",
        "",
        f"`{report['command']}`",
        "",
        f"Each experiment: {len(s['seeds'])} seed(s) ({', '.join(map(str, s['seeds']))}), {s['steps']} optimizer steps "
        f"of 8 prompts x 8 completions, greedy validation every {s['eval_every']} steps"
        + (f" on {s['eval_limit']} held-out questions" if s["eval_limit"] else "")
        + ". A cell is the mean ± the sample standard deviation over the seeds that finished (lowest and highest in "
        f"results.json), at step {s['steps']}; the VGR gate and Spearman columns are means over every training step. "
        f"The last column lists, seed by seed, the first validation step at which conflict accuracy reached "
        f"{THRESHOLD}.",
        "",
        "| experiment | seeds | " + " | ".join(c for _, c in FINAL_TAGS + RUN_MEAN_TAGS)
        + f" | conflict ≥ {THRESHOLD} first at |",
        "|---|---|" + "---|" * (len(FINAL_TAGS) + len(RUN_MEAN_TAGS)) + "---|",
    ]
    for name, result in report["experiments"].items():
        summary = result["summary"]
        cells = [cell(summary["final"][tag]) for tag, _ in FINAL_TAGS + RUN_MEAN_TAGS]
        lines.append(f"| {name} | {len(summary['seeds'])}/{len(result['runs'])} | " + " | ".join(cells)
                     + f" | {first_steps_cell(summary['first_step_conflict'])} |")
    if report["differences"]:
        lines += [
            "",
            f"## Against {baseline}: conflict accuracy at step {s['steps']}",
            "",
            "Difference of the means; spread: the larger of the two experiments' standard deviations over seeds. "
            f"Issue 14's goal for an attention reward: at least +{GOAL:.2f} and larger than the spread. The column says "
            "whether the difference meets it, not why: an experiment's stack may differ from the baseline's in more "
            "than its attention reward (see each experiment's configs in results.json).",
            "",
            f"| experiment | conflict accuracy (lowest–highest) | {baseline} (lowest–highest) | difference | spread "
            f"| larger than the spread | +{GOAL:.2f} or more and larger than the spread |",
            "|---|---|---|---|---|---|---|",
        ]
        base = report["experiments"][baseline]["summary"]["final"][CONFLICT]
        for name, d in report["differences"].items():
            own = report["experiments"][name]["summary"]["final"][CONFLICT]
            if d is None:
                lines.append(f"| {name} | – | – | – | – | – | – |")
                continue
            lines.append(
                f"| {name} | {own['mean']:.2f} ({own['low']:.2f}–{own['high']:.2f}) | {base['mean']:.2f} "
                f"({base['low']:.2f}–{base['high']:.2f}) | {d['delta']:+.2f} | "
                f"{'–' if d['spread'] is None else format(d['spread'], '.2f')} | {yes_no(d['exceeds_spread'])} | "
                f"{'yes' if d['meets_goal'] else 'no'} |")
    lines += ["", "## Runs", ""]
    failures = [run for result in report["experiments"].values() for run in result["runs"].values()
                if run["returncode"] != 0]
    runs = [run for result in report["experiments"].values() for run in result["runs"].values()
            if run["returncode"] == 0]
    seconds = [run["seconds"] for run in runs if run["seconds"] is not None]
    reused = sum(run.get("reused", False) for run in runs)
    if seconds:
        lines.append(f"{len(runs)} runs, {min(seconds):.0f}–{max(seconds):.0f} s each"
                     + (f" ({reused} read back from an earlier invocation, with the time it measured)" if reused else "")
                     + f"; this invocation took {report['seconds']:.0f} s, {s['jobs']} runs at a time.")
    if not failures:
        lines.append("Every run finished.")
    for run in failures:
        lines += ["", f"**{run['experiment']}, seed {run['seed']} failed** (exit status {run['returncode']}; "
                  f"`{run['run_dir']}/stderr.log`), last lines of its stderr:", "", "```text", run["stderr_tail"],
                  "```"]
    lines += ["", "## Plots", ""]
    if report["plots"]:
        lines += [f"![{name}]({name})" for name in report["plots"]]
    else:
        lines.append(f"Skipped: {report['plots_skipped']}.")
    return "\n".join(lines) + "\n"


def write_plots(report: dict, out: Path) -> list[str]:
    """The PNGs: per tag a panel, per experiment the mean over seeds and the lowest-to-highest band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for filename, title, tags in PLOTS:
        figure, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags) + 2.2, 3.4), squeeze=False)
        for axis, tag in zip(axes[0], tags):
            for name, result in report["experiments"].items():
                points = result["summary"]["mean_curves"].get(tag, [])
                if not points:
                    continue
                steps = [p["step"] for p in points]
                line, = axis.plot(steps, [p["mean"] for p in points], marker=".", label=name)
                axis.fill_between(steps, [p["low"] for p in points], [p["high"] for p in points],
                                  color=line.get_color(), alpha=0.15, linewidth=0)
            axis.set_title(tag, fontsize=9)
            axis.set_xlabel("optimizer step")
            axis.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=80)
        plt.close(figure)
        written.append(filename)
    return written


def make_report(results: list[RunResult], args: argparse.Namespace, command: str, seconds: float) -> dict:
    experiments = {}
    for name in args.experiments:
        runs = [r for r in results if r.experiment == name]
        experiments[name] = {
            "configs": [str(p.relative_to(ROOT)) for p in (*experiment_configs(name), TEXT_BIAS)],
            "runs": {str(r.seed): asdict(r) for r in runs},
            "summary": summarize(runs),
        }
    differences = {}
    if args.baseline in experiments:
        base = experiments[args.baseline]["summary"]["final"][CONFLICT]
        differences = {name: difference(result["summary"]["final"][CONFLICT], base)
                       for name, result in experiments.items() if name != args.baseline}
    return {
        "command": command,
        "settings": {"experiments": args.experiments, "seeds": args.seeds, "steps": args.steps,
                     "eval_every": args.eval_every, "eval_limit": args.eval_limit, "jobs": args.jobs,
                     "baseline": args.baseline,
                     "threshold": THRESHOLD},
        "seconds": seconds,
        "experiments": experiments,
        "differences": differences,
        "plots": [],
        "plots_skipped": None,
    }


# --- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablations"), help="folder of the runs and the results")
    parser.add_argument("--experiments", nargs="+", default=None,
                        help=f"expN[+overlay...] (default: {' '.join(DEFAULT_EXPERIMENTS)}); an overlay is "
                             "configs/ablations/<name>.yaml or benchmarks/configs/ablations/<name>.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 3 4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"validation every this many steps (default {DEFAULTS['eval_every']}); divides --steps")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="held-out questions (default: the config's 96, 32 per split)")
    parser.add_argument("--quick", action="store_true",
                        help="exp1 and exp3, seeds 0 1, 20 steps, validation every 10 on 24 questions (about a "
                             "minute); options given explicitly still apply")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs under --out that finished with the same command; train only the others")
    parser.add_argument("--baseline", default=BASELINE,
                        help="the experiment the others are compared with in conflict accuracy (default: exp1, "
                             "accuracy only)")
    parser.add_argument("--report", default=None,
                        help="folder for results.md, results.json and the plots (default: --out), e.g. to tabulate "
                             "extra experiments with --reuse of the baseline's runs without replacing the main table")
    parser.add_argument("--model", default=None, help="another folder for the tiny model (built there if missing)")
    parser.add_argument("--data-dir", default=None,
                        help="another folder for the text-bias train.parquet and eval.parquet (built there if missing)")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
        raise SystemExit(f"--steps ({args.steps}) must be a positive multiple of --eval-every ({args.eval_every}): "
                         "the last validation is the table's")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.experiments)) != len(args.experiments):
        raise SystemExit("--seeds and --experiments must not repeat a value")
    for name in args.experiments:
        try:
            experiment_configs(name)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    command = "python -m benchmarks.ablations" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                         else sys.argv[1:]))
    out = Path(args.out).resolve()
    overrides = {}
    if args.model:
        overrides["model.policy.model_name_or_path"] = str(Path(args.model).resolve())
    if args.data_dir:
        overrides["data.train_path"] = str(Path(args.data_dir).resolve() / "train.parquet")
        overrides["data.eval_path"] = str(Path(args.data_dir).resolve() / "eval.parquet")
    if args.eval_limit:
        overrides["data.eval_limit"] = str(args.eval_limit)
    settings = Settings(out, args.steps, args.eval_every, tuple(f"--{k}={v}" for k, v in overrides.items()),
                        args.reuse)
    build_fixtures(overrides)
    jobs = [(name, seed) for name in args.experiments for seed in args.seeds]
    print(f"[ablations] {len(jobs)} runs ({len(args.experiments)} experiments x {len(args.seeds)} seeds), "
          f"{args.steps} steps each, {args.jobs} at a time, under {out}", flush=True)
    start = time.monotonic()
    done = []

    def run(job: tuple[str, int]) -> RunResult:
        result = run_one(*job, settings)
        done.append(result)
        status = "reused" if result.reused else f"{result.seconds:.0f} s"
        if not result.ok:
            status = f"FAILED (exit {result.returncode}), see {result.run_dir}/stderr.log"
        print(f"[ablations] {job[0]} seed {job[1]}: {status} ({len(done)}/{len(jobs)})", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run, jobs))
    report = make_report(results, args, command, round(time.monotonic() - start, 1))
    folder = Path(args.report).resolve() if args.report else out
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report["plots"] = write_plots(report, folder)
    except ImportError:
        report["plots_skipped"] = "matplotlib is not installed (pip install 'dapo-lightning[plots]')"
    (folder / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "results.md").write_text(results_markdown(report))
    print(results_markdown(report))
    print(f"[ablations] wrote {folder / 'results.md'}, {folder / 'results.json'}"
          + "".join(f", {folder / p}" for p in report["plots"]))
    if report["plots_skipped"]:
        print(f"[ablations] plots skipped: {report['plots_skipped']}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
