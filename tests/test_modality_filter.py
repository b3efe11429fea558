"""``data_prep modality-filter``: rows kept and dropped by what a model of known behaviour answers, the report, errors.

The model: the offline tiny Qwen2.5-VL, fitted (supervised, about 15 s on one thread) on eight synthetic
colour pictures to answer, with the letter and ``<|im_end|>``:

- the colour question with its picture: the picture's colour (A red, B green, C blue, D yellow);
- the colour question with a black picture of the same size: B, whatever the question's picture was;
- the neutral question (``ModalityProbe``'s, options kept) with the picture: D, whatever its colour.

So before the command runs, each row's fate follows from its picture and its solution
(:data:`EXPECTED`): right with image and text only when the solution is the picture's colour, answerable
with a black picture when that colour is B (green), without the question when it is D (yellow). The demo
config's DAPO-trained model cannot serve here: it answers from the picture alone (the neutral question
gets the same answer as the real one on every row), so it would never keep a row.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dapo_lightning.callbacks.modality_probe import blank_image, neutral_problem
from dapo_lightning.data.collate import example_prompt_batch
from dapo_lightning.data_prep import modality_filter
from dapo_lightning.data_prep.io import mcq_arrow_schema
from dapo_lightning.data_prep.modality_filter import (IMAGE_ALONE_RIGHT, IMAGE_TEXT_WRONG, KEPT, REASONS,
                                                      TEXT_ALONE_RIGHT, UNUSABLE, main, reason_for)
from dapo_lightning.data_prep.synthetic import SyntheticConfig, generate_rows

BLACK_ANSWER, NEUTRAL_ANSWER = "B", "D"  # what the model is fitted to answer in text_black and image_only
COLOUR_LETTER = {"red": "A", "green": "B", "blue": "C", "yellow": "D"}  # the synthetic colour question's options
DAMAGED = b"\x89PNG\r\n\x1a\n cut short"
# (picture, solution, expected reason), row by row; the model's answers make each reason (module docstring)
EXPECTED = [
    ("red", "A", KEPT),                   # image_text A right; text_black B, image_only D wrong
    ("green", "B", TEXT_ALONE_RIGHT),     # right, but a black picture gets B too
    ("yellow", "D", IMAGE_ALONE_RIGHT),   # right, but the neutral question gets D too
    ("blue", "C", KEPT),
    ("red", "C", IMAGE_TEXT_WRONG),       # the model says A
    (DAMAGED, "A", UNUSABLE),             # the picture does not decode
    ("blue", " c ", KEPT),                # a solution is read as the data module reads it: stripped, upper-cased
    ("green", "E", UNUSABLE),             # E is not among the options A-D
    ("red", "A", KEPT),
]
FILTER = ["--no-system-prompt", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]  # demo's prompt


def test_a_row_is_kept_only_when_image_and_text_alone_answer_it():
    # (image_text, text_black, image_only) right?  The first failing condition names the reason.
    assert reason_for({"image_text": True, "text_black": False, "image_only": False}) == KEPT
    assert reason_for({"image_text": False, "text_black": True, "image_only": True}) == IMAGE_TEXT_WRONG
    assert reason_for({"image_text": False, "text_black": False, "image_only": False}) == IMAGE_TEXT_WRONG
    assert reason_for({"image_text": True, "text_black": True, "image_only": True}) == TEXT_ALONE_RIGHT
    assert reason_for({"image_text": True, "text_black": True, "image_only": False}) == TEXT_ALONE_RIGHT
    assert reason_for({"image_text": True, "text_black": False, "image_only": True}) == IMAGE_ALONE_RIGHT


# --- the model and the file --------------------------------------------------------------------------------------


def pictures() -> dict[str, list[dict]]:
    """Two synthetic colour questions per colour, by colour."""
    by_colour: dict[str, list[dict]] = {colour: [] for colour in COLOUR_LETTER}
    letter_colour = {letter: colour for colour, letter in COLOUR_LETTER.items()}
    for row in generate_rows(SyntheticConfig(rows=24, seed=0, image_size=56, question_types=("colour",))):
        by_colour[letter_colour[row["solution"]]].append(row)
    assert all(len(rows) >= 2 for rows in by_colour.values()), {c: len(r) for c, r in by_colour.items()}
    return {colour: rows[:2] for colour, rows in by_colour.items()}


def fit_answers(folder, examples: list[tuple[dict, str]], steps: int = 80) -> None:
    """Fit the model in ``folder`` to answer each (row, letter) with the letter, then ``<|im_end|>``; save it there.

    The prompts are encoded by the data module's collator (as the command encodes them), the answer's two
    tokens appended; the loss is the cross-entropy of those two tokens.
    """
    from dapo_lightning.models import load_policy, load_processor

    torch.manual_seed(0)
    model, processor = load_policy(str(folder)), load_processor(str(folder))
    tokenizer = processor.tokenizer
    inputs = example_prompt_batch(processor, [row for row, _ in examples], system_prompt=None).model_inputs()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = torch.tensor([[tokenizer.convert_tokens_to_ids(letter), end] for _, letter in examples])  # [n, 2]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answers], 1)  # [n, P + 2]
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answers)], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answers)], 1)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = answers
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the fit did not converge: loss {loss.item():.3f}"
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory):
    """The tiny model fitted as the module docstring says; its folder and the pictures it was fitted on."""
    from dapo_lightning.data_prep.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("models") / "answering", size="tiny", seed=0)
    by_colour = pictures()
    examples = []
    for row in (row for rows in by_colour.values() for row in rows):
        size = Image.open(io.BytesIO(row["image"]["bytes"])).size
        examples += [(row, row["solution"]), ({**row, "image": blank_image(size, "black")}, BLACK_ANSWER),
                     ({**row, "problem": neutral_problem(row["problem"])}, NEUTRAL_ANSWER)]
    fit_answers(folder, examples)
    return folder, by_colour


def write_rows(path, by_colour, expected=EXPECTED):
    """The rows of ``expected`` (a colour: one of its pictures, in turn), with a ``source`` and an ``id`` column."""
    used = dict.fromkeys(by_colour, 0)
    rows = []
    for number, (picture, solution, _) in enumerate(expected):
        if isinstance(picture, bytes):
            image, problem = {"bytes": picture, "path": "damaged.png"}, by_colour["red"][0]["problem"]
        else:
            source = by_colour[picture][used[picture] % 2]
            used[picture] += 1
            image, problem = source["image"], source["problem"]
        rows.append({"image": image, "problem": problem, "solution": solution, "source": "synthetic", "id": number})
    schema = mcq_arrow_schema(source_column=True).append(pa.field("id", pa.int64()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=4)
    return path


def run(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- the filter ------------------------------------------------------------------------------------------------


def test_keeps_the_rows_only_image_and_text_answer_and_reports_the_others(answering_model, tmp_path, capsys):
    folder, by_colour = answering_model
    source, out = write_rows(tmp_path / "in.parquet", by_colour), tmp_path / "out.parquet"
    code, stdout, stderr = run([source, "--model", folder, "--out", out, "--batch-size", 3, *FILTER], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "out.report.json").read_text())
    reasons = {row: KEPT for row in report["kept_rows"]} | {d["row"]: d["reason"] for d in report["dropped"]}
    assert [reasons[row] for row in range(len(EXPECTED))] == [reason for _, _, reason in EXPECTED]
    assert report["rows"] == len(EXPECTED) and sum(report["counts"].values()) == len(EXPECTED)
    assert report["counts"] == {KEPT: 4, IMAGE_TEXT_WRONG: 1, TEXT_ALONE_RIGHT: 1, IMAGE_ALONE_RIGHT: 1, UNUSABLE: 2}
    assert list(report["counts"]) == list(REASONS)
    dropped = {d["row"]: d for d in report["dropped"]}
    # the three answers, as fitted: the picture's colour, B with a black picture, D without the question
    assert dropped[1]["answers"] == {"image_text": "B", "text_black": "B", "image_only": "D"}
    assert dropped[2] == {"row": 2, "reason": IMAGE_ALONE_RIGHT, "solution": "D",
                          "answers": {"image_text": "D", "text_black": "B", "image_only": "D"}}
    assert dropped[4]["answers"] == {"image_text": "A", "text_black": "B", "image_only": "D"}
    assert dropped[5]["detail"].startswith(f"{source}: row 5: image cannot be decoded")
    assert dropped[7]["detail"] == f"{source}: row 7: solution 'E' is not among the options ABCD"
    assert "answers" not in dropped[5] and "solution" not in dropped[5]
    # the kept rows, byte for byte: every column (image bytes, source, id), the input's schema and metadata
    kept = pq.read_table(out)
    assert kept.equals(pq.read_table(source).take(report["kept_rows"]))
    assert kept.schema.equals(pq.read_schema(source), check_metadata=True)
    assert kept.column("id").to_pylist() == [0, 3, 6, 8]
    assert report["output"] == str(out) and report["settings"]["system_prompt"] is None
    assert "| kept | 4 | 44.4% |" in stdout and "| unusable | 2 | 22.2% |" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet", "out.report.json"]


def test_batches_and_limits_change_no_verdict(answering_model, tmp_path, capsys):
    folder, by_colour = answering_model
    source = write_rows(tmp_path / "in.parquet", by_colour)
    reports = {}
    for name, extra in {"one": ["--batch-size", 1], "all": ["--batch-size", 16], "first 4": ["--limit", 4]}.items():
        report = tmp_path / f"{name}.json"
        code, _, stderr = run([source, "--model", folder, "--out", tmp_path / f"{name}.parquet", "--report", report,
                               *extra, *FILTER], capsys)
        assert code == 0, stderr
        reports[name] = json.loads(report.read_text())
    verdicts = {name: {d["row"]: (d["reason"], d.get("answers")) for d in report["dropped"]}  # (a decoder's message
                for name, report in reports.items()}                                        # names an object id)
    assert verdicts["one"] == verdicts["all"] and reports["one"]["kept_rows"] == reports["all"]["kept_rows"] == [0, 3, 6, 8]
    assert reports["first 4"]["rows"] == 4 and reports["first 4"]["kept_rows"] == [0, 3]
    assert verdicts["first 4"] == {row: verdict for row, verdict in verdicts["all"].items() if row < 4}
    assert pq.read_table(tmp_path / "first 4.parquet").column("id").to_pylist() == [0, 3]


def test_when_no_row_is_kept_nothing_is_written_but_the_report(answering_model, tmp_path, capsys):
    folder, by_colour = answering_model
    dropped_only = [row for row in EXPECTED if row[2] != KEPT]
    source = write_rows(tmp_path / "in.parquet", by_colour, dropped_only)
    code, stdout, stderr = run([source, "--model", folder, "--out", tmp_path / "out.parquet", *FILTER], capsys)
    assert code == 2 and "no row is answered by image and text alone together; nothing written" in stderr
    assert not (tmp_path / "out.parquet").exists()
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["output"] is None and report["counts"][KEPT] == 0 and report["rows"] == len(dropped_only) == 5
    assert "| kept | 0 | 0.0% |" in stdout


def test_a_run_that_fails_midway_leaves_the_output_as_it_was(answering_model, tmp_path, capsys, monkeypatch):
    folder, by_colour = answering_model
    source, out = write_rows(tmp_path / "in.parquet", by_colour), tmp_path / "out.parquet"
    out.write_bytes(b"the previous file")
    answer, calls = modality_filter.ThreeWayAnswerer.answer, []

    def fails_in_the_second_batch(self, prompts):
        calls.append(len(prompts))
        if len(calls) == 4:  # three variants per batch: the first batch (two rows kept) is in the file by now
            raise RuntimeError("the device fell over")
        return answer(self, prompts)

    monkeypatch.setattr(modality_filter.ThreeWayAnswerer, "answer", fails_in_the_second_batch)
    with pytest.raises(RuntimeError, match="the device fell over"):
        main([str(source), "--model", str(folder), "--out", str(out), "--batch-size", "4", *FILTER])
    assert calls == [4, 4, 4, 2]  # rows 4-7 less the two unusable ones
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.parquet"]  # no temporary file, no report


# --- bad input -------------------------------------------------------------------------------------------------


def test_a_missing_file_is_a_usage_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "absent.parquet"), "--model", "unused", "--out", str(tmp_path / "out.parquet")])
    assert exit_.value.code == 2
    assert f"{tmp_path / 'absent.parquet'}: no such file" in capsys.readouterr().err


def test_a_file_without_a_solution_column_is_an_error_naming_the_file_and_column(tmp_path, capsys):
    source = tmp_path / "no_solution.parquet"
    pq.write_table(pa.table({"image": [b"x"], "problem": ["Q?\nA: a\nB: b"]}), source)
    code, _, stderr = run([source, "--model", "unused", "--out", tmp_path / "out.parquet"], capsys)
    assert code == 2 and f"error: {source}: not a DDM file: missing fields solution" in stderr
    assert not (tmp_path / "out.parquet").exists()


def test_a_model_that_cannot_be_loaded_is_an_error_naming_it(tmp_path, capsys, synthetic_parquet):
    missing = tmp_path / "no-model"
    code, _, stderr = run([synthetic_parquet, "--model", missing, "--out", tmp_path / "out.parquet",
                           "--device", "cpu"], capsys)
    assert code == 2 and f"error: --model {missing}: cannot load it (OSError" in stderr
    assert not (tmp_path / "out.parquet").exists()
