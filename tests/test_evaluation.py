"""``test`` and ``predict`` on the tiny model, in-process (issue 13, item 11).

``test`` is a validation epoch over ``data.test_path`` reported under ``test/``: the same numbers as
``validate`` on that file. ``predict`` writes one row per question and completion to a JSONL or
parquet file (``dapo_lightning.predictions.PredictionWriter``).
"""

from __future__ import annotations

import json
import math

import pytest
from datasets import Dataset
from lightning.pytorch import Trainer, seed_everything

from dapo_lightning.callbacks import AttentionMetrics
from dapo_lightning.config import PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.data.rows import mcq_features
from dapo_lightning.module import DAPOModule
from dapo_lightning.predictions import PredictionWriter
from dapo_lightning.rewards.accuracy import extract_answer

SEGMENT_METRICS = ("vgr", "aei_text", "aei_vision", "vision_ratio")


def greedy_module(model_dir, **policy) -> DAPOModule:
    return DAPOModule(policy=PolicyConfig(model_name_or_path=str(model_dir), **policy),
                      rollout=RolloutConfig(num_generations=4, max_completion_length=3, eval_greedy=True),
                      rewards=RewardConfig(reward_funcs=["accuracy", "format"]))


def held_out_file(tmp_path, synthetic_rows, rows: int = 6):
    """``rows`` questions from two sources ("left", "right"), with a ``source`` column."""
    data = [{**row, "source": "left" if i % 3 else "right"} for i, row in enumerate(synthetic_rows[:rows])]
    features = mcq_features()
    features["source"] = type(features["problem"])("string")
    path = tmp_path / "held_out.parquet"
    Dataset.from_list(data, features=features).to_parquet(str(path))
    return path


def data_module(train, model_dir, **kwargs) -> VisualMCQDataModule:
    return VisualMCQDataModule(train_path=str(train), processor=str(model_dir), system_prompt=None, batch_size=2,
                               eval_batch_size=4, **kwargs)


def trainer(tmp_path, callbacks=(), **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), callbacks=list(callbacks),
                   logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- test -----------------------------------------------------------------------------------------------


def test_test_scores_the_test_file_with_the_numbers_validate_gives_it(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                     synthetic_rows):
    held_out = held_out_file(tmp_path, synthetic_rows)
    seed_everything(0)
    [tested] = trainer(tmp_path / "t", [AttentionMetrics()]).test(
        greedy_module(tiny_model_dir), data_module(synthetic_parquet, tiny_model_dir, test_path=str(held_out)))
    seed_everything(0)
    [validated] = trainer(tmp_path / "v", [AttentionMetrics()]).validate(
        greedy_module(tiny_model_dir), data_module(synthetic_parquet, tiny_model_dir, eval_path=str(held_out)))
    assert {"test/accuracy", "test/reward_mean", "test/rewards/accuracy/mean", "test/rewards/format/mean",
            "test/accuracy/left", "test/accuracy/right", "test/skipped_rows"} <= set(tested)
    assert {f"test/attention/{s}/{m}" for s in ("late", "all") for m in SEGMENT_METRICS} <= set(tested)
    assert not any(key.startswith("val/") for key in tested)
    assert tested == pytest.approx({key.replace("val/", "test/", 1): value for key, value in validated.items()})
    # 6 questions: rows 1, 2, 4, 5 are "left", rows 0, 3 "right"; the overall accuracy is their weighted mean
    left, right = tested["test/accuracy/left"], tested["test/accuracy/right"]
    assert tested["test/accuracy"] == pytest.approx((4 * left + 2 * right) / 6)


def test_test_without_a_test_path_scores_the_validation_questions(tmp_path, tiny_model_dir, synthetic_parquet):
    seed_everything(0)
    [tested] = trainer(tmp_path / "t").test(greedy_module(tiny_model_dir),
                                            data_module(synthetic_parquet, tiny_model_dir, eval_limit=4))
    seed_everything(0)
    [validated] = trainer(tmp_path / "v").validate(greedy_module(tiny_model_dir),
                                                   data_module(synthetic_parquet, tiny_model_dir, eval_limit=4))
    assert tested == pytest.approx({key.replace("val/", "test/", 1): value for key, value in validated.items()})


