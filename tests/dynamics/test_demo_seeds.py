"""benchmarks/demo_seeds.py end to end on a 2-step budget (the real benchmark takes minutes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_variants_run_and_the_table_counts_seeds(tmp_path, tiny_model_dir, synthetic_parquet, capsys):
    script = load_script()
    out = tmp_path / "bench"
    args = ["--seeds", "0", "--steps", "2", "--eval-every", "2", "--jobs", "2", "--out", str(out),
            "--model", str(tiny_model_dir), "--data", str(synthetic_parquet)]
    assert script.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results] == [("grpo", 0), ("dapo", 0)]
    for r in results:
        assert 0.0 <= r["final_accuracy"] <= 1.0 and 0.0 <= r["no_signal_last50"] <= 1.0
        assert r["learned"] == (r["final_accuracy"] >= 0.8)
    table = (out / "table.md").read_text()
    assert "| grpo | 0 |" in table and "| dapo | 0 |" in table and "| dapo | " in table.splitlines()[-1]
    # dynamic sampling ran in the dapo run only (its logs are what the last column reads there)
    assert script.read_scalars(out / "dapo-seed0", "train/dynamic_sampling/rounds")
    assert not script.read_scalars(out / "grpo-seed0", "train/dynamic_sampling/rounds")
    # --reuse keeps finished runs
    assert script.main([*args, "--reuse"]) == 0
    assert all(r["seconds"] is None for r in json.loads((out / "results.json").read_text()))
