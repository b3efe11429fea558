"""Fingerprints of fixed-seed runs, recorded before the issue 11 redesign, and the runs that produce them.

    python -m tests.reference.demo_fingerprint --write   # re-record (only when behaviour is meant to change)

``tests/test_demo_reference.py`` runs

- ``configs/demo.yaml`` for 50 steps (its own seed, callbacks and settings; only the output
  paths differ), and
- ``tests/reference/every_callback.yaml`` for 12 steps (every rollout callback on),

and compares the exported weights with the recorded ones: per tensor its mean, root mean
square, a projection on a seeded +-1 vector (mean of sign * value) and its first values, to
1e-6. A different sampled token anywhere moves the weights by about the learning rate
(6e-4), far more than that. The second run also records every logged scalar (except
wall-clock times) and the Markdown logs, whose rendering the redesign moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.scalars import scalar_events

ROOT = Path(__file__).resolve().parents[2]
FOLDER = Path(__file__).parent
REFERENCES = {"demo": FOLDER / "demo_50_steps.json", "every_callback": FOLDER / "every_callback_12_steps.json"}
CONFIGS = {"demo": ROOT / "configs" / "demo.yaml", "every_callback": FOLDER / "every_callback.yaml"}
STEPS = {"demo": 50, "every_callback": 12}
FIRST_VALUES = 4
UNTIMED = ("time/", "completion_tokens_per_second")  # wall-clock figures differ between any two runs


def run(name: str, folder: Path) -> Path:
    """``dapo-lightning fit --config <config of name>`` in ``folder``; the run folder."""
    args = [
        sys.executable, "-m", "dapo_lightning.cli", "fit", "--config", str(CONFIGS[name]),
        f"--trainer.max_steps={STEPS[name]}", f"--trainer.default_root_dir={folder / 'run'}",
        f"--model.policy.model_name_or_path={folder / 'model'}", f"--data.train_path={folder / 'data.parquet'}",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the {name} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return folder / "run"


def fingerprint(model_folder: Path) -> dict[str, list[float]]:
    """{tensor name: [mean, rms, signed mean, first values...]} of every saved tensor (float64 statistics)."""
    from safetensors.torch import load_file

    tensors = load_file(str(model_folder / "model.safetensors"))
    out = {}
    for name in sorted(tensors):
        values = tensors[name].detach().double().flatten()  # [n]
        signs = torch.randint(0, 2, values.shape, generator=torch.Generator().manual_seed(len(name))).double() * 2 - 1
        stats = [values.mean(), values.square().mean().sqrt(), (signs * values).mean()]
        out[name] = [float(v) for v in stats] + values[:FIRST_VALUES].tolist()
    return out


def scalars(run_folder: Path) -> dict[str, list[list[float]]]:
    """{tag: [[step, value], ...]} of every TensorBoard scalar but the wall-clock ones."""
    return {tag: [[step, value] for step, value in points] for tag, points in scalar_events(run_folder).items()
            if not any(part in tag for part in UNTIMED)}


def markdown_digests(run_folder: Path) -> dict[str, str]:
    """{file name: sha256} of the Markdown logs."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_folder.rglob("*.md"))}


def record(name: str, folder: Path) -> dict:
    run_folder = run(name, folder)
    out = {"steps": STEPS[name], "torch": torch.__version__, "machine": platform.machine(),
           "tensors": fingerprint(run_folder / "final")}
    if name == "every_callback":
        out["scalars"] = scalars(run_folder)
        out["markdown"] = markdown_digests(run_folder)
    return out


def main(argv: list[str]) -> int:
    import tempfile

    for name, path in REFERENCES.items():
        with tempfile.TemporaryDirectory() as folder:
            result = record(name, Path(folder))
        if "--write" in argv:
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {path}")
        else:
            print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
