"""What a fit leaves behind loads back (issue 13, items 11 and 12).

- ``predict`` (and ``test``) run on the exported ``final/`` folder, on an exported LoRA adapter folder and on a
  Lightning checkpoint (``ckpt_path``), and answer as the trained module does;
- the export loads with stock ``transformers``: ``processor_class`` names ``Qwen2_5_VLProcessor`` (so
  ``AutoProcessor`` builds it where torchvision is installed, and says torchvision is missing where it is not,
  instead of silently returning the tokenizer), the processor's own classes encode a question exactly as
  training did, ``generation_config.json`` suppresses the vision tokens, and a LoRA adapter names its base by
  an absolute path, so one ``from_pretrained`` line loads it from any folder.
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from dapo_lightning.config import LoraSettings, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.data import example_prompt_batch
from dapo_lightning.models import export_pretrained, load_policy, load_processor
from dapo_lightning.module import DAPOModule
from dapo_lightning.prompts import build_messages
from tests.test_evaluation import data_module, held_out_file, predict
from tests.test_module import fit

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def trained_module(model_dir, lr=1e-2, **policy) -> DAPOModule:
    """Greedy validation; a reward that varies within every group (the random model's accuracy is 0 everywhere: no
    advantage, no update), so a few steps at this rate change the weights."""
    return DAPOModule(policy=PolicyConfig(model_name_or_path=str(model_dir), **policy),
                      rollout=RolloutConfig(num_generations=4, max_completion_length=3, eval_greedy=True),
                      rewards=RewardConfig(reward_funcs=["accuracy", "tests.test_module.text_length"]),
                      optim=OptimConfig(learning_rate=lr))


def stock_inputs(folder, problem: str, image: Image.Image) -> dict:
    """A question encoded with stock classes only, on a machine without torchvision: the processor's image processor
    (``AutoImageProcessor``: the PIL one) and tokenizer, the chat template, and the image placeholder expanded to
    one token per merged 2 x 2 patch, as ``Qwen2_5_VLProcessor`` does."""
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor, tokenizer = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(build_messages(problem, system_prompt=None), add_generation_prompt=True,
                                         tokenize=False)
    vision = image_processor(images=[image], return_tensors="pt")
    n = int(vision["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    return {**tokenizer([text.replace("<|image_pad|>", "<|image_pad|>" * n)], return_tensors="pt"), **vision}


def assert_same_policy(loaded: DAPOModule, trained: DAPOModule, base_dir) -> None:
    """The two modules' policies give the same logits on a question, and not the base model's (training changed it:
    equal predictions are then not a coincidence of a few greedy tokens)."""
    inputs = stock_inputs(base_dir, "What colour is the shape in the image?\nA: red\nB: blue",
                          Image.new("RGB", (56, 56), "red"))
    with torch.no_grad():
        logits = trained.policy.eval()(**inputs).logits
        torch.testing.assert_close(loaded.policy.eval()(**inputs).logits, logits)
        assert not torch.allclose(load_policy(str(base_dir))(**inputs).logits, logits)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """The random tiny model exported as a fit's ``on_fit_end`` exports it."""
    target = tmp_path_factory.mktemp("export") / "final"
    export_pretrained(load_policy(str(tiny_model_dir)), load_processor(str(tiny_model_dir)), target)
    return target


# --- stock transformers ---------------------------------------------------------------------------------


