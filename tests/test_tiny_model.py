"""The offline Qwen2.5-VL: files, architecture, tokenizer, processor, and the hub loading path."""

import json

import torch
from PIL import Image

from dapo_lightning.models import ImageOnlyQwenVLProcessor, load_policy, load_processor
from dapo_lightning.prompts import build_messages
from dapo_lightning.data_prep.tiny_model import QWEN_SPECIAL_TOKENS, REASONING_TAGS, SIZES, build_tiny_model


def test_folder_has_the_hub_checkpoint_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "processor_config.json", "generation_config.json"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl"


def test_loads_through_the_hub_code_path(tiny_model_dir):
    model = load_policy(str(tiny_model_dir))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.dtype == torch.float32
    # hidden 64, 2 decoder layers, vision tower of depth 2 and width 32
    assert model.config.text_config.hidden_size == 64
    assert model.config.text_config.num_hidden_layers == 2
    assert model.config.vision_config.depth == 2
    # 78-token vocabulary: embeddings + lm_head 2 * 78 * 64; the vision tower is about half the model
    assert sum(p.numel() for p in model.parameters()) == 167904
    assert sum(p.numel() for p in model.model.visual.parameters()) == 83616


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = load_policy(str(build_tiny_model(tmp_path / "a", size="tiny", seed=0)))
    other = load_policy(str(build_tiny_model(tmp_path / "b", size="tiny", seed=1)))
    reference = load_policy(str(tiny_model_dir))
    for (name, p), q, r in zip(reference.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(reference.parameters(), other.parameters()))


def test_tokenizer_carries_qwen_special_tokens_and_single_token_tags(processor):
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for token in (*QWEN_SPECIAL_TOKENS, *REASONING_TAGS, *"ABCDEFGHIJ"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token], token
    text = "<think> red </think> <answer>C</answer>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == "<think> red </think> <answer> C </answer>"


def test_chat_template_renders_qwen_chatml(processor):
    text = processor.apply_chat_template(build_messages("Q?", system_prompt="Be brief."), tokenize=False,
                                         add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # no system turn: the template adds Qwen's default one
    text = processor.apply_chat_template(build_messages("Q?", system_prompt=None), tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_processor_expands_the_image_placeholder_and_keeps_token_types(processor):
    assert isinstance(processor, ImageOnlyQwenVLProcessor)
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (200, 80), "blue")]
    texts = [processor.apply_chat_template(build_messages(q, None), tokenize=False) for q in ("red?", "a longer question?")]
    out = processor(text=texts, images=images, padding=True, return_tensors="pt")
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    spec = SIZES["tiny"]
    # a square image becomes 56 x 56: 4 x 4 patches of 14 px, merged 2 x 2 -> 4 tokens;
    # 200 x 80 keeps its aspect ratio within the same pixel budget: 84 x 28 -> 6 x 2 patches -> 3 tokens
    assert spec.image_tokens == 4
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 6]]
    assert (out["input_ids"] == image_pad).sum(-1).tolist() == [4, 3]
    assert out["mm_token_type_ids"].shape == out["input_ids"].shape
    assert torch.equal(out["mm_token_type_ids"].bool(), out["input_ids"] == image_pad)
    assert out["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left


def test_processor_loads_from_a_saved_folder_without_video_processor(tiny_model_dir):
    processor = load_processor(str(tiny_model_dir))
    assert not hasattr(processor, "video_processor") or processor.video_processor is None
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_the_7b_vision_size_has_qwen25_vl_7b_image_settings(tmp_path):
    folder = build_tiny_model(tmp_path / "tiny-7b-vision", size="tiny-7b-vision")
    image_processor = load_processor(str(folder)).image_processor  # the hub loading path
    # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
    assert (image_processor.patch_size, image_processor.temporal_patch_size, image_processor.merge_size) == (14, 2, 2)
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (3136, 12845056)
    assert list(image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(image_processor.image_std) == [0.26862954, 0.26130258, 0.27577711]
    # images keep their size: 1024 x 768 -> 1036 x 756 (37 x 27 cells of 28 px) = 74 x 54 patches -> 999 tokens
    out = image_processor(images=[Image.new("RGB", (1024, 768))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 54, 74]]
    assert out["pixel_values"].shape == (54 * 74, 3 * 2 * 14 * 14)
    assert load_policy(str(folder)).config.vision_config.patch_size == 14
