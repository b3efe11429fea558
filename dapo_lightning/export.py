"""``dapo-lightning export``: a checkpoint of this project -> the folder the end of a fit writes.

    dapo-lightning export --ckpt runs/exp3/checkpoints/last.ckpt --out runs/exp3/step-800
    dapo-lightning export --ckpt runs/lora/checkpoints/last.ckpt --out runs/lora/merged --merge

The output is what ``model.export_final`` writes (``models.export_pretrained``): the policy (or its
LoRA adapter; ``--merge``: the adapter merged into its base, a full model) with its processor and
generation config (vision tokens suppressed), loadable by stock ``from_pretrained`` calls. It is
written to a hidden temporary folder beside ``--out`` and renamed into place; an existing ``--out``
is never overwritten.

Checkpoints read (:func:`read_checkpoint`):

- a Lightning ``.ckpt`` file (one process, DDP, FSDP with ``state_dict_type: full``);
- a DeepSpeed checkpoint folder, as Lightning's ``DeepSpeedStrategy`` writes one (``latest``,
  ``checkpoint/mp_rank_00_model_states.pt`` with the hyper-parameters, one optimizer shard per
  process): DeepSpeed's own ``zero_to_fp32`` merges the fp32 master weights of any ZeRO stage;
- an FSDP sharded folder (``state_dict_type: sharded``: ``meta.pt`` and torch's distributed
  checkpoint, ``.metadata`` and ``*.distcp``), read in one process.

The model settings are the checkpoint's own (its hyper-parameters' ``policy``: the base model,
dtype, LoRA); ``--config`` files (a fit's configs) override them, e.g. when the base model has
moved. Every pickle is read restricted to plain values, tensors and the few classes DeepSpeed and
torch's distributed checkpoint store (``weights_only``), so a checkpoint cannot run code; a damaged,
foreign or mismatched checkpoint is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dapo_lightning import storage
from dapo_lightning.config import PolicyConfig, coerce

POLICY_PREFIX = "policy."  # DAPOModule.policy in the module's state dict
WRAPPER_PREFIXES = ("_forward_module.",)  # Lightning's DeepSpeed wrapper before Lightning 2.1


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported; the message names the file or folder and why."""


@dataclass
class Checkpoint:
    path: Path
    kind: str  # "lightning", "deepspeed" or "fsdp-sharded"
    hyper_parameters: dict
    state_dict: dict[str, torch.Tensor] | None  # the module's (None: an FSDP sharded folder, read into the policy)


# --- reading ------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The hyper-parameters and the module's parameters of any checkpoint this project writes (module docstring)."""
    path = Path(path)
    if path.is_file():
        return _read_lightning(path)
    if path.is_dir():
        if (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")):
            return _read_deepspeed(path)
        if (path / "meta.pt").is_file() and (path / ".metadata").is_file():
            return Checkpoint(path, "fsdp-sharded", _hyper_parameters(_load(path / "meta.pt"), path / "meta.pt"),
                              None)
        raise CheckpointError(f"{path}: a folder that is no checkpoint of this project: neither DeepSpeed's "
                              "(latest, checkpoint/mp_rank_00_model_states.pt) nor FSDP's sharded one (meta.pt, "
                              ".metadata)")
    raise CheckpointError(f"{path}: no such checkpoint file or folder")


def _load(file: Path, safe_globals: tuple = ()) -> dict:
    """``torch.load(file, weights_only=True)`` (with ``safe_globals`` allowed); a damaged or foreign file is named."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            value = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        if not storage.is_intact(file):
            raise CheckpointError(storage.describe_damaged(file)) from None
        raise CheckpointError(f"{file}: not a checkpoint of this project: it holds objects that a weights_only load "
                              f"refuses ({str(error).splitlines()[-1][:300]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: not a checkpoint of this project: it holds a {type(value).__name__}")
    return value


def _hyper_parameters(checkpoint: dict, file: Path) -> dict:
    hyper_parameters = checkpoint.get("hyper_parameters")
    if not isinstance(hyper_parameters, dict) or not isinstance(hyper_parameters.get("policy"), dict):
        raise CheckpointError(f"{file}: no model.policy in its hyper_parameters: not written by dapo-lightning's "
                              "DAPOModule")
    return hyper_parameters


def _read_lightning(file: Path) -> Checkpoint:
    checkpoint = _load(file)
    hyper_parameters = _hyper_parameters(checkpoint, file)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{file}: no state_dict: not a Lightning checkpoint of the module")
    return Checkpoint(file, "lightning", hyper_parameters, state_dict)


def _deepspeed_classes() -> tuple:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, ZeroStageEnum, fragment_address


def _read_deepspeed(folder: Path) -> Checkpoint:
    """DeepSpeed's folder: every file checked with a weights_only load first (so DeepSpeed's own unrestricted loads
    that follow cannot run code), then ``zero_to_fp32`` merges the fp32 master weights of all processes."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as error:
        raise CheckpointError(f"{folder}: a DeepSpeed checkpoint folder; reading it needs deepspeed ({error})") from None
    latest = folder / "latest"
    tag = latest.read_text().strip() if latest.is_file() else None
    shards = folder / tag if tag else next(p.parent for p in folder.glob("*/mp_rank_*_model_states.pt"))
    files = sorted(shards.glob("*.pt"))
    model_files = [f for f in files if f.name.startswith(("mp_rank_", "zero_pp_rank_")) and "model_states" in f.name]
    if not model_files or not any("optim_states" in f.name for f in files):
        raise CheckpointError(f"{shards}: a DeepSpeed checkpoint needs mp_rank_*_model_states.pt and "
                              "*_optim_states.pt files; found " + (", ".join(f.name for f in files) or "none"))
    classes = _deepspeed_classes()
    for file in files:
        loaded = _load(file, classes)  # a damaged or unsafe file is named here, before DeepSpeed reads it
        if file == model_files[0]:
            hyper_parameters = _hyper_parameters(loaded, file)
    try:
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    except Exception as error:  # inconsistent shards (another run's, a missing process's)
        raise CheckpointError(f"{shards}: DeepSpeed cannot merge this checkpoint's shards: {error}") from None
    return Checkpoint(folder, "deepspeed", hyper_parameters, dict(state_dict))


