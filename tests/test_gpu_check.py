"""``benchmarks/gpu_check.py``'s CPU dry run (issue 16): the code the GPU check runs, on the tiny model, prints its table.

The GPU run itself (the 3B shape, DeepSpeed, the peer benchmark against TRL) needs the H200 machine; this runs every
part that the CPU allows through the same functions and the same parent/child process split, and checks the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_prints_the_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--shape",
                             "tiny", "--steps", "2", "--prompts", "1", "--generations", "2", "--completion-length", "3",
                             "--cache", str(tmp_path / "cache"), "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("part "))
    assert header.split()[:4] == ["part", "status", "s/step", "(median)"] and "peak RSS MiB" in header
    rows = {line.split("  ")[0].strip(): line for line in lines[lines.index(header) + 1:] if line and "  " in line}
    for name in ("fit, shared prompt on", "fit, shared prompt off", "fit, shared prompt on + AttentionMetrics"):
        assert rows[name].split()[len(name.split())] == "ok", rows[name]
    assert "capture overhead" in rows["fit, shared prompt on + AttentionMetrics"]
    assert "skipped" in rows["DeepSpeed ZeRO-2 fit, 1 process"] and "needs a GPU" in rows["DeepSpeed ZeRO-2 fit, 1 process"]
    assert "peer_trl.py --shapes 3b --device cuda --dtype bfloat16" in rows["peer benchmark vs TRL (3b)"]
    saved = json.loads(out.read_text())
    for part in ("fit-shared", "fit-noshare", "fit-attention"):
        steps = saved["results"][part]["steps"]
        assert len(steps) == 2 and all(s["tokens"] == 2 * 3 for s in steps)  # 1 prompt x 2 completions x 3 tokens
        assert {"generate", "update", "step"} <= set(steps[0]["timings"])
