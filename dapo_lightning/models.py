"""Loading the policy, the reference model and the processor; LoRA; the export of a trained policy.

One code path for every checkpoint: ``load_policy("Qwen/Qwen2.5-VL-7B-Instruct")``
and ``load_policy(".cache/models/tiny")`` run the same ``from_pretrained`` calls, and so do an
exported ``final/`` folder and an exported LoRA adapter folder (transformers loads the base the
adapter names, then the adapter, when peft is installed).

What is saved loads with stock ``transformers`` (``docs/evaluation.md``): the processor is saved as
``Qwen2_5_VLProcessor`` (:meth:`ImageOnlyQwenVLProcessor.to_dict`), the generation config suppresses
the vision tokens (:func:`export_generation_config`) and an adapter names its base by an absolute path.
At the end of a fit the parameters are gathered first when the strategy shards them (:func:`export_trained`);
``dapo-lightning export`` writes the same files from a checkpoint (``export.py``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import Qwen2_5_VLProcessor

STOCK_PROCESSOR = "Qwen2_5_VLProcessor"  # the class AutoProcessor builds from a saved processor_config.json
VIDEO_PROCESSOR = "Qwen2VLVideoProcessor"  # Qwen2.5-VL's video processor (torchvision only, in transformers 5)
# image settings a Qwen2-VL video processor shares (Qwen2.5-VL-7B-Instruct's video_preprocessor_config.json has them)
VIDEO_SETTINGS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                  "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without the video slot.

    The stock processor insists on a video processor, which needs torchvision; this
    project only feeds images. ``from_pretrained`` of this class loads the image
    processor (PIL backend when torchvision is absent) and the tokenizer from any
    Qwen2.5-VL folder or hub name, ignoring the video processor's files.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        """``processor_config.json`` as the stock processor writes it: ``processor_class`` ``Qwen2_5_VLProcessor`` and a
        video processor with the image settings. Naming this class instead made ``AutoProcessor.from_pretrained``,
        which does not know it, silently return the tokenizer alone. Where torchvision is installed it now builds the
        stock processor; where it is not, it raises an ImportError naming torchvision (the stock processor always
        builds a video processor, and transformers' only one needs torchvision)."""
        output = super().to_dict()
        output["processor_class"] = STOCK_PROCESSOR
        image = output.get("image_processor", {})
        output["video_processor"] = {**{k: image[k] for k in VIDEO_SETTINGS if k in image},
                                     "video_processor_type": VIDEO_PROCESSOR}
        return output

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saved as the stock processor is (``to_dict``), ``tokenizer_config.json``'s ``processor_class`` too."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        _set_json(Path(save_directory) / "tokenizer_config.json", processor_class=STOCK_PROCESSOR)
        return files


def _set_json(path: Path, **values) -> None:
    """Set ``values`` in the JSON object stored at ``path`` (no-op when there is no such file)."""
    if path.exists():
        path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **values}, indent=2,
                                   ensure_ascii=False) + "\n", encoding="utf-8")


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


def adapter_base(name_or_path: str) -> str | None:
    """The base model a local LoRA adapter folder names (its ``adapter_config.json``, as :func:`export_pretrained`
    writes it), or None for a model folder or a hub name."""
    config = Path(name_or_path) / "adapter_config.json"
    return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"] if config.is_file() else None


