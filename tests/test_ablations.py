"""benchmarks/ablations.py: the table's numbers on hand-made curves, then ``--quick`` end to end (issue 14, item 4)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks import ablations
from benchmarks.ablations import RunResult, difference, first_step_reaching, mean_curve, spread, summarize
from benchmarks.scalars import scalar_curves
from benchmarks.text_bias_rewards import vgr_relative_gate
from dapo_lightning.rewards.vgr import vgr_reward

ROOT = Path(__file__).resolve().parents[1]


# --- pure functions on hand-made curves ----------------------------------------------------------------


def test_spread_is_mean_sample_std_and_range_of_the_finite_values():
    s = spread([0.5, 0.7, 0.9, None, math.nan])
    # mean 2.1 / 3 = 0.7; deviations -0.2, 0, 0.2: (0.04 + 0 + 0.04) / (3 - 1) = 0.04, std 0.2
    assert (s.n, s.low, s.high) == (3, 0.5, 0.9)
    assert s.mean == pytest.approx(0.7) and s.std == pytest.approx(0.2)
    one = spread([0.25])
    assert (one.mean, one.std, one.n) == (0.25, None, 1)  # no spread from one seed
    assert spread([]) is None and spread([None, math.inf]) is None


def test_first_step_reaching_counts_the_threshold_itself_and_says_never_as_none():
    curve = [(40, 0.5), (80, 0.8), (120, 0.7), (160, 0.9)]
    assert first_step_reaching(curve, 0.8) == 80  # 0.8 reaches 0.8; the later dip does not matter
    assert first_step_reaching(curve, 0.85) == 160
    assert first_step_reaching([(40, 0.79), (80, 0.2)], 0.8) is None
    assert first_step_reaching([], 0.8) is None


def test_mean_curve_keeps_the_steps_every_seed_logged():
    points = mean_curve([[(40, 0.2), (80, 0.6)], [(40, 0.4), (80, 1.0), (120, 1.0)]])
    assert [p["step"] for p in points] == [40, 80]  # step 120 only in the second seed (a shorter run)
    assert points[1]["mean"] == pytest.approx(0.8) and (points[1]["low"], points[1]["high"]) == (0.6, 1.0)
    # std of (0.6, 1.0): deviations 0.2 each, 0.08 / 1, sqrt 0.2828
    assert points[1]["std"] == pytest.approx(math.sqrt(0.08))
    assert mean_curve([]) == []


def run(seed: int, conflict: list[tuple[int, float]], gate: list[float], code: int = 0) -> RunResult:
    curves = {ablations.CONFLICT: conflict, "train/vgr_reward/gate_closed_groups": list(enumerate(gate, start=1))}
    return RunResult("exp3", seed, f"/runs/exp3/seed{seed}", code, 10.0, curves if code == 0 else {}, "boom")


def test_summarize_takes_the_last_step_per_seed_the_run_mean_of_the_gate_and_leaves_failed_runs_out():
    runs = [run(0, [(40, 0.3), (80, 0.5)], [1.0, 1.0, 0.5, 0.5]),  # gate: mean 0.75
            run(1, [(40, 0.8), (80, 0.9)], [1.0, 0.0, 0.0, 0.0]),  # gate: mean 0.25
            run(2, [], [], code=1)]
    summary = summarize(runs)
    assert summary["seeds"] == [0, 1]
    conflict = summary["final"][ablations.CONFLICT]
    # finals 0.5 and 0.9: mean 0.7, std sqrt((0.04 + 0.04) / 1) = 0.2828
    assert conflict["mean"] == pytest.approx(0.7) and conflict["std"] == pytest.approx(math.sqrt(0.08))
    assert (conflict["low"], conflict["high"], conflict["n"]) == (0.5, 0.9, 2)
    gate = summary["final"]["train/vgr_reward/gate_closed_groups"]
    assert gate["mean"] == pytest.approx(0.5) and (gate["low"], gate["high"]) == (0.25, 0.75)
    assert summary["first_step_conflict"] == {"0": None, "1": 40}
    assert summary["final"]["val/text_reliance"] is None  # logged by no run
    assert [p["mean"] for p in summary["mean_curves"][ablations.CONFLICT]] == pytest.approx([0.55, 0.7])


def test_difference_against_the_larger_spread_and_the_goal():
    base = {"mean": 0.60, "std": 0.10}
    d = difference({"mean": 0.85, "std": 0.05}, base)
    assert d["delta"] == pytest.approx(0.25) and d["spread"] == 0.10
    assert d["exceeds_spread"] and d["meets_goal"]
    small = difference({"mean": 0.68, "std": 0.01}, {"mean": 0.60, "std": 0.02})
    assert small["exceeds_spread"] and not small["meets_goal"]  # +0.08 > 0.02, but under 10 points
    noisy = difference({"mean": 0.80, "std": 0.25}, base)
    assert not noisy["exceeds_spread"] and not noisy["meets_goal"]  # +0.20 inside a spread of 0.25
    worse = difference({"mean": 0.30, "std": 0.05}, base)
    assert worse["exceeds_spread"] and not worse["meets_goal"]  # clearly lower is not the goal
    one_seed = difference({"mean": 0.9, "std": None}, base)
    assert one_seed["exceeds_spread"] is None and not one_seed["meets_goal"]
    assert difference(None, base) is None


def report_of(runs_by_experiment: dict[str, list[RunResult]], plots: list[str]) -> dict:
    experiments = {name: {"runs": {str(r.seed): asdict(r) for r in runs}, "summary": summarize(runs)}
                   for name, runs in runs_by_experiment.items()}
    base = experiments["exp1"]["summary"]["final"][ablations.CONFLICT]
    return {
        "command": "python -m benchmarks.ablations --seeds 0 1 2",
        "settings": {"seeds": [0, 1, 2], "steps": 80, "eval_every": 40, "eval_limit": None, "jobs": 2},
        "seconds": 30.0,
        "experiments": experiments,
        "differences": {name: ablations.difference(e["summary"]["final"][ablations.CONFLICT], base)
                        for name, e in experiments.items() if name != "exp1"},
        "plots": plots,
        "plots_skipped": None if plots else "matplotlib is not installed",
    }


def test_results_markdown_has_a_row_per_experiment_never_the_difference_and_each_failure():
    exp1 = [RunResult("exp1", s, f"/r/exp1/seed{s}", 0, 10.0, {ablations.CONFLICT: [(40, 0.2), (80, v)]})
            for s, v in ((0, 0.4), (1, 0.5), (2, 0.6))]
    exp3 = [run(0, [(40, 0.5), (80, 0.8)], [1.0]), run(1, [(40, 0.6), (80, 0.9)], [1.0]),
            run(2, [], [], code=2)]
    text = ablations.results_markdown(report_of({"exp1": exp1, "exp3": exp3}, plots=[]))
    assert "| exp1 | 3/3 | – | 0.50 ± 0.10 |" in text  # conflict 0.4, 0.5, 0.6 at step 80; aligned never logged
    assert "| never, never, never |" in text
    assert "| exp3 | 2/3 |" in text and "| 80, 80 |" in text
    # exp3 0.85 (std 0.0707) minus exp1 0.50 (std 0.10): +0.35 against 0.10
    assert "| exp3 | 0.85 (0.80–0.90) | 0.50 (0.40–0.60) | +0.35 | 0.10 | yes | yes |" in text
    assert "**exp3, seed 2 failed** (exit status 2" in text and "boom" in text  # its stderr's tail
    assert "Skipped: matplotlib is not installed." in text


def test_experiment_names_are_stacks_of_configs():
    assert ablations.experiment_configs("exp3+preference_shaping") == [
        ROOT / "configs" / "exp3.yaml", ROOT / "configs" / "ablations" / "preference_shaping.yaml"]
    assert ablations.experiment_configs("exp3+vgr_relative_gate")[-1] == (
        ROOT / "benchmarks" / "configs" / "ablations" / "vgr_relative_gate.yaml")
    for name in ablations.DEFAULT_EXPERIMENTS:
        assert all(p.exists() for p in ablations.experiment_configs(name))
    with pytest.raises(ValueError, match="no overlay nope.yaml"):
        ablations.experiment_configs("exp3+nope")
    with pytest.raises(ValueError, match="'demo' is not an experiment"):
        ablations.experiment_configs("demo")


def test_options_are_checked_before_anything_runs():
    parse = ablations.build_parser().parse_args
    with pytest.raises(SystemExit, match="multiple of --eval-every"):
        ablations.resolve(parse(["--steps", "30", "--eval-every", "20"]))
    with pytest.raises(SystemExit, match="no overlay"):
        ablations.resolve(parse(["--experiments", "exp1+missing"]))
    quick = ablations.resolve(parse(["--quick", "--seeds", "3"]))
    assert (quick.experiments, quick.seeds, quick.steps, quick.eval_every) == (["exp1", "exp3"], [3], 20, 10)
    full = ablations.resolve(parse([]))
    assert full.experiments == list(ablations.DEFAULT_EXPERIMENTS) and full.seeds == [0, 1, 2, 3, 4]


def test_vgr_relative_gate_ranks_groups_that_the_absolute_floor_leaves_at_one_half():
    vgr = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2] + [1.0, 1.01, 1.0, 1.02, 1.0, 1.01, 1.0, 1.0]
    completions = ["A"] * 16
    # group 1: n = 8 < 10, quantiles 0.25 / 0.75: q_lo = s[2] = 0.7, q_hi = s[6] = 1.1, iqr 0.4, median s[4] = 0.9;
    # 0.4 >= 0.10 x 0.9 opens the gate (SPEC 2's max(5.0, 0.09) = 5.0 does not): score clip((1.1 - v) / 0.4, 0, 1)
    # group 2: q_lo = 1.0, q_hi = s[6] = 1.01, iqr 0.01 < 0.10 x 1.0: closed, 0.5 each
    expected = [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0] + [0.5] * 8
    assert vgr_relative_gate(completions, vgr=vgr, num_generations=8) == pytest.approx(expected)
    assert vgr_reward(completions, vgr=vgr, num_generations=8) == [0.5] * 16
    with pytest.raises(ValueError, match="AttentionMetrics"):
        vgr_relative_gate(completions, num_generations=8)


# --- end to end ---------------------------------------------------------------------------------------


def printed_text_reliance(run_dir: Path, step: int) -> float:
    log = (run_dir / "stdout.log").read_text() + (run_dir / "stderr.log").read_text()
    return float(re.search(rf"\[text bias\] step {step}: text_reliance ([0-9.]+)", log).group(1))


@pytest.mark.slow
def test_quick_table_writes_results_from_each_runs_logs(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "ablations"
    args = ["--quick", "--out", str(out), "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data")]
    assert ablations.main(args) == 0
    assert (tmp_path / "data" / "eval.parquet").exists()  # the text-bias files, built on first use
    report = json.loads((out / "results.json").read_text())
    assert list(report["experiments"]) == ["exp1", "exp3"]
    for name, experiment in report["experiments"].items():
        assert experiment["configs"][-1] == "benchmarks/configs/text_bias.yaml"
        finals = []
        for seed in ("0", "1"):
            logged = experiment["runs"][seed]
            run_dir = Path(logged["run_dir"])
            assert run_dir == out.resolve() / name / f"seed{seed}" and logged["returncode"] == 0
            # every number comes from that run's own logs: its TensorBoard file and what it printed
            assert logged["curves"][ablations.CONFLICT] == [list(p) for p in scalar_curves(run_dir)[ablations.CONFLICT]]
            assert [s for s, _ in logged["curves"][ablations.CONFLICT]] == [10, 20]
            text_reliance = logged["curves"]["val/text_reliance"][-1][1]
            assert text_reliance == pytest.approx(printed_text_reliance(run_dir, 20), abs=5e-4)
            assert len(logged["curves"]["train/vgr_reward/gate_closed_groups"]) == 20  # every step captured
            finals.append(logged["curves"][ablations.CONFLICT][-1][1])
        conflict = experiment["summary"]["final"][ablations.CONFLICT]
        assert conflict["mean"] == pytest.approx(sum(finals) / 2) and conflict["n"] == 2
        assert set(experiment["summary"]["first_step_conflict"]) == {"0", "1"}
    assert report["differences"]["exp3"]["delta"] == pytest.approx(
        report["experiments"]["exp3"]["summary"]["final"][ablations.CONFLICT]["mean"]
        - report["experiments"]["exp1"]["summary"]["final"][ablations.CONFLICT]["mean"])
    text = (out / "results.md").read_text()
    assert "| exp1 | 2/2 |" in text and "| exp3 | 2/2 |" in text and "Every run finished." in text
    assert "4 runs, " in text and "read back" not in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report["plots"] == [] and "Skipped: matplotlib" in text
    else:
        assert report["plots"] == ["conflict_accuracy.png", "text_reliance.png", "vgr.png"]
        assert all((out / p).read_bytes().startswith(b"\x89PNG") for p in report["plots"])
    assert f"wrote {out.resolve() / 'results.md'}" in capsys.readouterr().out
    # --reuse reads the finished runs back instead of training them again
    assert ablations.main([*args, "--reuse"]) == 0
    again = json.loads((out / "results.json").read_text())
    for name, experiment in again["experiments"].items():
        for seed, r in experiment["runs"].items():
            assert r["reused"] and r["seconds"] == report["experiments"][name]["runs"][seed]["seconds"]
    assert "4 runs, " in (out / "results.md").read_text() and "(4 read back from an earlier invocation" in (
        out / "results.md").read_text()
    assert again["experiments"]["exp3"]["summary"] == report["experiments"]["exp3"]["summary"]
    # --report: a table of some of the experiments elsewhere, the main one left as it was
    main_table = (out / "results.md").read_text()
    assert ablations.main([*args, "--reuse", "--experiments", "exp3", "--report", str(tmp_path / "extra")]) == 0
    assert list(json.loads((tmp_path / "extra" / "results.json").read_text())["experiments"]) == ["exp3"]
    assert (out / "results.md").read_text() == main_table


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_stderr(tmp_path, tiny_model_dir):
    settings = ablations.Settings(tmp_path / "out", steps=2, eval_every=2, overrides=("--trainer.no_such_key=1",))
    result = ablations.run_one("exp1", 0, settings)
    assert result.returncode != 0 and not result.ok and result.curves == {}
    assert "no_such_key" in result.stderr_tail
    assert result.stderr_tail.splitlines() == (Path(result.run_dir) / "stderr.log").read_text().splitlines()[-25:]
