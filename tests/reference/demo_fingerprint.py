"""A fingerprint of the demo's parameters after 50 fixed-seed steps, and the run that produces it.

    python -m tests.reference.demo_fingerprint --write   # re-record (only when behaviour is meant to change)

``tests/test_demo_reference.py`` runs ``configs/demo.yaml`` for 50 steps (its own seed,
callbacks and settings; only the output paths differ) and compares the exported weights
with ``demo_50_steps.json``: per tensor its mean, root mean square, a projection on a
seeded +-1 vector (mean of sign * value) and its first values, to 1e-6. A different
sampled token anywhere in the 50 steps moves the weights by the learning rate (6e-4),
far more than that.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("demo_50_steps.json")
STEPS = 50
FIRST_VALUES = 4


def run_demo(folder: Path, steps: int = STEPS) -> Path:
    """``dapo-lightning fit --config configs/demo.yaml`` for ``steps`` steps in ``folder``; the exported folder."""
    args = [
        sys.executable, "-m", "dapo_lightning.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
        f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={folder / 'run'}",
        f"--model.policy.model_name_or_path={folder / 'model'}", f"--data.train_path={folder / 'data.parquet'}",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the demo run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return folder / "run" / "final"


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


def main(argv: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        prints = fingerprint(run_demo(Path(folder)))
    record = {"steps": STEPS, "torch": torch.__version__, "machine": platform.machine(), "tensors": prints}
    if "--write" in argv:
        REFERENCE.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {REFERENCE} ({len(prints)} tensors)")
    else:
        print(json.dumps(record)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
