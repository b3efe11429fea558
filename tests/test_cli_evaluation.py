"""``dapo-lightning test`` and ``predict`` from the command line, in subprocesses (issue 13, item 11).

A 3-step demo fit exports ``final/``; ``test`` scores a file with it and ``predict`` writes its rows, on
one process and on two (DDP on the CPU: rank 0 gathers every process's rows and writes them in file order).
"""

from __future__ import annotations

import json

import pytest

from tests.test_cli import ROOT, demo_overrides, run_cli

WRITER = "--trainer.callbacks+=dapo_lightning.predictions.PredictionWriter"


def scoring_args(subcommand: str, fitted, run_folder, *extra: str) -> list[str]:
    """The demo config with the fit's exported model (``fitted/run/final``) and data file, writing to ``run_folder``."""
    return [subcommand, "--config", str(ROOT / "configs" / "demo.yaml"),
            f"--model.policy.model_name_or_path={fitted / 'run' / 'final'}",
            f"--data.train_path={fitted / 'data.parquet'}", f"--trainer.default_root_dir={run_folder}",
            "--trainer.enable_progress_bar=false", *extra]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 3-step demo fit: its folder (``final/`` under ``run/``, the data file beside it)."""
    folder = tmp_path_factory.mktemp("cli-fit")
    run_cli(demo_overrides(folder), folder)
    return folder


@pytest.mark.slow
def test_test_scores_a_file_with_the_exported_model(fitted, tmp_path):
    questions = fitted / "data.parquet"
    result = run_cli(scoring_args("test", fitted, tmp_path / "run", f"--data.test_path={questions}"), tmp_path)
    output = result.stdout + result.stderr
    assert "test: 640 questions of" in output  # every row of the file, not the 64 of data.eval_limit
    for key in ("test/accuracy", "test/reward_mean", "test/rewards/accuracy/mean", "test/attention/late/vgr",
                "test/skipped_rows"):
        assert key in output, key
    assert "val/accuracy" not in output


@pytest.mark.slow
def test_predict_without_a_writer_writes_predictions_jsonl(fitted, tmp_path):
    run_cli(scoring_args("predict", fitted, tmp_path / "run", "--data.eval_limit=8"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({r["row"] for r in rows}) == 8  # the 8 validation questions, greedy: one each
    assert {r["sample"] for r in rows} == {0}


@pytest.mark.slow
def test_predict_writes_every_question_of_the_file(fitted, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "predictions.parquet"
    args = scoring_args("predict", fitted, tmp_path / "run", f"--data.predict_path={fitted / 'data.parquet'}", WRITER,
                        f"--trainer.callbacks.output_path={out}")
    assert f"predict: wrote 640 rows to {out}" in (lambda r: r.stdout + r.stderr)(run_cli(args, tmp_path))
    rows = pq.read_table(out).to_pylist()
    assert [(r["row"], r["sample"]) for r in rows] == [(i, 0) for i in range(640)]  # greedy: one per question
    assert {"problem", "solution", "completion", "answer", "correct", "reward", "rewards/accuracy", "vgr",
            "attention/late/aei_vision"} <= set(rows[0])


@pytest.mark.slow
def test_predict_on_two_processes_writes_one_file_in_file_order(fitted, tmp_path):
    from datasets import Dataset

    questions = tmp_path / "ten.parquet"
    Dataset.from_parquet(str(fitted / "data.parquet")).select(range(10)).to_parquet(str(questions))
    out = tmp_path / "out" / "predictions.jsonl"
    args = scoring_args("predict", fitted, tmp_path / "run", f"--data.predict_path={questions}",
                        "--data.eval_batch_size=2", "--trainer.devices=2", "--trainer.strategy=ddp", WRITER,
                        f"--trainer.callbacks.output_path={out}")
    run_cli(args, tmp_path, timeout=400)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(10))  # rank 0 had rows 0, 2, ...; rank 1 rows 1, 3, ...
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl"]  # no partial file left
