"""What both systems of ``peer_trl`` train on: the benchmark shapes, their offline models and their data.

Everything is built offline into the benchmark's cache folder, through the
project's own builders (``dapo_lightning.data_prep.tiny_model``, ``dapo_lightning.data_prep.synthetic``), so the
two systems load the same checkpoint folder with the same ``from_pretrained``
calls and see the same questions in the same order.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    """One benchmark configuration: which model, how many image tokens, how long the prompt is."""

    name: str
    arch: str  # "small": dapo_lightning.data_prep.tiny_model's small size; "3b": Qwen2.5-VL-3B's shape, random weights
    image_side: int  # square pixel budget: (image_side / 28) ** 2 image tokens per image
    prompt_tokens: int | None  # cut the system prompt (whole words) so the longest prompt has at most this many tokens
    description: str

    @property
    def image_tokens(self) -> int:
        return (self.image_side // 28) ** 2


SHAPES = {
    # issue 6's measured shape: hidden 256, 4 layers, 64 image tokens, prompt 145 tokens
    "small": Shape("small", "small", 224, 145, "small model, 64 image tokens, prompt ~145 tokens"),
    # long prompt: one 616 x 616 image = 22 x 22 = 484 image tokens, plus the full SPEC system prompt
    "long": Shape("long", "small", 616, None, "small model, 484 image tokens, prompt ~620 tokens"),
    # GPU: a random model of Qwen2.5-VL-3B's shape, 256 image tokens, the full SPEC system prompt
    "3b": Shape("3b", "3b", 448, None, "Qwen2.5-VL-3B shape (random weights), 256 image tokens"),
}

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (architecture only; the weights here are random).
QWEN25_VL_3B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_3B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
}


def model_folder(cache: Path, shape: Shape, dtype: str) -> Path:
    """The checkpoint folder of ``shape`` (built on first use; rebuilt when the recorded recipe differs)."""
    recipe = {"arch": shape.arch, "image_side": shape.image_side, "dtype": dtype, "seed": 0, "version": 1}
    out = cache / "models" / f"{shape.arch}-{shape.image_side}-{dtype}"
    marker = out / "bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return out
    shutil.rmtree(out, ignore_errors=True)
    if shape.arch == "small":
        _build_small(out, shape.image_side)
    elif shape.arch == "3b":
        _build_3b(out, shape.image_side, dtype)
    else:
        raise ValueError(f"shape {shape.name}: unknown arch {shape.arch!r}")
    marker.write_text(json.dumps(recipe, indent=2))
    return out


def _build_small(out: Path, image_side: int) -> None:
    """``dapo_lightning.data_prep.tiny_model``'s small model (with the system prompt's words), its pixel budget set to ``image_side``."""
    from dapo_lightning.data_prep.tiny_model import SIZES, build_image_processor, build_tiny_model

    from dapo_lightning.models import load_processor

    build_tiny_model(out, size="small", seed=0, system_prompt_words=True)
    if image_side != SIZES["small"].image_side:  # same weights: the pixel budget only changes the processor
        processor = load_processor(str(out))
        processor.image_processor = build_image_processor(replace(SIZES["small"], image_side=image_side))
        processor.save_pretrained(out)


def qwen25_vl_3b_config(tokenizer):
    """Qwen2.5-VL-3B's architecture with the offline tokenizer's special-token ids (the vocabulary stays 151936)."""
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("start", "<|vision_start|>"),
        ("end", "<|vision_end|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>")]}
    return Qwen2_5_VLConfig(
        text_config={**QWEN25_VL_3B_TEXT, "bos_token_id": ids["pad"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]},
        vision_config=QWEN25_VL_3B_VISION,
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
        tie_word_embeddings=True,
    )


def _build_3b(out: Path, image_side: int, dtype: str) -> None:
    """A seeded random Qwen2.5-VL with Qwen2.5-VL-3B's architecture and the offline tokenizer (written in ``dtype``).

    The sampled ids are mostly outside the small tokenizer's vocabulary (they decode to
    nothing), so rewards are flat and the update's gradient is zero; the step still does
    all of its work, which is what the timing needs.
    """
    import torch
    from dapo_lightning.data_prep.tiny_model import CHAT_TEMPLATE, SIZES, build_image_processor, build_tokenizer
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from dapo_lightning.models import ImageOnlyQwenVLProcessor, resolve_dtype

    tokenizer = build_tokenizer(system_prompt_words=True)
    config = qwen25_vl_3b_config(tokenizer)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(resolve_dtype(dtype)).eval()
    text = config.text_config
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                               pad_token_id=text.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0)
    processor = ImageOnlyQwenVLProcessor(
        image_processor=build_image_processor(replace(SIZES["small"], image_side=image_side)),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def question_rows(shape: Shape, count: int, seed: int = 0) -> list[dict]:
    """``count`` synthetic DDM rows (image bytes, problem, solution) with ``shape.image_side`` pixel images."""
    from dapo_lightning.data_prep.synthetic import SyntheticConfig, generate_rows

    return generate_rows(SyntheticConfig(rows=count, seed=seed, image_size=shape.image_side))


def system_prompt_for(processor, shape: Shape, rows: list[dict]) -> str:
    """The SPEC system prompt, cut after whole words so the longest prompt of ``rows`` fits ``shape.prompt_tokens``."""
    from dapo_lightning.prompts import SYSTEM_PROMPT

    if shape.prompt_tokens is None:
        return SYSTEM_PROMPT
    samples = {row["problem"].split("\n")[0]: row for row in rows}  # one row per question type

    def longest(system_prompt: str) -> int:
        return max(prompt_length(processor, row, system_prompt) for row in samples.values())

    words = SYSTEM_PROMPT.split(" ")
    for keep in range(len(words), 0, -1):
        candidate = " ".join(words[:keep])
        if longest(candidate) <= shape.prompt_tokens:
            return candidate
    raise ValueError(f"shape {shape.name}: even a one-word system prompt is longer than {shape.prompt_tokens} tokens")


def prompt_length(processor, row: dict, system_prompt: str) -> int:
    """Tokens of one encoded prompt (image tokens included)."""
    from dapo_lightning.data import example_prompt_batch

    batch = example_prompt_batch(processor, [{**row, "image": decode(row["image"])}], system_prompt=system_prompt)
    return int(batch.attention_mask.sum())


def decode(image: dict):
    from PIL import Image

    return Image.open(io.BytesIO(image["bytes"])).convert("RGB")


def trl_dataset(rows: list[dict], system_prompt: str):
    """The same questions as a TRL vision dataset: conversational ``prompt`` (no image part), ``image``, ``solution``.

    ``GRPOTrainer`` puts the image before the user text (``prepare_multimodal_messages``),
    which is where this project's chat prompt has it (``dapo_lightning.prompts.build_messages``).
    """
    from datasets import Dataset, Features, Image, Value

    features = Features({
        "prompt": [{"role": Value("string"), "content": Value("string")}],
        "image": Image(),
        "solution": Value("string"),
    })
    records = [
        {
            "prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": row["problem"]}],
            "image": row["image"],
            "solution": row["solution"],
        }
        for row in rows
    ]
    return Dataset.from_list(records, features=features)


def shape_summary(shape: Shape) -> dict:
    return {**asdict(shape), "image_tokens": shape.image_tokens}
