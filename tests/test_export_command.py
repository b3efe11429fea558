"""``dapo-lightning export`` (issue 16): any checkpoint this project writes -> the folder the end of a fit writes.

- a Lightning ``.ckpt`` of a 2-step fit exports to the same files as that fit's own ``final/``, with the same weights,
  for full fine-tuning and for LoRA (the adapter; ``--merge``: a full model answering as the adapter does);
- a DeepSpeed ZeRO-2 checkpoint folder written by DeepSpeed's own engine on the CPU (``tests/deepspeed_writer.py``:
  Lightning's DeepSpeedStrategy refuses the CPU, the engine does not), full and LoRA: the exported weights are the
  module's, merged by DeepSpeed's ``zero_to_fp32``;
- an FSDP sharded folder laid out as Lightning's ``FSDPStrategy`` writes it (``meta.pt`` and torch's distributed
  checkpoint), written in one process here: FSDP itself needs a GPU under Lightning;
- the export is atomic and never overwrites; a damaged, foreign or mismatched checkpoint is an error naming it, and a
  pickled code payload never runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from dapo_lightning import cli
from dapo_lightning.config import LoraSettings, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.data import VisualMCQDataModule
from dapo_lightning.export import CheckpointError, export_checkpoint, read_checkpoint
from dapo_lightning.models import load_policy
from dapo_lightning.module import DAPOModule

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def run_fit(root: Path, model_dir, parquet, lora=None) -> Path:
    """2 steps with ``export_final`` and a ``last.ckpt``; the run folder."""
    seed_everything(0)
    module = DAPOModule(policy=PolicyConfig(model_name_or_path=str(model_dir), lora=lora),
                        rollout=RolloutConfig(num_generations=4, max_completion_length=3),
                        rewards=RewardConfig(reward_funcs=["accuracy", "tests.test_module.text_length"]),
                        optim=OptimConfig(learning_rate=1e-2))
    data = VisualMCQDataModule(train_path=str(parquet), processor=str(model_dir), batch_size=2, eval_limit=2,
                               system_prompt=None)
    Trainer(accelerator="cpu", max_steps=2, default_root_dir=str(root), logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)]).fit(module, data)
    return root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    return run_fit(tmp_path_factory.mktemp("full"), tiny_model_dir, synthetic_parquet)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    return run_fit(tmp_path_factory.mktemp("lora"), tiny_model_dir, synthetic_parquet, lora=LORA)


def export(*args) -> int:
    return cli.main(["export", *map(str, args)])


def files(folder: Path) -> dict[str, bytes]:
    """The exported files and their contents (safetensors as tensors below); the fit's claim file left out."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".claim-")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_export(exported: Path, final: Path) -> None:
    """Same file names, same JSON (the adapter's base path aside: both absolute), same tensors."""
    ours, theirs = files(exported), files(final)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name.endswith(".safetensors"):
            a, b = tensors(exported / name), tensors(final / name)
            assert sorted(a) == sorted(b)
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        elif name.endswith(".json"):
            assert json.loads(ours[name]) == json.loads(theirs[name]), name
        else:
            assert ours[name] == theirs[name], name


def assert_loads_as(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    """``from_pretrained`` of ``folder`` holds ``expected`` (a policy's state dict)."""
    loaded = load_policy(str(folder)).state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0, msg=key)


# --- Lightning .ckpt ----------------------------------------------------------------------------------


def test_a_ckpt_exports_to_the_files_the_fit_wrote(full_run, tmp_path):
    assert export("--ckpt", full_run / "ckpt" / "last.ckpt", "--out", tmp_path / "out") == 0
    assert_same_export(tmp_path / "out", full_run / "final")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["suppress_tokens"]  # the vision tokens, as the fit's export has them
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging folder was renamed, nothing left beside


def test_a_lora_ckpt_exports_the_adapter_or_with_merge_a_full_model(lora_run, tmp_path, tiny_model_dir):
    from peft import PeftModel

    ckpt = lora_run / "ckpt" / "last.ckpt"
    assert export("--ckpt", ckpt, "--out", tmp_path / "adapter") == 0
    assert_same_export(tmp_path / "adapter", lora_run / "final")
    assert export("--ckpt", ckpt, "--out", tmp_path / "merged", "--merge") == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = load_policy(str(tmp_path / "merged")).eval()
    adapter = PeftModel.from_pretrained(load_policy(str(tiny_model_dir)), str(lora_run / "final")).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        base = load_policy(str(tiny_model_dir)).eval()(input_ids=ids).logits
        assert not torch.allclose(merged(input_ids=ids).logits, base, atol=1e-4)  # the adapter is in it


