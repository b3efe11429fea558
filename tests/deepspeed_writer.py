"""Writes a DeepSpeed ZeRO checkpoint folder of a ``DAPOModule`` through DeepSpeed's own engine, on the CPU.

Lightning's ``DeepSpeedStrategy`` refuses the CPU, so this does what it does when it saves: the module
(``configure_model`` called, its policy perturbed so that it differs from the base model) is handed to
``deepspeed.initialize`` with torch's AdamW over its trainable parameters, and the engine saves with
Lightning's tag (``checkpoint``) and Lightning's checkpoint dict, less ``state_dict`` and
``optimizer_states``, as client state (``DeepSpeedStrategy.save_checkpoint``). The module's full
parameters after the perturbation go to ``expected.pt`` for the test to compare with.

    python -m tests.deepspeed_writer OUT MODEL_DIR [--lora] [--stage 2]
"""

from __future__ import annotations

import argparse
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("model_dir")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")

    import deepspeed
    import lightning
    import torch

    from dapo_lightning.config import LoraSettings, PolicyConfig
    from dapo_lightning.module import DAPOModule

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]) if args.lora else None
    module = DAPOModule(policy=PolicyConfig(model_name_or_path=args.model_dir, lora=lora))
    module.configure_model()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)  # a trained policy: not the base model's weights
    torch.save({k: v.clone() for k, v in module.policy.state_dict().items()}, os.path.join(args.out, "expected.pt"))
    trainable = [p for p in module.parameters() if p.requires_grad]
    config = {"zero_optimization": {"stage": args.stage}, "train_micro_batch_size_per_gpu": 1,
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(trainable, lr=1e-3), config=config,
                                      model_parameters=trainable, dist_init_required=True)
    client_state = {"epoch": 0, "global_step": 2, "pytorch-lightning_version": lightning.__version__,
                    "hyper_parameters": dict(module.hparams), "loops": {}, "callbacks": {}, "lr_schedulers": []}
    engine.save_checkpoint(os.path.join(args.out, "epoch=0-step=2.ckpt"), client_state=client_state,
                           tag="checkpoint")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