# --- predict --------------------------------------------------------------------------------------------


def predict(tmp_path, module, data, output, callbacks=(), ckpt_path=None, **trainer_kwargs):
    """``trainer.predict`` with a ``PredictionWriter`` to ``output``; the rows written when it is a JSONL file."""
    seed_everything(0)
    trainer(tmp_path, [*callbacks, PredictionWriter(str(output))], **trainer_kwargs).predict(
        module, data, return_predictions=False, ckpt_path=ckpt_path)
    return read_jsonl(output) if str(output).endswith(".jsonl") else None


def test_predict_writes_one_row_per_question_with_answer_rewards_and_attention(tmp_path, tiny_model_dir,
                                                                               synthetic_parquet, synthetic_rows):
    held_out = held_out_file(tmp_path, synthetic_rows)
    output = tmp_path / "out" / "predictions.jsonl"
    rows = predict(tmp_path, greedy_module(tiny_model_dir),
                   data_module(synthetic_parquet, tiny_model_dir, predict_path=str(held_out)), output,
                   [AttentionMetrics()])
    # greedy: one completion per question, in the file's order, each naming its file and row
    assert [(r["file"], r["row"], r["sample"]) for r in rows] == [(str(held_out), i, 0) for i in range(6)]
    for r, question in zip(rows, synthetic_rows[:6]):
        assert r["problem"] == question["problem"] and r["solution"] == question["solution"]
        assert r["source"] == ("left" if r["row"] % 3 else "right")
        assert r["answer"] == extract_answer(r["completion"])
        assert r["correct"] == (r["answer"] == r["solution"])
        assert r["rewards/accuracy"] == float(r["correct"])
        assert r["rewards/format"] in (0.0, 1.0)
        assert r["reward"] == pytest.approx(r["rewards/accuracy"] + r["rewards/format"])  # weights 1, 1
        assert 1 <= r["completion_tokens"] <= 3 and isinstance(r["truncated"], bool)
        assert r["attention/skip_reason"] is None
        for segment in ("late", "all"):
            for metric in SEGMENT_METRICS:
                assert math.isfinite(r[f"attention/{segment}/{metric}"])
        assert r["vgr"] == pytest.approx(r["attention/late/vgr"])  # the value the vgr rewards read
    assert not list(output.parent.glob(".*"))  # no temporary file left behind


def test_predict_agrees_with_test_and_writes_parquet_like_jsonl(tmp_path, tiny_model_dir, synthetic_parquet,
                                                               synthetic_rows):
    import pandas as pd
    import pyarrow.parquet as pq

    held_out = held_out_file(tmp_path, synthetic_rows)
    data = data_module(synthetic_parquet, tiny_model_dir, test_path=str(held_out))  # predict_path unset: test_path
    rows = predict(tmp_path, greedy_module(tiny_model_dir), data, tmp_path / "p.jsonl")
    predict(tmp_path, greedy_module(tiny_model_dir), data, tmp_path / "p.parquet")
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == rows
    assert list(pd.read_parquet(tmp_path / "p.parquet").columns) == list(rows[0])
    assert not any(key.startswith("attention/") or key == "vgr" for key in rows[0])  # no AttentionMetrics
    seed_everything(0)
    [tested] = trainer(tmp_path / "t").test(greedy_module(tiny_model_dir), data)
    assert tested["test/accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert tested["test/reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows))


def test_predict_with_several_samples_writes_one_row_per_completion(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                    synthetic_rows):
    held_out = held_out_file(tmp_path, synthetic_rows, rows=3)
    module = DAPOModule(policy=PolicyConfig(model_name_or_path=str(tiny_model_dir)),
                        rollout=RolloutConfig(num_generations=4, max_completion_length=3, eval_num_generations=3),
                        rewards=RewardConfig(reward_funcs=["accuracy"]))
    rows = predict(tmp_path, module, data_module(synthetic_parquet, tiny_model_dir, predict_path=str(held_out)),
                   tmp_path / "p.jsonl")
    assert [(r["row"], r["sample"]) for r in rows] == [(q, s) for q in range(3) for s in range(3)]


