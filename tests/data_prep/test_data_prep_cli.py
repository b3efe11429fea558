"""python -m dapo_lightning.data_prep: dispatch, --help everywhere, the three sources end to end, and bounded memory."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from datasets import Dataset, Image as ImageFeature
from PIL import Image

from dp_helpers import AOKVQA_FEATURES, MMMU_PRO_FEATURES, png, write_parquet

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["aokvqa", "visrag-arxivqa", "mmmu-pro", "merge", "validate", "synthetic", "text-bias", "modality-filter",
            "tiny-model", "fixtures"]


def test_help_in_a_real_subprocess():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "dapo_lightning.data_prep", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == COMMANDS
    result = subprocess.run(
        [sys.executable, "-m", "dapo_lightning.data_prep", "mmmu-pro", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "--multi-image {skip,first}" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(cli, command):
    code, stdout, _ = cli(command, "--help")
    assert code == 0
    assert stdout.startswith(f"usage: python -m dapo_lightning.data_prep {command}")


def test_unknown_command_and_no_command_exit_2(cli):
    code, _, stderr = cli("coco")
    assert code == 2
    assert stderr.startswith("error: unknown command 'coco'; choose from aokvqa, visrag-arxivqa, mmmu-pro")
    code, _, stderr = cli()
    assert code == 2
    assert "usage: python -m dapo_lightning.data_prep COMMAND" in stderr


def test_sources_to_merged_training_file(cli, tmp_path, tiny_model_dir):
    """Two converted sources and the synthetic set merge into a file that validates, datasets reads as Images,
    and the data module feeds to one training step of the tiny model."""
    aokvqa = write_parquet(
        tmp_path / "aokvqa-train.parquet",
        [
            {
                "image": {"bytes": png((9, 6)), "path": None},
                "question_id": "q0",
                "question": "What is red?",
                "choices": ["bus", "sky", "grass", "sea"],
                "correct_choice_idx": 0,
                "direct_answers": ["bus"] * 10,
                "difficult_direct_answer": False,
                "rationales": ["It is red."],
            }
        ],
        AOKVQA_FEATURES,
    )
    mmmu_row = {name: None for name in MMMU_PRO_FEATURES}
    mmmu_row.update(
        id="m0",
        question="Which shape?",
        options="['circle', 'square']",
        answer="B",
        image_1={"bytes": png((4, 8)), "path": None},
    )
    mmmu = write_parquet(tmp_path / "mmmu.parquet", [mmmu_row], MMMU_PRO_FEATURES)
    assert cli("aokvqa", "--input", aokvqa, "--out", tmp_path / "a.parquet")[0] == 0
    assert cli("mmmu-pro", "--input", mmmu, "--out", tmp_path / "m.parquet")[0] == 0
    assert cli("synthetic", "--out", tmp_path / "s.parquet", "--rows", "4")[0] == 0
    merged = tmp_path / "ddm.parquet"
    code, stdout, _ = cli(
        "merge", tmp_path / "a.parquet", tmp_path / "m.parquet", tmp_path / "s.parquet", "--shuffle", "--out", merged
    )
    assert code == 0
    assert stdout.splitlines()[-1] == f"wrote 6 rows to {merged}"
    assert cli("validate", merged)[0] == 0

    dataset = Dataset.from_parquet(str(merged))
    assert isinstance(dataset.features["image"], ImageFeature)
    by_problem = {row["problem"]: (row["image"].size, row["solution"]) for row in dataset}
    assert by_problem["What is red?\nA: bus\nB: sky\nC: grass\nD: sea"] == ((9, 6), "A")
    assert by_problem["Which shape?\nA: circle\nB: square"] == ((4, 8), "B")

    from tests.test_module import fit, make_module

    module = make_module(tiny_model_dir, rewards=("accuracy", "format"))
    trainer = fit(tmp_path / "run", module, merged, tiny_model_dir, steps=2, batch_size=2)
    assert trainer.global_step == 2
    assert float(trainer.callback_metrics["train/completion_length/mean"]) >= 1


def _noise_png(seed: int, side: int = 128) -> bytes:
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)  # incompressible: ~49 KB each
    return buffer.getvalue()


def test_conversion_holds_one_batch_of_images_not_the_source(cli, tmp_path):
    images = [_noise_png(seed) for seed in range(128)]
    rows = [
        {
            "image": {"bytes": data, "path": None},
            "question_id": str(i),
            "question": "Noise?",
            "choices": ["yes", "no"],
            "correct_choice_idx": 0,
            "direct_answers": [],
            "difficult_direct_answer": False,
            "rationales": [],
        }
        for i, data in enumerate(images)
    ]
    source = write_parquet(tmp_path / "big.parquet", rows, AOKVQA_FEATURES, row_group_size=8)
    del rows
    total = sum(len(data) for data in images)
    largest = max(len(data) for data in images)
    cli("aokvqa", "--input", source, "--out", tmp_path / "warm.parquet", "--batch-size", "8")  # imports happen here
    tracemalloc.start()
    try:
        code, _, _ = cli("aokvqa", "--input", source, "--out", tmp_path / "out.parquet", "--batch-size", "8")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0
    # At most one batch read (8 images) and one batch buffered for writing (8 more), plus slack for everything else.
    assert peak < 16 * largest + 300_000 < total / 4, (peak, total)


def test_fixtures_command_builds_what_a_config_asks_for_once(tmp_path, capsys):
    from dapo_lightning.data_prep.__main__ import main

    base = tmp_path / "base.yaml"
    base.write_text(f"model:\n  policy:\n    model_name_or_path: {tmp_path / 'model'}\n    build_tiny_if_missing: tiny\n"
                    f"data:\n  train_path: {tmp_path / 'elsewhere.parquet'}\n")
    overlay = tmp_path / "overlay.yaml"  # later files win, as in the CLI
    overlay.write_text(f"data:\n  train_path: {tmp_path / 'data.parquet'}\n  build_synthetic_if_missing:\n"
                       "    rows: 8\n    question_types: [colour]\n")
    assert main(["fixtures", "--config", str(base), "--config", str(overlay)]) == 0
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "data.parquet").exists()
    assert not (tmp_path / "elsewhere.parquet").exists()
    assert Dataset.from_parquet(str(tmp_path / "data.parquet")).num_rows == 8
    assert "wrote the offline tiny Qwen2.5-VL" in capsys.readouterr().out
    assert main(["fixtures", "--config", str(base), "--config", str(overlay)]) == 0
    assert "nothing to build" in capsys.readouterr().out