def test_the_export_names_the_stock_processor_and_its_video_settings(exported):
    config = json.loads((exported / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"  # was the project's ImageOnlyQwenVLProcessor
    assert config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    video = config["video_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert {k: video[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")} == {
        k: config["image_processor"][k] for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean",
                                                  "image_std")}
    assert json.loads((exported / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert type(load_processor(str(exported))).__name__ == "ImageOnlyQwenVLProcessor"  # this project still loads it


def test_auto_processor_is_the_stock_processor_or_names_the_missing_torchvision(exported):
    from transformers import AutoProcessor

    if not HAS_TORCHVISION:  # Qwen2.5-VL's stock processor always builds a video processor, which needs torchvision
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(exported)
        return
    processor = AutoProcessor.from_pretrained(exported)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.image_processor.merge_size == 2


def test_the_stock_classes_encode_a_question_exactly_as_training_does(exported, synthetic_rows):
    from dapo_lightning.data.rows import decode_image

    row = synthetic_rows[0]
    batch = example_prompt_batch(load_processor(str(exported)), [row], system_prompt=None)
    inputs = stock_inputs(exported, row["problem"], decode_image(row["image"]))
    assert torch.equal(inputs["input_ids"], batch.input_ids) and torch.equal(inputs["image_grid_thw"],
                                                                            batch.image_grid_thw)
    torch.testing.assert_close(inputs["pixel_values"], batch.pixel_values)
    if HAS_TORCHVISION:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(exported)
        text = processor.apply_chat_template(build_messages(row["problem"], system_prompt=None),
                                             add_generation_prompt=True)
        stock = processor(text=[text], images=[decode_image(row["image"])], return_tensors="pt")
        assert torch.equal(stock["input_ids"], batch.input_ids)


def test_plain_generate_never_emits_vision_tokens(exported, synthetic_rows):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from dapo_lightning.data.rows import decode_image

    tokenizer = AutoTokenizer.from_pretrained(exported)
    vision_ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)
    assert sorted(model.generation_config.suppress_tokens) == vision_ids
    # the random model samples every token of its vocabulary: 8 x 40 samples held 12 vision tokens before the fix
    torch.manual_seed(0)
    inputs = stock_inputs(exported, synthetic_rows[0]["problem"], decode_image(synthetic_rows[0]["image"]))
    output = model.generate(**inputs, do_sample=True, max_new_tokens=40, num_return_sequences=8)
    assert not torch.isin(output[:, inputs["input_ids"].shape[1]:], torch.tensor(vision_ids)).any()


def test_a_lora_adapter_names_an_absolute_base_and_loads_in_one_line(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                     monkeypatch):
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    monkeypatch.chdir(tiny_model_dir.parent)  # trained from a relative path, as configs/lora.yaml-style runs are
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    module = trained_module(tiny_model_dir.name, lora=lora)
    fit(tmp_path, module, synthetic_parquet, tiny_model_dir, steps=2)
    final = tmp_path / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    # the documented line: base + adapter (peft installed); an adapter folder's generation config is not read by
    # from_pretrained (it reads the base's), so it is passed
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        final, generation_config=GenerationConfig.from_pretrained(final))
    assert sorted(model.generation_config.suppress_tokens) == sorted(
        load_processor(str(final)).tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))
    assert type(AutoModelForImageTextToText.from_pretrained(final)) is type(model)  # the short form loads it too
    inputs = stock_inputs(final, "What colour is the shape in the image?\nA: red\nB: blue",
                          Image.new("RGB", (56, 56), "red"))
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, module.policy(**inputs).logits)
        assert not torch.equal(load_policy(str(tiny_model_dir.resolve()))(**inputs).logits, model(**inputs).logits)


# --- predict and test on what a fit leaves behind ------------------------------------------------------------


def test_predict_on_the_final_folder_answers_as_the_trained_module(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                   synthetic_rows):
    held_out = held_out_file(tmp_path, synthetic_rows)
    module = trained_module(tiny_model_dir)
    fit(tmp_path / "fit", module, synthetic_parquet, tiny_model_dir, steps=3)
    data = data_module(synthetic_parquet, tiny_model_dir, predict_path=str(held_out))
    trained = predict(tmp_path / "a", module, data, tmp_path / "trained.jsonl")
    final = tmp_path / "fit" / "final"
    from_final = trained_module(final)
    loaded = predict(tmp_path / "b", from_final, data_module(synthetic_parquet, final, predict_path=str(held_out)),
                     tmp_path / "final.jsonl")
    assert loaded == trained
    assert_same_policy(from_final, module, tiny_model_dir)


@pytest.mark.parametrize("lora_settings", ["unset", "as trained"])
def test_predict_on_a_lora_adapter_folder_answers_as_the_trained_module(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                        synthetic_rows, lora_settings):
    # "as trained": the training config (model.policy.lora set), as a user runs predict with configs/lora.yaml; a fresh
    # adapter used to replace the loaded one there, silently: the base model answered
    held_out = held_out_file(tmp_path, synthetic_rows)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    module = trained_module(tiny_model_dir, lora=lora)
    fit(tmp_path / "fit", module, synthetic_parquet, tiny_model_dir, steps=3)
    data = data_module(synthetic_parquet, tiny_model_dir, predict_path=str(held_out))
    trained = predict(tmp_path / "a", module, data, tmp_path / "trained.jsonl")
    adapter = tmp_path / "fit" / "final"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    from_adapter = trained_module(adapter, lora=lora if lora_settings == "as trained" else None)
    loaded = predict(tmp_path / "b", from_adapter, data_module(synthetic_parquet, adapter, predict_path=str(held_out)),
                     tmp_path / "adapter.jsonl")
    assert loaded == trained
    assert_same_policy(from_adapter, module, tiny_model_dir)