def load_adapter(model, folder: str, lora):
    """``model`` with the LoRA adapter saved in ``folder``, trainable; its settings must be those of ``lora``."""
    from peft import PeftConfig, PeftModel

    saved = PeftConfig.from_pretrained(folder)
    found = {"r": saved.r, "alpha": saved.lora_alpha, "target_modules": sorted(saved.target_modules)}
    wanted = {"r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
    if found != wanted:
        raise ValueError(f"model.policy.lora: {folder} holds an adapter with {found}, the configuration asks for "
                         f"{wanted}; set the adapter's values (or null, to load it for test or predict only)")
    return PeftModel.from_pretrained(model, folder, is_trainable=True)


def build_policy(cfg, *, with_reference: bool):
    """The trainable policy of a ``PolicyConfig``, a frozen reference copy if asked (not under LoRA), the processor.

    Returns ``(policy in train mode, reference in eval mode or None, processor)``. Under LoRA the
    reference is the base model with the adapter disabled, so none is loaded. ``model_name_or_path``
    may be an exported LoRA adapter folder: without LoRA settings transformers loads its base and
    the adapter into it; with them the adapter is loaded into its base as the trainable peft adapter
    (a fresh one would replace it: the base model would answer).
    """
    load = dict(dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    base = adapter_base(cfg.model_name_or_path) if cfg.lora is not None else None
    model = load_policy(base or cfg.model_name_or_path, **load)
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
        model = load_adapter(model, cfg.model_name_or_path, cfg.lora) if base else apply_lora(
            model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
    processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    return model.train(), reference, processor  # from_pretrained returns eval mode


def export_generation_config(model, tokenizer):
    """``model``'s generation config with what plain ``generate()`` needs to answer as this project samples: the
    vision special tokens suppressed (``rollout.VISION_SPECIAL_TOKENS``: a sampled ``<|video_pad|>`` makes the next
    forward expect video features) and every end-of-turn id this project stops at."""
    from dapo_lightning.rollout import TokenIds

    config = copy.deepcopy(model.generation_config)
    ids = TokenIds.from_tokenizer(tokenizer, config)
    config.suppress_tokens = sorted(set(config.suppress_tokens or ()) | set(ids.suppress)) or None
    config.eos_token_id = list(ids.eos) if len(ids.eos) > 1 else ids.eos[0]
    config.pad_token_id = ids.pad
    return config


def export_pretrained(policy, processor, target, state_dict: dict | None = None) -> None:
    """Save the trained policy (or its LoRA adapter) with its processor and generation config to ``target``,
    loadable by stock ``from_pretrained`` calls (``docs/evaluation.md``).

    ``state_dict``: the policy's full parameters when the module's own are shards (:func:`full_state_dict`).
    A LoRA adapter's ``adapter_config.json`` names its base model by the path the policy was loaded from; a local
    folder is written as an absolute path, so the adapter loads from any working directory (a hub name is kept).
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(target, **({} if state_dict is None else {"state_dict": state_dict}))
    base_model = policy.get_base_model() if hasattr(policy, "peft_config") else policy
    export_generation_config(base_model, processor.tokenizer).save_pretrained(target)
    adapter_config = target / "adapter_config.json"
    if adapter_config.exists():
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and Path(base).exists():
            _set_json(adapter_config, base_model_name_or_path=str(Path(base).resolve()))
    processor.save_pretrained(target)


def export_trained(trainer, policy, processor, target) -> None:
    """The end-of-fit export (``model.export_final``), called on every process: a sharded policy's parameters are
    gathered to rank 0 first (:func:`full_state_dict`, a collective), and rank 0 writes."""
    state_dict = full_state_dict(trainer, policy)
    if trainer.global_rank == 0:
        export_pretrained(policy, processor, target, state_dict)


def full_state_dict(trainer, policy) -> dict | None:
    """The policy's full state dict on rank 0 (empty elsewhere) when the strategy shards its parameters, else None.

    A collective under sharding: every process calls it. FSDP (Lightning's ``FSDPStrategy``, FSDP2's
    ``ModelParallelStrategy``): torch's full state dict of the wrapped model, gathered to rank 0 on the CPU.
    DeepSpeed ZeRO-3 is refused before a fit (``fit_checks.check_strategy``). One process, DDP and ZeRO-1/2 hold
    the parameters whole: None, and the policy saves its own.
    """
    from dapo_lightning.distributed import shards_parameters

    if not shards_parameters(trainer):
        return None
    return gather_full_state_dict(trainer.strategy.model, policy)


def gather_full_state_dict(root: torch.nn.Module, policy: torch.nn.Module) -> dict:
    """``policy``'s full parameters from ``root``, the sharded model that holds it (FSDP or FSDP2), on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    found = [name for name, module in root.named_modules() if module is policy]
    if not found:
        raise ValueError("the policy is not a submodule of the strategy's model")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(root, options=options)  # clean names, without FSDP's wrapper prefixes
    prefix = _clean_name(found[0])
    prefix = f"{prefix}." if prefix else ""
    return {key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}


def _clean_name(name: str) -> str:
    """A module path without the wrapper levels FSDP and Lightning insert (torch's state dicts leave them out)."""
    wrappers = ("_fsdp_wrapped_module", "_forward_module", "_checkpoint_wrapped_module", "_orig_mod")
    return ".".join(part for part in name.split(".") if part and part not in wrappers)
