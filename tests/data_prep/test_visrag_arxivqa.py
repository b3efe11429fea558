"""python -m dapo_lightning.data_prep visrag-arxivqa: the corpus/queries/qrels join, prefix stripping, answer mapping, drops."""

from __future__ import annotations

import datasets
import pytest
from datasets import Dataset

from dapo_lightning.data_prep import sources
from dapo_lightning.data_prep.pipeline import Drop
from dapo_lightning.data_prep.visrag_arxivqa import answer_letter, strip_option_prefix
from dp_helpers import (
    ARXIVQA_CORPUS_FEATURES,
    ARXIVQA_QRELS_FEATURES,
    ARXIVQA_QUERIES_FEATURES,
    jpeg,
    png,
    read_rows,
    write_parquet,
)

RED, GREEN, BLUE = png((6, 4), (255, 0, 0)), png((3, 7), (0, 255, 0)), png((5, 5), (0, 0, 255))
CORPUS = [
    {"corpus-id": "c0", "image": {"bytes": RED, "path": None}},
    {"corpus-id": "c1", "image": {"bytes": GREEN, "path": "c1.png"}},
    {"corpus-id": "c2", "image": {"bytes": BLUE, "path": None}},
    {"corpus-id": "c3", "image": {"bytes": RED[:25], "path": None}},
    {"corpus-id": "c1", "image": {"bytes": jpeg((9, 9)), "path": None}},  # repeated id: the first one wins
    {"corpus-id": "c9", "image": {"bytes": BLUE, "path": None}},  # no query needs it
]
QUERIES = [
    {
        "query-id": "q0",
        "query": "What does the plot show?",
        "answer": "A",
        "options": ["A) growth", "B) decline", "C) flat", "D) noise"],
    },
    {"query-id": "q1", "query": "Which value?", "answer": "1.5", "options": ["A. 0.5", "B. 1.5", "C. 2.5"]},
    {"query-id": "q2", "query": "Which letter?", "answer": "gamma", "options": ["alpha", "beta", "gamma"]},
    {"query-id": "q3", "query": "No qrel?", "answer": "A", "options": ["x", "y"]},
    {"query-id": "q4", "query": "Zero score?", "answer": "A", "options": ["x", "y"]},
    {"query-id": "q5", "query": "Two pictures?", "answer": "A", "options": ["x", "y"]},
    {"query-id": "q6", "query": "Unknown answer?", "answer": "delta", "options": ["alpha", "beta"]},
    {"query-id": "q7", "query": "Image not in corpus?", "answer": "A", "options": ["x", "y"]},
    {"query-id": "q8", "query": "Broken image?", "answer": "A", "options": ["x", "y"]},
    {"query-id": "q9", "query": "Side?", "answer": "(B)", "options": ["(A) left", "(B) right"]},
    {"query-id": "q10", "query": "No options?", "answer": "A", "options": []},
    {"query-id": "q11", "query": "Trend?", "answer": "B) decline", "options": ["A) growth", "B) decline"]},
]
QRELS = [
    {"query-id": "q0", "corpus-id": "c1", "score": 1},
    {"query-id": "q1", "corpus-id": "c0", "score": 1},
    {"query-id": "q2", "corpus-id": "c0", "score": 1},
    {"query-id": "q4", "corpus-id": "c2", "score": 0},
    {"query-id": "q5", "corpus-id": "c1", "score": 1},
    {"query-id": "q5", "corpus-id": "c2", "score": 1},
    {"query-id": "q6", "corpus-id": "c2", "score": 1},
    {"query-id": "q7", "corpus-id": "c404", "score": 1},
    {"query-id": "q8", "corpus-id": "c3", "score": 1},
    {"query-id": "q9", "corpus-id": "c2", "score": 1},
    {"query-id": "q10", "corpus-id": "c2", "score": 1},
    {"query-id": "q11", "corpus-id": "c1", "score": 1},
    {"query-id": "q11", "corpus-id": "c1", "score": 1},  # the same positive twice is still one image
]
# Corpus order: c0 (q1, q2), c1 (q0, q11), c2 (q9).
EXPECTED = [
    ({"bytes": RED, "path": None}, "Which value?\nA: 0.5\nB: 1.5\nC: 2.5", "B"),
    ({"bytes": RED, "path": None}, "Which letter?\nA: alpha\nB: beta\nC: gamma", "C"),
    ({"bytes": GREEN, "path": "c1.png"}, "What does the plot show?\nA: growth\nB: decline\nC: flat\nD: noise", "A"),
    ({"bytes": GREEN, "path": "c1.png"}, "Trend?\nA: growth\nB: decline", "B"),
    ({"bytes": BLUE, "path": None}, "Side?\nA: left\nB: right", "B"),
]


@pytest.fixture
def configs(tmp_path):
    """The three configs as the hub serves them; the corpus in two shards."""
    return {
        "corpus": [
            write_parquet(tmp_path / "corpus-00000-of-00002.parquet", CORPUS[:3], ARXIVQA_CORPUS_FEATURES),
            write_parquet(tmp_path / "corpus-00001-of-00002.parquet", CORPUS[3:], ARXIVQA_CORPUS_FEATURES),
        ],
        "queries": [write_parquet(tmp_path / "queries.parquet", QUERIES, ARXIVQA_QUERIES_FEATURES)],
        "qrels": [write_parquet(tmp_path / "qrels.parquet", QRELS, ARXIVQA_QRELS_FEATURES)],
    }