def test_predict_and_test_on_a_checkpoint_answer_as_the_trained_module(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                       synthetic_rows):
    held_out = held_out_file(tmp_path, synthetic_rows)
    module = trained_module(tiny_model_dir)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    data = data_module(synthetic_parquet, tiny_model_dir, predict_path=str(held_out), test_path=str(held_out))
    fit_trainer = Trainer(accelerator="cpu", max_steps=3, default_root_dir=str(tmp_path / "fit"), logger=False,
                          callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, limit_val_batches=0)
    fit_trainer.fit(module, data)
    trained = predict(tmp_path / "a", module, data, tmp_path / "trained.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # max_steps 3, as the training config says: loading a step-3 checkpoint to predict or test trains nothing,
        # so the resume warning "nothing is left to train" does not apply
        from_checkpoint = trained_module(tiny_model_dir)
        loaded = predict(tmp_path / "b", from_checkpoint, data, tmp_path / "ckpt.jsonl",
                         ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_steps=3)
        [tested] = Trainer(accelerator="cpu", max_steps=3, default_root_dir=str(tmp_path / "t"), logger=False,
                           enable_progress_bar=False, enable_model_summary=False).test(
            trained_module(tiny_model_dir), data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert loaded == trained
    assert_same_policy(from_checkpoint, module, tiny_model_dir)
    assert tested["test/accuracy"] == pytest.approx(sum(r["correct"] for r in trained) / len(trained))
    assert not [w for w in caught if "nothing is left to train" in str(w.message)]


# --- the trained demo, loaded by stock transformers alone ------------------------------------------------------


@pytest.mark.slow
def test_the_trained_demo_answers_held_out_questions_with_stock_transformers_alone(tmp_path):
    """``configs/demo.yaml`` for 200 steps (held-out accuracy 1.0 there, README), exported, then loaded with stock
    classes only (no dapo_lightning code), greedy ``generate()`` on 32 new questions: right answers, no vision token."""
    import io

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from dapo_lightning.data_prep.synthetic import SyntheticConfig, generate_rows
    from dapo_lightning.rewards.accuracy import extract_answer
    from tests.test_cli import ROOT, run_cli

    run, model, data = tmp_path / "run", tmp_path / "model", tmp_path / "data.parquet"
    run_cli(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.max_steps=200",
             f"--trainer.default_root_dir={run}", f"--model.policy.model_name_or_path={model}",
             f"--data.train_path={data}", "--trainer.enable_progress_bar=false"], tmp_path)
    final = tmp_path / "run" / "final"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    vision_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))
    questions = generate_rows(SyntheticConfig(rows=32, seed=1, image_size=56, question_types=("colour",)))
    routes = {"image processor + tokenizer": stock_inputs}
    if HAS_TORCHVISION:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(final)

        def auto_processor_inputs(folder, problem, image):
            messages = build_messages(problem, system_prompt=None)
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            return processor(text=[text], images=[image], return_tensors="pt")

        routes["AutoProcessor"] = auto_processor_inputs
    for route, encode in routes.items():
        right = 0
        for question in questions:  # images the demo never trained on (its data: seed 0)
            inputs = encode(final, question["problem"], Image.open(io.BytesIO(question["image"]["bytes"])))
            new = model.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:]
            assert not torch.isin(new, vision_ids).any(), tokenizer.decode(new)
            right += extract_answer(tokenizer.decode(new, skip_special_tokens=True)) == question["solution"]
        assert right / len(questions) >= 0.9, f"{route}: {right} of {len(questions)} right"  # 32 of 32 measured


def test_an_adapter_folder_with_other_lora_settings_is_an_error_naming_the_key(tmp_path, tiny_model_dir):
    from dapo_lightning.models import apply_lora, build_policy

    adapter = tmp_path / "adapter"
    policy = apply_lora(load_policy(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    export_pretrained(policy, load_processor(str(tiny_model_dir)), adapter)
    with pytest.raises(ValueError, match=r"model\.policy\.lora: .*adapter holds an adapter with \{'r': 4, 'alpha': 8"):
        build_policy(PolicyConfig(model_name_or_path=str(adapter), lora=LoraSettings(r=16)), with_reference=False)
    model, _, _ = build_policy(PolicyConfig(model_name_or_path=str(adapter), lora=LoraSettings(
        r=4, alpha=8, target_modules=["q_proj"])), with_reference=False)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n, p in policy.named_parameters() if p.requires_grad)