def test_merge_without_lora_is_an_error(full_run, tmp_path):
    with pytest.raises(ValueError, match="--merge: .*last.ckpt has no LoRA adapter"):
        export_checkpoint(full_run / "ckpt" / "last.ckpt", tmp_path / "out", merge=True)


def test_config_overrides_the_checkpoints_model_settings(full_run, tmp_path, tiny_model_dir):
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_model_dir, moved)
    config = tmp_path / "moved.yaml"
    config.write_text(yaml.safe_dump({"model": {"policy": {"model_name_or_path": str(moved)}}}))
    assert export("--ckpt", full_run / "ckpt" / "last.ckpt", "--out", tmp_path / "out", "--config", config) == 0
    assert_same_export(tmp_path / "out", full_run / "final")
    wrong = tmp_path / "lora.yaml"
    wrong.write_text(yaml.safe_dump({"model": {"policy": {"lora": {"r": 2, "alpha": 4}}}}))
    with pytest.raises(CheckpointError, match=r"last\.ckpt: its parameters do not fit model\.policy .*unexpected"):
        export_checkpoint(full_run / "ckpt" / "last.ckpt", tmp_path / "out2", [str(wrong)])
    assert not (tmp_path / "out2").exists()


def test_an_existing_out_folder_is_never_overwritten(full_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export("--ckpt", full_run / "ckpt" / "last.ckpt", "--out", out) == 2
    assert f"--out {out} exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- damaged and foreign checkpoints ------------------------------------------------------------------


def test_a_damaged_ckpt_is_an_error_naming_it(full_run, tmp_path, capsys):
    cut = tmp_path / "cut.ckpt"
    data = (full_run / "ckpt" / "last.ckpt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert export("--ckpt", cut, "--out", tmp_path / "out") == 2
    assert f"checkpoint {cut} is damaged: truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_foreign_ckpt_is_an_error_naming_it(tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, other)
    with pytest.raises(CheckpointError, match=rf"{other}: no model.policy in its hyper_parameters"):
        read_checkpoint(other)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"{folder}: a folder that is no checkpoint of this project"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.ckpt")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PAYLOAD_MARK}",))


PAYLOAD_MARK = None


def test_a_pickled_code_payload_never_runs(tmp_path):
    global PAYLOAD_MARK
    PAYLOAD_MARK = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"policy": {}}, "state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match=rf"{evil}: not a checkpoint of this project: it holds objects"):
        read_checkpoint(evil)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"hyper_parameters": {"policy": {"model_name_or_path": "x"}}}, sharded / "meta.pt")
    (sharded / ".metadata").write_bytes(pickle.dumps(Payload()))
    checkpoint = read_checkpoint(sharded)
    from dapo_lightning.export import load_policy_state

    with pytest.raises(CheckpointError, match=r"\.metadata: not a distributed checkpoint's metadata"):
        load_policy_state(torch.nn.Linear(1, 1), checkpoint)
    assert not PAYLOAD_MARK.exists()


# --- DeepSpeed and FSDP folders -----------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_deepspeed_zero2_folder_exports_the_modules_weights(tmp_path, tiny_model_dir, lora):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "tests.deepspeed_writer", str(tmp_path), str(tiny_model_dir),
                             *(["--lora"] if lora else [])], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    folder = tmp_path / "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert export("--ckpt", folder, "--out", tmp_path / "out") == 0
    if not lora:
        assert_loads_as(tmp_path / "out", expected)
        return
    from peft import PeftModel

    adapter = PeftModel.from_pretrained(load_policy(str(tiny_model_dir)), str(tmp_path / "out"))
    state = adapter.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    assert export("--ckpt", folder, "--out", tmp_path / "merged", "--merge") == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_an_fsdp_sharded_folder_exports_the_modules_weights(full_run, tmp_path):
    """The folder Lightning's FSDPStrategy writes with ``state_dict_type: sharded`` (its ``save_checkpoint``:
    ``{"model": state_dict, "optimizer_0": ...}`` through torch's distributed checkpoint, the rest in ``meta.pt``)."""
    import torch.distributed.checkpoint as dcp

    checkpoint = torch.load(full_run / "ckpt" / "last.ckpt", weights_only=True)
    folder = tmp_path / "epoch=0-step=2.ckpt"
    folder.mkdir()
    dcp.save({"model": checkpoint.pop("state_dict"), "optimizer_0": checkpoint.pop("optimizer_states")[0]},
             checkpoint_id=str(folder), no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")
    assert export("--ckpt", folder, "--out", tmp_path / "out") == 0
    assert_same_export(tmp_path / "out", full_run / "final")
