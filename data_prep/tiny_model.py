"""Offline Qwen2.5-VL checkpoints: a randomly initialised model, a tokenizer and a processor.

Nothing here touches a hub. The folder written by :func:`build_tiny_model` has the
same files as ``Qwen/Qwen2.5-VL-7B-Instruct`` (``config.json``, safetensors weights,
``tokenizer.json`` with the Qwen chat and vision special tokens, a chat template,
``preprocessor_config.json``) and is loaded by exactly the code that loads the hub
model: :func:`dapo_lightning.models.load_policy` and
:func:`dapo_lightning.models.load_processor`.

The tokenizer is word level, with a vocabulary made of the Qwen special tokens,
the ``<think>``/``<answer>`` tags, the letters A-J, digits, punctuation, the chat
roles and the words of the synthetic questions (78 tokens); other words map to
``<unk>`` (``--system-prompt-words`` adds the default system prompt's words). A small
vocabulary is what lets a randomly initialised policy find rewarded answers by
sampling (the demo must learn), and each answer letter and tag is one token.

    python -m dapo_lightning.data_prep.tiny_model --size tiny --out .cache/models/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-VL's special tokens, in the order the real tokenizer numbers them.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
UNK = "<unk>"

# The Qwen2.5-VL chat template's behaviour (system turn, image placeholders, generation prompt),
# written for this project.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Architecture of one offline size (text decoder, vision tower, image resolution)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_hidden_size: int
    vision_depth: int
    vision_heads: int
    image_side: int  # side of the square images it is made for; without min/max_pixels, every image gets this area
    patch_size: int = 14
    min_pixels: int | None = None  # the image processor's pixel range (None: image_side ** 2, a fixed budget)
    max_pixels: int | None = None

    @property
    def image_tokens(self) -> int:
        """Tokens of an ``image_side`` square image (cells of patch_size * 2 pixels)."""
        return (self.image_side // self.patch_size // 2) ** 2


SIZES = {
    # tests: a couple of seconds per fit step on a 2-core CPU
    "tiny": TinySpec(64, 2, 4, 2, 128, 32, 2, 2, image_side=56),
    # benchmarks: hidden 256, 4 layers, 64 image tokens per image
    "small": TinySpec(256, 4, 4, 2, 512, 64, 2, 2, image_side=224),
    # the tiny model with Qwen2.5-VL-7B-Instruct's image processor (its preprocessor_config.json): images keep
    # their size up to 12845056 pixels (16384 tokens), so a 1024x768 image costs 999 tokens, as with the real model
    "tiny-7b-vision": TinySpec(64, 2, 4, 2, 128, 32, 2, 2, image_side=56, min_pixels=3136, max_pixels=12845056),
}


def tokenizer_vocabulary(extra_words: list[str] = (), *, system_prompt_words: bool = False) -> list[str]:
    """Word-level vocabulary: the synthetic questions, chat roles, letters, digits, punctuation, and
    (``system_prompt_words``) the words of the default system prompt."""
    from dapo_lightning.prompts import SYSTEM_PROMPT

    from dapo_lightning.data_prep.synthetic import vocabulary as synthetic_words

    # Chat roles, the template's default system message, and words of a neutral probe prompt.
    common = "system user assistant You are a helpful . Answer the question Which option is correct ? Look at image".split()
    text = " ".join([SYSTEM_PROMPT if system_prompt_words else "", *synthetic_words(), *common, *extra_words])
    for tag in REASONING_TAGS:
        text = text.replace(tag, " ")
    words: list[str] = []
    for raw in text.split():
        for word in _split_punctuation(raw):
            if word not in words:
                words.append(word)
    for symbol in [*"ABCDEFGHIJ", *"0123456789", ":", "?", ".", ",", "(", ")", "-"]:
        if symbol not in words:
            words.append(symbol)
    return words


def _split_punctuation(word: str) -> list[str]:
    """Mirror the tokenizer's pre-tokenizer: whitespace split, then each punctuation mark on its own."""
    parts, current = [], ""
    for char in word:
        if char.isalnum() or char == "_":
            current += char
        else:
            if current:
                parts.append(current)
            parts.append(char)
            current = ""
    if current:
        parts.append(current)
    return parts


def build_tokenizer(extra_words: list[str] = (), *, system_prompt_words: bool = False):
    """A `transformers` tokenizer with Qwen's special tokens, loadable by ``AutoTokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0}
    for word in tokenizer_vocabulary(list(extra_words), system_prompt_words=system_prompt_words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    return tokenizer


def build_image_processor(spec: TinySpec):
    """Qwen2-VL's PIL image processor: ``spec``'s pixel range (default a fixed budget, ``spec.image_tokens`` tokens
    for a square image), patches of ``spec.patch_size`` merged 2 x 2, and Qwen2.5-VL's normalisation (OpenAI CLIP's
    mean and std, as in Qwen2.5-VL-7B-Instruct's preprocessor_config.json)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = spec.image_side * spec.image_side
    size = {"shortest_edge": spec.min_pixels or pixels, "longest_edge": spec.max_pixels or pixels}
    return Qwen2VLImageProcessorPil(
        size=size, patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


def build_config(spec: TinySpec, tokenizer):
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.hidden_size // spec.num_heads
    quarter = head_dim // 2  # mrope sections split head_dim/2 rotary frequencies over (t, h, w)
    mrope_section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    vocab_size = len(tokenizer)
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        },
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.hidden_size,
            "patch_size": spec.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": spec.patch_size * 2 * 2,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny_model(out: str | os.PathLike, size: str = "tiny", seed: int = 0, *, system_prompt_words: bool = False) -> Path:
    """Write a seeded, float32, randomly initialised Qwen2.5-VL checkpoint folder to ``out`` (atomically)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from dapo_lightning.models import ImageOnlyQwenVLProcessor

    if size not in SIZES:
        raise ValueError(f"size: unknown {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size]
    out = Path(out)
    tokenizer = build_tokenizer(system_prompt_words=system_prompt_words)
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    processor = ImageOnlyQwenVLProcessor(
        image_processor=build_image_processor(spec), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        meta = {"size": size, "seed": seed, "system_prompt_words": system_prompt_words, **spec.__dict__}
        (tmp / "tiny_model.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_model(out: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Build the checkpoint unless a complete one of this size and seed is already at ``out`` (configs' first run)."""
    out = Path(out)
    marker = out / "tiny_model.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if (meta.get("size"), meta.get("seed"), meta.get("system_prompt_words")) == (size, seed, False):
            return out
    return build_tiny_model(out, size=size, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dapo_lightning.data_prep tiny-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="architecture size (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument(
        "--system-prompt-words", action="store_true", help="add the default system prompt's words to the vocabulary"
    )
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, size=args.size, seed=args.seed, system_prompt_words=args.system_prompt_words)
    print(f"wrote {args.size} Qwen2.5-VL to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