# torch's distributed-checkpoint metadata (``.metadata``) is a plain pickle: read only with these classes
DCP_MODULES = ("torch.distributed.checkpoint.", "torch.serialization", "pathlib", "collections")
DCP_NAMES = {("torch", "Size")} | {("torch", str(dtype).removeprefix("torch.")) for dtype in
                                   (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                    torch.int32, torch.int8, torch.uint8, torch.bool)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in DCP_NAMES or module.startswith(DCP_MODULES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _read_fsdp_sharded(checkpoint: Checkpoint, policy: torch.nn.Module) -> None:
    """Fill ``policy`` from an FSDP sharded folder (torch's distributed checkpoint), in this process."""
    import torch.distributed.checkpoint as dcp

    metadata = checkpoint.path / ".metadata"
    try:
        _MetadataUnpickler(io.BytesIO(metadata.read_bytes())).load()
    except Exception as error:
        raise CheckpointError(f"{metadata}: not a distributed checkpoint's metadata this export reads ({error})") \
            from None
    target = {POLICY_PREFIX + key: value for key, value in policy.state_dict().items()}
    try:
        dcp.load({"model": target}, checkpoint_id=str(checkpoint.path), no_dist=True)
    except Exception as error:
        raise CheckpointError(f"{checkpoint.path}: its parameters do not fit model.policy: {error}") from None


# --- the export ---------------------------------------------------------------------------------------


def policy_settings(checkpoint: Checkpoint, configs: list[str] = ()) -> PolicyConfig:
    """The checkpoint's ``model.policy``, overridden by ``model.policy`` of each ``--config`` (the last wins)."""
    settings = dict(checkpoint.hyper_parameters["policy"])
    for config in configs:
        override = ((yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}).get("policy") or {}
        settings.update(override)
    settings["gradient_checkpointing"] = False  # loading for export only
    return coerce(PolicyConfig, settings, "model.policy")


def load_policy_state(policy: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """The checkpoint's parameters into ``policy`` (built from its settings): every key must match."""
    if checkpoint.state_dict is None:
        return _read_fsdp_sharded(checkpoint, policy)
    state = {}
    for key, value in checkpoint.state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(POLICY_PREFIX):
            state[key[len(POLICY_PREFIX):]] = value
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if missing or unexpected or not state:
        problems = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                    "no policy parameters" if not state else ""]
        raise CheckpointError(f"{checkpoint.path}: its parameters do not fit model.policy "
                              f"({', '.join(p for p in problems if p)}); another model or LoRA setting? "
                              "(--config overrides the checkpoint's)")


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, configs: list[str] = (),
                      merge: bool = False) -> Path:
    """Write ``ckpt``'s policy as ``model.export_final`` would, to ``out`` (atomically; never over an existing one)."""
    from dapo_lightning.models import build_policy, export_pretrained

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; export to a new folder")
    checkpoint = read_checkpoint(ckpt)
    settings = policy_settings(checkpoint, configs)
    if merge and settings.lora is None:
        raise ValueError(f"--merge: {checkpoint.path} has no LoRA adapter (model.policy.lora is null); its export is "
                         "already a full model")
    policy, _, processor = build_policy(settings, with_reference=False)
    load_policy_state(policy, checkpoint)
    policy.eval()
    if merge:
        policy = policy.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        export_pretrained(policy, processor, staging)
        os.rename(staging, out)  # fails when --out appeared meanwhile (a non-empty folder, a file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    storage.fsync_folder(out.parent)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dapo-lightning export",
        description="Write a checkpoint's policy (or LoRA adapter) with its processor and generation config, as the "
                    "end of a fit does, loadable by from_pretrained.",
        epilog="Reads a Lightning .ckpt, a DeepSpeed checkpoint folder or an FSDP sharded folder.")
    parser.add_argument("--ckpt", required=True, help="the checkpoint: a .ckpt file or a DeepSpeed/FSDP folder")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--config", action="append", default=[],
                        help="a fit config whose model.policy overrides the checkpoint's (repeatable; the last wins)")
    parser.add_argument("--merge", action="store_true", help="LoRA: merge the adapter into its base (a full model)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, args.config, merge=args.merge)
    except (CheckpointError, FileExistsError, ValueError) as error:
        print(f"dapo-lightning export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
