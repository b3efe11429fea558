"""Two fits sharing one ``trainer.default_root_dir``: each exports to its own folder, neither overwrites the other.

The export folder is chosen at fit start and written at fit end, so the choice must be a claim:
``fit_checks.free_folder`` renames a hidden folder holding a claim file onto ``final`` (then
``final-1``, ...), which succeeds for one fit only.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from rel_helpers import cli_config, start_cli, write_config

from dapo_lightning.cli import main
from dapo_lightning.fit_checks import free_folder


@pytest.mark.reliability("Faults", "Two fits sharing one default_root_dir: B starts after A, ends before it",
                         "each exports to its own folder (A, which claimed first, to final; B to final-1); "
                         "neither model is overwritten")
def test_two_fits_sharing_a_root_never_export_to_the_same_folder(tmp_path, tiny_model_dir, synthetic_parquet):
    shared = tmp_path / "shared"
    configs = {}
    for name, steps in (("a", 3), ("b", 1)):
        config = cli_config(tmp_path / name, tiny_model_dir, synthetic_parquet, steps=steps, every=1,
                            export_final=True)
        config["trainer"]["default_root_dir"] = str(shared)
        configs[name] = config
    ready, go = tmp_path / "a-ready", tmp_path / "go"
    configs["a"]["trainer"]["callbacks"].append(
        {"class_path": "rel_helpers.WaitAt", "init_args": {"step": 1, "ready": str(ready), "go": str(go)}})
    log = tmp_path / "a.log"
    first = start_cli(write_config(tmp_path / "a", configs["a"]), log=log)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():  # A has started: its export folder is chosen
            assert first.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        main(["fit", "--config", str(write_config(tmp_path / "b", configs["b"]))])  # B runs whole, exports
        go.touch()
        assert first.wait(240) == 0, log.read_text()[-4000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith("final")) == ["final", "final-1"]
    from safetensors.torch import load_file

    for folder, run in (("final", "a"), ("final-1", "b")):
        exported = load_file(shared / folder / "model.safetensors")["lm_head.weight"]
        trained = torch.load(tmp_path / run / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
        assert torch.equal(exported, trained["policy.lm_head.weight"]), (folder, run)


def test_free_folder_claims_each_folder_once(tmp_path, monkeypatch):
    final = tmp_path / "final"
    assert free_folder(final) == final and final.is_dir()  # claimed: it exists from now on
    assert free_folder(final) == tmp_path / "final-1"  # a second fit (here: the same live process) gets the next
    (tmp_path / "final-2").mkdir()  # an empty folder (made by hand, or by an older version): free
    assert free_folder(final) == tmp_path / "final-2"
    (tmp_path / "final-3").write_text("a file, not a folder")
    exported = tmp_path / "final-4"
    exported.mkdir()
    (exported / "model.safetensors").write_bytes(b"weights")
    assert free_folder(final) == tmp_path / "final-5"
    assert (exported / "model.safetensors").read_bytes() == b"weights"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_claim_of_an_ended_process_is_free_again(tmp_path):
    import socket

    stale = tmp_path / "final"
    stale.mkdir()
    (stale / f".claim-999999999@{socket.gethostname()}").touch()  # no such process: a run that stopped early
    other_host = tmp_path / "final-1"
    other_host.mkdir()
    (other_host / ".claim-999999999@another-host").touch()  # cannot tell whether it still runs: taken
    assert free_folder(tmp_path / "final") == stale
    assert [p.name for p in stale.iterdir()] == [f".claim-{os.getpid()}@{socket.gethostname()}"]
    assert free_folder(tmp_path / "final") == tmp_path / "final-2"


def test_only_rank_zero_claims(tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert free_folder(tmp_path / "final") == tmp_path / "final" and not (tmp_path / "final").exists()
