"""Resuming from a checkpoint that cannot serve: a damaged file, a run already past max_steps, the model folder
spelled another way."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from rel_helpers import cli_config, steps_trained, write_config

from dapo_lightning import checkpointing, storage
from dapo_lightning.cli import main


def recording(tmp, model_dir, parquet, **kwargs):
    return cli_config(tmp, model_dir, parquet, callbacks=[
        {"class_path": "rel_helpers.RecordSteps", "init_args": {"path": str(tmp / "steps.json")}}], **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, synthetic_parquet):
    """A 4-step run with a checkpoint every 2 steps: ckpt/epoch=0-step=4.ckpt and ckpt/last.ckpt (both step 4)."""
    tmp = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", str(write_config(tmp, cli_config(tmp, tiny_model_dir, synthetic_parquet)))])
    return tmp


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],  # a copy cut short, a disk that filled up under another writer
    "garbage": lambda data: bytes(range(256)) * (len(data) // 256),
    "empty": lambda data: b"",
}
DETAIL = {"truncated": "truncated (its zip index is missing), {size} bytes",
          "garbage": "not a torch checkpoint, {size} bytes", "empty": "empty (0 bytes)"}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("how", ["last", "ckpt/last.ckpt"])
@pytest.mark.reliability("Faults", "Resume when last.ckpt is {damage}: --ckpt_path {how}",
                         "an error naming the file as damaged and the newest intact checkpoint beside it, without "
                         "torch's traceback and its advice to load with weights_only=False")
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(damage, how, trained, tmp_path, tiny_model_dir,
                                                                  synthetic_parquet):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    intact = folder / "epoch=0-step=4.ckpt"
    intact.write_bytes((trained / "ckpt" / "epoch=0-step=4.ckpt").read_bytes())
    last = folder / "last.ckpt"
    last.write_bytes(DAMAGE[damage]((trained / "ckpt" / "last.ckpt").read_bytes()))
    os.utime(intact, (1_000, 1_000))  # older than the damaged last.ckpt, as when it was written last
    config = write_config(tmp_path, recording(tmp_path, tiny_model_dir, synthetic_parquet))
    with pytest.raises(storage.DamagedCheckpointError) as error:
        main(["fit", "--config", str(config), "--ckpt_path", "last" if how == "last" else str(last)])
    what = DETAIL[damage].format(size=last.stat().st_size)
    assert str(error.value) == (
        f"checkpoint {last} is damaged: {what}; the newest intact checkpoint beside it is "
        f"{intact}: resume from it with --ckpt_path {intact} (ckpt_path= in Python)")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # torch's advice is not shown
    assert steps_trained(tmp_path / "steps.json") == []


def test_without_an_intact_checkpoint_the_error_says_so(tmp_path):
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"PK\x03\x04" + b"\0" * 96)
    (tmp_path / "epoch=0-step=2.ckpt").write_bytes(b"")
    with pytest.raises(storage.DamagedCheckpointError, match=r"is damaged: truncated \(its zip index is missing\), "
                                                             r"100 bytes; no intact checkpoint beside it: start a "
                                                             r"new run, or restore the file from a copy$"):
        storage.load_checkpoint_file(damaged)
    with pytest.raises(FileNotFoundError):  # a missing file is not a damaged one
        storage.load_checkpoint_file(tmp_path / "missing.ckpt")


@pytest.mark.reliability("Faults", "Resume a step-4 checkpoint with trainer.max_steps 2",
                         "a warning: saved after step 4, max_steps 2, nothing left to train; raise max_steps")
def test_resuming_past_max_steps_warns(trained, tiny_model_dir, synthetic_parquet):
    config = write_config(trained, recording(trained, tiny_model_dir, synthetic_parquet, steps=2), "resume.yaml")
    with pytest.warns(UserWarning) as caught:
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    last = trained / "ckpt" / "last.ckpt"
    assert (f"{last} was saved after step 4 and trainer.max_steps is 2: nothing is left to train (the fit ends at "
            "once); raise trainer.max_steps above 4 to train further") in [str(w.message) for w in caught]
    assert steps_trained(trained / "steps.json") == []


def test_the_max_steps_warning_by_hand():
    assert checkpointing.nothing_left_to_train({"global_step": 40}, 20, "c.ckpt") == (
        "c.ckpt was saved after step 40 and trainer.max_steps is 20: nothing is left to train (the fit ends at "
        "once); raise trainer.max_steps above 40 to train further")
    assert checkpointing.nothing_left_to_train({"global_step": 4}, 4, "c.ckpt").startswith("c.ckpt was saved after "
                                                                                            "step 4 and")
    assert checkpointing.nothing_left_to_train({"global_step": 3}, 4, "c.ckpt") is None
    assert checkpointing.nothing_left_to_train({"global_step": 40}, -1, "c.ckpt") is None  # bounded by epochs


@pytest.mark.reliability("Faults", "Resume with the model folder given as an absolute path (trained with a relative "
                         "one)",
                         "accepted and resumed at step 2 (paths compared after resolving), no 'settings differ' "
                         "warning for it; another folder is still refused naming model.policy.model_name_or_path")
def test_the_same_model_folder_spelled_another_way_is_the_same_model(tmp_path, tiny_model_dir, synthetic_parquet,
                                                                     monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    relative = recording(tmp_path, tiny_model_dir.name, synthetic_parquet, steps=2)
    main(["fit", "--config", str(write_config(tmp_path, relative))])
    assert steps_trained(tmp_path / "steps.json") == [0, 1]
    absolute = recording(tmp_path, str(tiny_model_dir.resolve()), synthetic_parquet, steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(write_config(tmp_path, absolute, "resume.yaml")), "--ckpt_path", "last"])
    assert steps_trained(tmp_path / "steps.json") == [2, 3]
    assert not [w for w in caught if "model_name_or_path" in str(w.message)]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["hyper_parameters"]
    other = {"policy": {"model_name_or_path": str(tmp_path)}}
    with pytest.raises(ValueError, match=r"^model.policy.model_name_or_path: the checkpoint was trained with "):
        checkpointing.check_same_config(saved, other)