def test_the_writer_refuses_an_unknown_suffix_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"PredictionWriter.output_path: .*\.csv.*\.jsonl, \.parquet"):
        PredictionWriter(str(tmp_path / "p.csv"))


def test_a_failed_prediction_leaves_no_file(tmp_path, tiny_model_dir, synthetic_parquet, synthetic_rows):
    class Boom(AttentionMetrics):
        def on_rollout_scored(self, trainer, pl_module, rollout):
            if trainer.predict_loop.batch_progress.current.completed >= 1:
                raise RuntimeError("boom")

    held_out = held_out_file(tmp_path, synthetic_rows)
    output = tmp_path / "out" / "p.jsonl"
    data = data_module(synthetic_parquet, tiny_model_dir, predict_path=str(held_out))
    data.hparams.eval_batch_size = 2
    with pytest.raises(RuntimeError, match="boom"):
        predict(tmp_path, greedy_module(tiny_model_dir), data, output, [Boom()])
    assert not output.exists() and not list(output.parent.glob(".*"))


def test_the_rows_of_several_processes_are_merged_in_file_and_row_order(tmp_path):
    from dapo_lightning.predictions import merged, read_rows, write_rows

    # two processes' shards of 5 questions (ShardSampler: rank 0 has rows 0, 2, 4; rank 1 rows 1, 3), 2 samples each
    per_rank = [[{"file": "a.parquet", "row": r, "sample": s, "answer": None if r < 2 else "A"} for r in rows
                 for s in (0, 1)] for rows in ([0, 2, 4], [1, 3])]
    rows = merged(per_rank)
    assert [(r["row"], r["sample"]) for r in rows] == [(q, s) for q in range(5) for s in (0, 1)]
    for suffix in (".jsonl", ".parquet"):
        write_rows(tmp_path / f"m{suffix}", rows, suffix)
        assert read_rows(tmp_path / f"m{suffix}", suffix) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.parquet"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_process_without_questions_contributes_no_rows(tmp_path, suffix):
    from dapo_lightning.predictions import RowFile, merged, read_rows

    # more processes than questions: a process's shard is empty, its file has no row (a parquet one not even a schema)
    empty = RowFile(tmp_path / f"empty{suffix}", suffix)
    empty.append([])
    empty.close()
    assert read_rows(empty.path, suffix) == []
    assert merged([[{"file": "a", "row": 0, "sample": 0}], []]) == [{"file": "a", "row": 0, "sample": 0}]


def test_a_default_writer_is_added_only_when_none_is_configured(tmp_path):
    from dapo_lightning.predictions import add_default_writer

    bare = trainer(tmp_path / "run")
    added = add_default_writer(bare)
    assert added in bare.callbacks and added.output_path == tmp_path / "run" / "predictions.jsonl"
    assert add_default_writer(bare) is None  # one writer is enough
    own = PredictionWriter(str(tmp_path / "mine.parquet"))
    configured = trainer(tmp_path / "run", [own])
    assert add_default_writer(configured) is None
    assert [c for c in configured.callbacks if isinstance(c, PredictionWriter)] == [own]


def test_unusable_questions_are_left_out_of_the_predictions_and_counted(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                       synthetic_rows, caplog):
    import logging

    rows = [{**row, "image": {"bytes": b"not an image", "path": None}} if i in (1, 4) else row
            for i, row in enumerate(synthetic_rows[:6])]
    path = tmp_path / "some_bad.parquet"
    Dataset.from_list(rows, features=mcq_features()).to_parquet(str(path))
    output = tmp_path / "p.jsonl"
    data = data_module(synthetic_parquet, tiny_model_dir, predict_path=str(path), on_bad_row="skip")
    with caplog.at_level(logging.INFO):
        written = predict(tmp_path, greedy_module(tiny_model_dir), data, output)
    assert [r["row"] for r in written] == [0, 2, 3, 5]
    messages = [r.getMessage() for r in caplog.records]
    assert f"predict: wrote 4 rows to {output}; 2 unusable question(s) skipped" in messages
    assert any(m.startswith("predict epoch 0: 2 unusable rows skipped") and f"{path}: row 1" in m for m in messages)
