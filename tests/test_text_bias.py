"""The text-bias task (issue 14): its data, the metrics of text reliance and the health of the vgr reward.

Hand-worked numbers on small fake rollouts; the fit of ``tests/test_text_bias_fit.py`` runs them all together.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from PIL import Image

from dapo_lightning.annotations import RowValues
from dapo_lightning.callbacks import AttentionMetrics, TextBiasMetrics
from dapo_lightning.callbacks.attention_metrics import average_ranks, spearman, vgr_reward_health
from dapo_lightning.callbacks.markdown_render import render_eval, text_bias_table
from dapo_lightning.callbacks.modality_probe import neutral_problem
from dapo_lightning.callbacks.text_bias import picks_cue, text_bias_rows
from dapo_lightning.data.rows import check_text, option_letters
from dapo_lightning.data_prep import text_bias
from dapo_lightning.data_prep.fixtures import build_missing
from dapo_lightning.data_prep.synthetic import COLOURS, QUESTIONS
from dapo_lightning.data_prep.text_bias import SPLITS, TextBiasConfig, held_out_rows, training_rows

OPTIONS = "\nA: red\nB: green\nC: blue\nD: yellow"
BACKGROUND = (235, 235, 235)


# --- the data ----------------------------------------------------------------------------------------


def test_same_seed_same_rows_other_seed_other_rows():
    config = TextBiasConfig(rows=12, eval_rows=9, seed=3)
    assert training_rows(config) == training_rows(TextBiasConfig(rows=12, eval_rows=9, seed=3))
    assert held_out_rows(config) == held_out_rows(TextBiasConfig(rows=12, eval_rows=9, seed=3))
    assert training_rows(config) != training_rows(TextBiasConfig(rows=12, eval_rows=9, seed=4))
    assert held_out_rows(config) != held_out_rows(TextBiasConfig(rows=12, eval_rows=9, seed=4))
    # separate streams: the held-out rows do not depend on how many training rows there are
    assert held_out_rows(config) == held_out_rows(TextBiasConfig(rows=500, eval_rows=9, seed=3))


def test_held_out_splits_are_balanced_in_every_prefix_and_cue_as_named():
    rows = held_out_rows(TextBiasConfig(eval_rows=60, seed=1))
    for prefix in (3, 30, 60):  # data.eval_limit keeps a prefix
        counts = {split: sum(r["source"] == split for r in rows[:prefix]) for split in SPLITS}
        assert counts == {split: prefix // 3 for split in SPLITS}
    for row in rows:
        first_line = row["problem"].split("\n")[0]
        if row["source"] == "no_cue":
            assert row["cue"] == "" and row["problem"] == QUESTIONS["colour"] + OPTIONS  # the demo's question
            continue
        named = first_line.removeprefix("the shape is ")
        assert row["problem"] == f"the shape is {named}\n{QUESTIONS['colour']}{OPTIONS}"
        assert row["cue"] == "ABCD"[list(COLOURS).index(named)]
        assert (row["cue"] == row["solution"]) == (row["source"] == "aligned")


def test_training_cue_is_right_at_the_configured_rate():
    rows = training_rows(TextBiasConfig(rows=4000, seed=0))
    right = sum(r["cue"] == r["solution"] for r in rows) / len(rows)
    assert abs(right - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)  # 4 standard deviations: 0.027
    assert all((r["source"] == "aligned") == (r["cue"] == r["solution"]) for r in rows)
    assert {r["source"] for r in rows} == {"aligned", "conflict"} and all(r["cue"] in "ABCD" and r["cue"] for r in rows)
    assert all(r["cue"] == r["solution"] for r in training_rows(TextBiasConfig(rows=50, cue_accuracy=1.0)))
    assert not any(r["cue"] == r["solution"] for r in training_rows(TextBiasConfig(rows=50, cue_accuracy=0.0)))
    rate = sum(r["cue"] == r["solution"] for r in training_rows(TextBiasConfig(rows=4000, cue_accuracy=0.3)))
    assert abs(rate / 4000 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)


def test_rows_pass_the_training_checks_and_the_image_shows_the_answer():
    rows = training_rows(TextBiasConfig(rows=20, seed=2)) + held_out_rows(TextBiasConfig(eval_rows=12, seed=2))
    for i, row in enumerate(rows):
        assert option_letters(row["problem"]) == ["A", "B", "C", "D"]
        assert check_text(row["problem"], row["solution"], row=i, require_options=True) == row["solution"]
        pixels = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        assert pixels.size == (56, 56)
        counts = {}
        for pixel in pixels.getdata():
            if pixel != BACKGROUND:
                counts[pixel] = counts.get(pixel, 0) + 1
        assert COLOURS[list(COLOURS)["ABCD".index(row["solution"])]] == max(counts, key=counts.get)


def test_the_probes_neutral_prompt_drops_the_cue_and_keeps_the_options():
    row = held_out_rows(TextBiasConfig(eval_rows=2))[1]  # a conflict row
    assert neutral_problem(row["problem"], "Look at the image.") == "Look at the image." + OPTIONS


def test_cue_words_are_in_the_tokenizer_vocabulary(processor):
    from dapo_lightning.data import example_prompt_batch

    unk = processor.tokenizer.unk_token_id
    rows = held_out_rows(TextBiasConfig(eval_rows=12, seed=0))
    rows = [{**row, "problem": text_bias.problem_text(colour)} for row, colour in zip(rows, [*COLOURS, None])] + rows
    batch = example_prompt_batch(processor, rows, system_prompt=None)
    assert unk not in batch.input_ids[batch.attention_mask.bool()].tolist()
    # the check can fail: a word the offline vocabulary lacks is <unk>
    odd = example_prompt_batch(processor, [{**rows[0], "problem": "the shape is purple" + OPTIONS}], system_prompt=None)
    assert unk in odd.input_ids.tolist()[0]


def test_the_command_writes_both_files_and_names_bad_options(tmp_path, capsys):
    from dapo_lightning.data_prep.__main__ import main

    out = tmp_path / "tb"
    assert main(["text-bias", "--out", str(out), "--rows", "8", "--eval-rows", "6", "--seed", "2"]) == 0
    train, held_out = Dataset.from_parquet(str(out / "train.parquet")), Dataset.from_parquet(str(out / "eval.parquet"))
    assert train.column_names == ["image", "problem", "solution", "source", "cue"] == held_out.column_names
    assert (train.num_rows, held_out.num_rows) == (8, 6)
    assert held_out["cue"] == [r["cue"] for r in held_out_rows(TextBiasConfig(rows=8, eval_rows=6, seed=2))]
    assert not list(out.glob(".*tmp*"))  # written through a temporary file, renamed into place
    for option, value in [("--cue-accuracy", "1.5"), ("--cue-accuracy", "nan"), ("--cue-accuracy", "x"),
                          ("--rows", "0"), ("--eval-rows", "0"), ("--seed", "-1"), ("--image-size", "10")]:
        assert main(["text-bias", "--out", str(tmp_path / "bad"), option, value]) == 2
        assert f"argument {option}:" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_fixture_builds_train_and_held_out_files_once(tmp_path):
    train, held_out = tmp_path / "d" / "train.parquet", tmp_path / "d" / "eval.parquet"
    settings = {"task": "text_bias", "rows": 10, "eval_rows": 6, "cue_accuracy": 0.5, "seed": 1, "image_size": 56}
    config = {"data": {"train_path": str(train), "eval_path": str(held_out), "build_synthetic_if_missing": settings}}
    assert build_missing(config) == [f"text-bias training questions to {train}",
                                     f"text-bias held-out questions (aligned, conflict, no_cue) to {held_out}"]
    assert build_missing(config) == []
    first = Dataset.from_parquet(str(held_out)).to_list()
    held_out.unlink()  # one file rebuilt alone is the same file
    assert build_missing(config) == [f"text-bias held-out questions (aligned, conflict, no_cue) to {held_out}"]
    assert Dataset.from_parquet(str(held_out)).to_list() == first
    assert Dataset.from_parquet(str(train)).num_rows == 10


@pytest.mark.parametrize("settings, eval_path, message", [
    ({"task": "text_bias", "cue_accuracy": 2.0}, "e.parquet", r"data\.build_synthetic_if_missing\.cue_accuracy: .*2\.0"),
    ({"task": "text_bias", "eval_rows": 0}, "e.parquet", r"data\.build_synthetic_if_missing\.eval_rows: .*0"),
    ({"task": "text_bias", "colour": "red"}, "e.parquet", r"data\.build_synthetic_if_missing\.colour: not a"),
    ({"task": "text_bias", "question_types": ["shape"]}, "e.parquet", r"question_types"),
    ({"task": "captions"}, "e.parquet", r"data\.build_synthetic_if_missing\.task: .*'captions'"),
    ({"task": "text_bias"}, None, r"data\.eval_path: "),
])
def test_bad_fixture_settings_name_their_key(tmp_path, settings, eval_path, message):
    data = {"train_path": str(tmp_path / "t.parquet"), "eval_path": eval_path and str(tmp_path / eval_path),
            "build_synthetic_if_missing": settings}
    with pytest.raises(ValueError, match=message):
        build_missing({"data": data})
    assert not list(tmp_path.iterdir())


def test_the_fixtures_command_builds_the_task_stacked_on_the_demo(tmp_path, capsys):
    from pathlib import Path

    from dapo_lightning.data_prep.__main__ import main

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # its question_types [colour] merge in
    overlay = tmp_path / "text_bias.yaml"
    overlay.write_text(f"data:\n  train_path: {tmp_path / 'train.parquet'}\n  eval_path: {tmp_path / 'eval.parquet'}\n"
                       "  build_synthetic_if_missing:\n    task: text_bias\n    rows: 6\n    eval_rows: 3\n"
                       f"model:\n  policy:\n    model_name_or_path: {tmp_path / 'absent'}\n    build_tiny_if_missing: null\n")
    assert main(["fixtures", "--config", str(demo), "--config", str(overlay)]) == 0
    assert Dataset.from_parquet(str(tmp_path / "eval.parquet"))["source"] == list(SPLITS)
    assert "text-bias training questions" in capsys.readouterr().out


# --- validation: text reliance and VGR per split ------------------------------------------------------


def val_rollout(completions, sources, cues, vgr=None, requested_by=None):
    """The parts of a scored validation rollout (G = 1) that TextBiasMetrics reads."""
    columns = {"source": sources, "cue": cues, "solution": ["A"] * len(completions)}
    return SimpleNamespace(stage="val", requested_by=requested_by, is_extra=requested_by is not None,
                           completions=completions, num_rows=len(completions), row_columns=lambda: columns,
                           prompts=SimpleNamespace(columns=columns),
                           annotations={} if vgr is None else {"vgr": RowValues(vgr)})


def fake_trainer(**kw):
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), sanity_checking=False,
                           global_step=4, predicting=False, **kw)


def test_picks_cue_reads_the_answer_as_the_accuracy_reward_does():
    assert picks_cue("C", "C") == 1.0
    assert picks_cue("<think>maybe A</think><answer>b</answer>", "B") == 1.0  # answer tags, case folded
    assert picks_cue("The answer is D", "B") == 0.0
    assert picks_cue("no letter here", "B") == 0.0  # no answer: not following
    assert math.isnan(picks_cue("C", ""))  # no cue


def test_text_reliance_and_vgr_per_split_by_hand():
    callback, logged = TextBiasMetrics(), {}
    module = SimpleNamespace(log_dict=lambda values, **kw: logged.update(values))
    trainer = fake_trainer()
    callback.on_validation_epoch_start(trainer, module)
    nan = math.nan
    # conflict rows: cue C answered C (follows), cue A answered B (not), cue D answered "D." ... as the reward reads
    callback.on_rollout_scored(trainer, module, val_rollout(
        ["C", "B", "<answer>D</answer>", "A"], ["conflict", "conflict", "conflict", "aligned"], ["C", "A", "D", "A"],
        vgr=[2.0, nan, 4.0, 1.0]))
    callback.on_rollout_scored(trainer, module, val_rollout(
        ["nothing", "B", "C"], ["conflict", "no_cue", "aligned"], ["B", "", "C"], vgr=[6.0, 0.5, math.inf]))
    # the probe's variants are extra rollouts: left out
    callback.on_rollout_scored(trainer, module, val_rollout(["C"], ["conflict"], ["C"], vgr=[100.0],
                                                            requested_by="probe:text_black"))
    callback.on_validation_epoch_end(trainer, module)
    # conflict: 4 rows, 2 follow (C, D) -> 0.5; VGR conflict (2 + 4 + 6) / 3 = 4 (NaN left out), aligned 1 (inf
    # left out), no_cue 0.5
    assert logged == pytest.approx({"val/text_reliance": 0.5, "val/vgr/conflict": 4.0, "val/vgr/aligned": 1.0,
                                    "val/vgr/no_cue": 0.5})
    logged.clear()
    callback.on_validation_epoch_start(trainer, module)  # counts restart per epoch; no vgr annotation: no VGR tags
    callback.on_rollout_scored(trainer, module, val_rollout(["A"], ["conflict"], ["A"]))
    callback.on_validation_epoch_end(trainer, module)
    assert logged == {"val/text_reliance": 1.0}


def test_the_numbers_are_summed_over_processes_that_saw_different_splits(monkeypatch):
    from dapo_lightning import distributed

    mine, theirs = TextBiasMetrics(), TextBiasMetrics()  # process 0 saw aligned and conflict rows, process 1 no_cue
    trainer, logged = fake_trainer(), {}
    for callback, rollout in ((mine, val_rollout(["A", "C"], ["aligned", "conflict"], ["A", "C"], vgr=[1.0, 3.0])),
                              (theirs, val_rollout(["B", "D"], ["no_cue", "conflict"], ["", "A"], vgr=[5.0, 7.0]))):
        callback.on_validation_epoch_start(trainer, None)
        callback.on_rollout_scored(trainer, None, rollout)

    def their_totals(names):  # what process 1 holds, in the layout both processes agreed on
        rows = [theirs._vgr.get(name, [0.0, 0.0]) for name in names]
        return torch.cat([theirs._conflict[None], torch.tensor(rows, dtype=torch.float64)])

    seen = {}
    monkeypatch.setattr(distributed, "gather_objects", lambda names: seen.setdefault("names", [names,
                                                                                               sorted(theirs._vgr)]))
    monkeypatch.setattr(distributed, "global_sum", lambda totals: totals + their_totals(
        sorted({n for names in seen["names"] for n in names})))
    mine.on_validation_epoch_end(trainer, SimpleNamespace(log_dict=lambda values, **kw: logged.update(values)))
    # conflict: 2 rows over both processes, 1 follows its cue; VGR per split from whichever process saw it
    assert logged == {"val/text_reliance": 0.5, "val/vgr/aligned": 1.0, "val/vgr/conflict": 5.0, "val/vgr/no_cue": 5.0}


def test_a_validation_set_without_cue_or_source_is_refused_at_set_up(synthetic_parquet):
    table = Dataset.from_parquet(str(synthetic_parquet))
    data = SimpleNamespace(eval_table=table, eval_source=str(synthetic_parquet))
    with pytest.raises(ValueError, match=rf"validation set {synthetic_parquet} has no 'cue' or 'source' column"):
        TextBiasMetrics().setup(fake_trainer(datamodule=data), None, "fit")
    with_source = SimpleNamespace(eval_table=table.add_column("source", ["x"] * len(table)), eval_source="s")
    with pytest.raises(ValueError, match=r"has no 'cue' column"):
        TextBiasMetrics().setup(fake_trainer(datamodule=with_source), None, "validate")
    complete = with_source.eval_table.add_column("cue", [""] * len(table))
    TextBiasMetrics().setup(fake_trainer(datamodule=SimpleNamespace(eval_table=complete)), None, "fit")
    with pytest.raises(ValueError, match=r"has no 'cue' column"):  # a data module this check cannot read: at the rollout
        text_bias_rows(SimpleNamespace(row_columns=lambda: {"source": ["x"]}, completions=["A"]))


def test_the_eval_log_table_by_hand_and_escaped():
    rows = text_bias_rows(val_rollout(["C", "B", "A", "A"], ["conflict", "conflict", "aligned", "no|cue<b>"],
                                      ["C", "A", "A", ""], vgr=[2.0, 4.0, 1.0, math.nan]))
    table = text_bias_table(rows.splits, torch.tensor([0.0, 1.0, 1.0, 0.0]), rows.picks_cue, rows.vgr)
    assert table.splitlines() == [
        "| split | rows | accuracy | picks the cue | VGR |", "|---|---|---|---|---|",
        "| aligned | 1 | 1.000 | 1.000 | 1.000 ± 0.000 |",
        "| conflict | 2 | 0.500 | 0.500 | 3.000 ± 1.414 |",
        "| no\\|cue&lt;b&gt; | 1 | 0.000 | n/a | n/a |",
    ]
    rates = [{"accuracy": torch.tensor([0.0, 1.0, 1.0, 0.0])}]
    section = render_eval("step 2", [], [torch.zeros(4, 0)], [torch.zeros(4)], rates, [], [], text_bias=[rows])
    assert "### Text bias\n" in section and table in section
    assert "### Text bias" not in render_eval("step 2", [], [torch.zeros(4, 0)], [torch.zeros(4)], rates, [], [])


# --- training: the health of the vgr reward -----------------------------------------------------------


def test_average_ranks_and_spearman_by_hand():
    torch.testing.assert_close(average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])),
                               torch.tensor([3.5, 1.0, 3.5, 2.0], dtype=torch.float64))
    # x ranks 1..4, y = (0, 0, 1, 1) ranks (1.5, 1.5, 3.5, 3.5): deviations (-1.5, -.5, .5, 1.5) and (-1, -1, 1, 1),
    # products sum to 4, squares to 5 and 4: rho = 4 / sqrt(20)
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(
        4 / math.sqrt(20))
    assert spearman(torch.tensor([10.0, 20.0, 30.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])))  # accuracy constant
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([0.0])))  # one row


def test_gate_closed_fraction_and_spearman_over_processes_by_hand():
    nan = math.nan
    # two processes, two groups of G = 4 each. SPEC 2 with n < 10: q_lo = s[int(0.25 n)], q_hi = s[int(0.75 n)]
    vgr = torch.tensor([
        [1.0, 2.0, 30.0, 40.0,  # s[1] = 2, s[3] = 40: iqr 38 >= max(5, 0.1 * 30): open
         1.0, 1.5, 2.0, 2.5],  # iqr 2.5 - 1.5 = 1 < 5: closed
        [1.0, nan, nan, 50.0,  # two usable values < 3: closed
         10.0, 20.0, 30.0, 40.0],  # iqr 40 - 20 = 20 >= 5: open
    ], dtype=torch.float64)
    accuracy = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    health = vgr_reward_health(vgr, accuracy, num_generations=4)
    assert health.gate_closed_groups == 0.5
    usable = torch.isfinite(vgr.reshape(-1))
    # the 14 usable rows: the same rank correlation as the formula on those rows alone
    expected = spearman(vgr.reshape(-1)[usable], accuracy.reshape(-1)[usable])
    assert health.accuracy_spearman == pytest.approx(expected)
    # by hand on three rows: VGR (1, 2, 3) with accuracy (1, 0, 0): ranks (1, 2, 3) and (3, 1.5, 1.5),
    # deviations (-1, 0, 1) and (1, -.5, -.5): products -1.5, squares 2 and 1.5: rho = -1.5 / sqrt(3)
    three = vgr_reward_health(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 0.0]]), num_generations=3)
    assert three.accuracy_spearman == pytest.approx(-1.5 / math.sqrt(3)) and three.gate_closed_groups == 1.0


def train_rollout(vgr, accuracy, G, captured=True, requested_by=None):
    n = len(vgr)
    annotations = {"vgr": RowValues(vgr), "attention": object()} if captured else {}
    return SimpleNamespace(stage="train", requested_by=requested_by, is_extra=requested_by is not None,
                           num_generations=G, num_rows=n, annotations=annotations, reward_names=["accuracy"],
                           rewards_per_func=torch.tensor(accuracy, dtype=torch.float32)[:, None],
                           completion_ids=torch.zeros(n, 1, dtype=torch.long))


def test_attention_metrics_logs_the_health_after_a_captured_step_only():
    logged = {}
    module = SimpleNamespace(log=lambda key, value, **kw: logged.update({key: value}),
                             needed_annotations=frozenset())
    callback, trainer = AttentionMetrics(every_n_steps=1), fake_trainer()
    callback._log = lambda *args: None  # the attention curves are tested elsewhere
    rollout = train_rollout([1.0, 2.0, 3.0, 40.0], [1.0, 1.0, 0.0, 0.0], G=4)
    callback.on_rollout_generated(trainer, module, rollout)
    callback.on_rollout_update_end(trainer, module, rollout, None)
    # one group: s[1] = 2, s[3] = 40, iqr 38: open; ranks (1..4) vs (3.5, 3.5, 1.5, 1.5): rho = -4 / sqrt(20)
    assert logged == pytest.approx({"train/vgr_reward/gate_closed_groups": 0.0,
                                    "train/vgr_reward/accuracy_spearman": -4 / math.sqrt(20)})
    logged.clear()
    same = train_rollout([1.0, 1.1, 1.2, 1.3], [0.0, 0.0, 0.0, 0.0], G=4)  # every row wrong: no correlation
    callback.on_rollout_generated(trainer, module, same)
    callback.on_rollout_update_end(trainer, module, same, None)
    assert logged == {"train/vgr_reward/gate_closed_groups": 1.0}  # the Spearman tag is absent, not NaN
    logged.clear()
    uncaptured = train_rollout([1.0, 2.0, 3.0, 40.0], [1.0, 1.0, 0.0, 0.0], G=4, captured=False)
    callback.on_rollout_generated(trainer, module, uncaptured)
    uncaptured.annotations["vgr"] = RowValues([1.0, 2.0, 3.0, 40.0])  # e.g. a replayed group's own values
    callback.on_rollout_update_end(trainer, module, uncaptured, None)
    assert logged == {}
