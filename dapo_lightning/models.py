"""Loading the policy, the reference model and the processor; LoRA.

One code path for every checkpoint: ``load_policy("Qwen/Qwen2.5-VL-7B-Instruct")``
and ``load_policy(".cache/models/tiny")`` run the same ``from_pretrained`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Qwen2_5_VLProcessor


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video slot.

    The stock processor insists on a video processor, which needs torchvision; this
    project only feeds images. ``from_pretrained`` of this class loads the image
    processor (PIL backend when torchvision is absent) and the tokenizer from any
    Qwen2.5-VL folder or hub name, ignoring the video processor's files.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, **kwargs) -> ImageOnlyQwenVLProcessor:
    """The processor of ``name_or_path``, with the tokenizer padding on the left (for generation)."""
    processor = ImageOnlyQwenVLProcessor.from_pretrained(
        name_or_path, padding_side="left", trust_remote_code=trust_remote_code, **kwargs
    )
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_policy(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
):
    """``Qwen2_5_VLForConditionalGeneration`` (or any image-text-to-text model) from a folder or hub name."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        name_or_path,
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )


def apply_lora(model, *, r: int, alpha: int, dropout: float, target_modules: Sequence[str]):
    """Wrap ``model`` with a peft LoRA adapter on ``target_modules`` of the language model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_policy(cfg, *, with_reference: bool):
    """The trainable policy of a ``PolicyConfig``, a frozen reference copy if asked (not under LoRA), the processor.

    Returns ``(policy in train mode, reference in eval mode or None, processor)``. Under LoRA the
    reference is the base model with the adapter disabled, so none is loaded.
    """
    load = dict(dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    model = load_policy(cfg.model_name_or_path, **load)
    if cfg.freeze_vision_tower:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    reference = None
    if with_reference and cfg.lora is None:
        reference = load_policy(cfg.model_name_or_path, **load).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    return model.train(), reference, processor  # from_pretrained returns eval mode


def export_pretrained(policy, processor, target) -> None:
    """Save the trained policy (or its LoRA adapter) with its processor to ``target``, loadable by ``from_pretrained``."""
    target.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(target)
    processor.save_pretrained(target)
