"""Fixture files in the hubs' real schemas, and readers for what the converters write.

The schemas are built with ``datasets.Features`` exactly as the hub dataset cards
declare them, so a fixture parquet has the arrow types (``struct<bytes, path>``
images, ``list<string>`` choices, ``int8`` indices, ...) and the ``huggingface``
metadata that the hub's own parquet files carry.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image as ImageFeature, List, Value
from PIL import Image

# HuggingFaceM4/A-OKVQA
AOKVQA_FEATURES = Features(
    {
        "image": ImageFeature(),
        "question_id": Value("string"),
        "question": Value("string"),
        "choices": List(Value("string")),
        "correct_choice_idx": Value("int8"),
        "direct_answers": List(Value("string")),
        "difficult_direct_answer": Value("bool"),
        "rationales": List(Value("string")),
    }
)
# MMMU/MMMU_Pro, configs "standard (4 options)" and "standard (10 options)"
MMMU_PRO_FEATURES = Features(
    {
        "id": Value("string"),
        "question": Value("string"),
        "options": Value("string"),
        "explanation": Value("string"),
        **{f"image_{k}": ImageFeature() for k in range(1, 8)},
        "img_type": Value("string"),
        "answer": Value("string"),
        "topic_difficulty": Value("string"),
        "subject": Value("string"),
    }
)
# openbmb/VisRAG-Ret-Test-ArxivQA, configs corpus / queries / qrels
ARXIVQA_CORPUS_FEATURES = Features({"corpus-id": Value("string"), "image": ImageFeature()})
ARXIVQA_QUERIES_FEATURES = Features(
    {"query-id": Value("string"), "query": Value("string"), "answer": Value("string"), "options": List(Value("string"))}
)
ARXIVQA_QRELS_FEATURES = Features({"query-id": Value("string"), "corpus-id": Value("string"), "score": Value("int64")})


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int], colour: tuple[int, int, int] = (30, 30, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_cell(data: bytes | None, path: str | None = None) -> dict[str, Any] | None:
    return None if data is None and path is None else {"bytes": data, "path": path}


def write_parquet(
    path: Path, rows: list[dict[str, Any]], features: Features, row_group_size: int | None = None
) -> Path:
    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def decoded(value: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(value["bytes"]))
    image.load()
    return image