def _argv(configs):
    return ["--corpus", *configs["corpus"], "--queries", *configs["queries"], "--qrels", *configs["qrels"]]


def test_join_exact_rows_and_drop_reasons(cli, configs, tmp_path):
    out = tmp_path / "arxivqa.parquet"
    code, stdout, stderr = cli("visrag-arxivqa", *_argv(configs), "--out", out, "--batch-size", "2")
    assert code == 0, stderr
    assert [(r["image"], r["problem"], r["solution"]) for r in read_rows(out)] == EXPECTED

    queries = configs["queries"][0]
    lines = stdout.splitlines()
    assert lines[0] == "visrag-arxivqa: read 12 rows, kept 5, dropped 7"
    assert [line for line in lines if line.startswith("  dropped")] == [
        "  dropped 1: missing image",
        "  dropped 1: unreadable image",
        "  dropped 2: no positive",
        "  dropped 1: several positive images",
        "  dropped 1: unparsable options",
        "  dropped 1: answer not among options",
    ]
    assert f"    e.g. {queries} row 3: query-id 'q3' has no qrel with score > 0" in lines
    assert f"    e.g. {queries} row 4: query-id 'q4' has no qrel with score > 0" in lines
    assert f"    e.g. {queries} row 5: query-id 'q5': c1, c2" in lines
    assert f"    e.g. {queries} row 6: query-id 'q6': answer 'delta' matches no option" in lines
    assert f"    e.g. {queries} row 7: corpus-id 'c404' is not in the corpus" in lines
    assert f"    e.g. {queries} row 10: query-id 'q10': options is list [], not a non-empty list" in lines
    assert any(line.startswith(f"    e.g. {queries} row 8: image cannot be decoded") for line in lines)
    assert lines[-1] == f"wrote 5 rows to {out}"


def test_hub_configs_are_joined_the_same_way(cli, monkeypatch, tmp_path):
    """--hub NAME loads configs corpus, queries and qrels of one split (load_dataset replaced: no network)."""
    tables = {
        "corpus": (CORPUS, ARXIVQA_CORPUS_FEATURES),
        "queries": (QUERIES, ARXIVQA_QUERIES_FEATURES),
        "qrels": (QRELS, ARXIVQA_QRELS_FEATURES),
    }
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        rows, features = tables[config]
        return Dataset.from_list(rows, features=features).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources._hub_dataset.cache_clear()
    out = tmp_path / "hub.parquet"
    code, stdout, stderr = cli("visrag-arxivqa", "--hub", "openbmb/VisRAG-Ret-Test-ArxivQA", "--out", out)
    sources._hub_dataset.cache_clear()
    assert code == 0, stderr
    assert [(r["image"], r["problem"], r["solution"]) for r in read_rows(out)] == EXPECTED
    assert sorted(set(calls)) == [
        ("openbmb/VisRAG-Ret-Test-ArxivQA", c, "train", True) for c in ("corpus", "qrels", "queries")
    ]


def test_schema_error_names_the_config_file_and_fields(cli, configs, tmp_path):
    swapped = dict(configs, queries=configs["qrels"])
    code, _, stderr = cli("visrag-arxivqa", *_argv(swapped), "--out", tmp_path / "x.parquet")
    assert code == 2
    assert stderr == (
        f"error: {configs['qrels'][0]}: not a recognised VisRAG ArxivQA queries file: missing fields query, answer, options"
        " (found: query-id, corpus-id, score)\n"
    )


def test_local_inputs_need_all_three_configs(cli, configs, tmp_path):
    code, _, stderr = cli("visrag-arxivqa", "--corpus", *configs["corpus"], "--out", tmp_path / "x.parquet")
    assert code == 2
    assert "missing --queries, --qrels (or give --hub NAME)" in stderr


@pytest.mark.parametrize(
    ("option", "letter", "expected"),
    [
        ("A) growth", "A", "growth"),
        ("B. 1.5", "B", "1.5"),
        ("(C) flat", "C", "flat"),
        ("D: noise", "D", "noise"),
        ("B) wrong letter", "A", "B) wrong letter"),  # only the option's own letter is a prefix
        ("A.5 metres", "A", "A.5 metres"),  # "A." without a space is part of the text
        ("  plain  ", "A", "plain"),
    ],
)
def test_strip_option_prefix(option, letter, expected):
    assert strip_option_prefix(option, letter) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("B", "B"), ("(B)", "B"), ("B)", "B"), ("B.", "B"), ("B) beta", "B"), ("  Gamma ", "C"), ("beta", "B")],
)
def test_answer_letter(answer, expected):
    assert answer_letter(answer, ["alpha", "beta", "gamma"]) == expected


@pytest.mark.parametrize(
    ("answer", "options", "detail"),
    [
        ("D", ["x", "y", "z"], "answer 'D' but only 3 options"),
        ("same", ["same", "same"], "answer 'same' matches 2 options"),
        (None, ["x"], "answer '' matches no option"),
    ],
)
def test_answer_letter_refuses(answer, options, detail):
    with pytest.raises(Drop) as caught:
        answer_letter(answer, options)
    assert (caught.value.reason, caught.value.detail) == ("answer not among options", detail)
