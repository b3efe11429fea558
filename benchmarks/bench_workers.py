"""The systems under test, one process each, taking one training step whenever the parent says "go".

A worker builds its system (this project's ``DAPOModule`` under a Lightning
``Trainer``, or TRL's ``GRPOTrainer``), reports "ready", then blocks in a callback
at the start of training and after every step. The parent sends "go" to one worker
at a time, so the systems alternate step by step on an otherwise idle process set,
and each worker's peak RSS is its own. A step's time runs from "go" to the end of
the step: everything the trainer does per step (data loading and image
processing, generation, scoring, the update, logging) falls inside one such window.
"""

from __future__ import annotations

import math
import os
import resource
import time
import traceback
import warnings
from pathlib import Path

SYSTEMS = {
    "ours": "dapo-lightning (shared prompt)",
    "ours-noshare": "dapo-lightning (shared_prompt: false)",
    "trl": "TRL GRPOTrainer (stock)",
    "trl-static": "TRL GRPOTrainer (tuned: static cache)",
}
# What a competent TRL user sets for this shape on top of the matched settings (docs/performance.md says why each):
# a preallocated static KV cache for generate() instead of DynamicCache (which copies every cached key and value at
# every decode step), and dropout off (GRPO recipes' default; the benchmark model has none, so it changes no number).
TRL_TUNED = {"cache_implementation": "static", "disable_dropout": True}


def run_worker(conn, job: dict) -> None:
    """Process entry point (``multiprocessing`` spawn)."""
    try:
        _quiet()
        import torch

        torch.set_num_threads(job["threads"])
        if job["system"].startswith("trl"):
            _run_trl(conn, job)
        else:
            _run_ours(conn, job)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _quiet() -> None:
    """Keep the parent's step lines readable: library banners and progress bars off (called after the imports)."""
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "accelerate", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


class Gate:
    """The worker's side of the step protocol: block for "go", time the step, report it."""

    def __init__(self, conn, clock, sync):
        self.conn = conn
        self.clock = clock
        self.sync = sync
        self.pending: dict = {}
        self.started: float | None = None
        self.rss_start_mb = math.nan

    def ready(self, info: dict) -> None:
        self.rss_start_mb = _rss_mb()
        _reset_gpu_peak()
        self.conn.send(("ready", {**info, "rss_start_mb": self.rss_start_mb}))
        self.wait()

    def wait(self) -> None:
        message = self.conn.recv()
        if message == "finish":
            self.started = None
            return
        if message != "go":
            raise RuntimeError(f"unexpected message {message!r}")
        if self.clock is not None:
            self.clock.take()
        self.sync()
        self.started = time.perf_counter()

    def step_done(self) -> None:
        if self.started is None:
            return
        self.sync()
        seconds = time.perf_counter() - self.started
        phases = self.clock.take() if self.clock is not None else {}
        self.conn.send(("step", {"seconds": seconds, "phases": phases, **self.pending}))
        self.pending = {}
        self.wait()

    def done(self, extra: dict) -> None:
        self.conn.send(("done", {"peak_rss_mb": _peak_rss_mb(), "rss_start_mb": self.rss_start_mb,
                                 "gpu_peak_mb": _gpu_peak_mb(), **extra}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return math.nan


def _sync(device: str):
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class ParamProbe:
    """A few parameters (vision tower, first decoder layer, last parameter) to check that the step trains."""

    def __init__(self, model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        picks = [next((n, p) for n, p in named if ".visual." in f".{n}"),
                 next((n, p) for n, p in named if "layers.0.self_attn.q_proj.weight" in n),
                 named[-1]]
        self.before = {n: p.detach().to("cpu", copy=True) for n, p in picks}
        self.params = dict(picks)

    def changed(self) -> dict[str, bool]:
        return {n: not torch_equal(p.detach().cpu(), self.before[n]) for n, p in self.params.items()}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# --- this project ---------------------------------------------------------------------------------


def _run_ours(conn, job: dict) -> None:
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    import dapo_lightning.actor as actor_mod
    import dapo_lightning.data as data_mod
    import dapo_lightning.lean_decode as lean_decode_mod
    import dapo_lightning.logprobs as logprobs_mod
    import dapo_lightning.module as module_mod
    import dapo_lightning.update as update_mod
    from benchmarks.bench_setup import question_rows
    from benchmarks.phases import OTHER, PhaseClock, model_phase, vision_phase
    from dapo_lightning.config import LossConfig, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
    from dapo_lightning.data import PromptCollator, VisualMCQDataset
    from dapo_lightning.hooks import RolloutCallback
    from dapo_lightning.models import load_processor
    from dapo_lightning.module import DAPOModule

    _quiet()
    seed_everything(job["seed"], verbose=False)
    sync = _sync(job["device"])
    clock = PhaseClock(sync if job["device"] == "cuda" else None) if job["phases"] else None
    gate = Gate(conn, clock, sync)
    total = job["warmup"] + job["steps"]
    B, G, T = job["prompts"], job["generations"], job["completion_length"]

    if clock is not None:  # module-level names the step looks up at call time
        clock.patch(data_mod.PromptCollator, "__call__", "data (images, chat template, tokens)")
        clock.patch(actor_mod, "generate", "decode loop (sampling, cache, Python)")
        clock.patch(lean_decode_mod.LeanDecoder, "step", "decode forward")  # the lean step calls no module forward
        clock.patch(logprobs_mod, "selective_log_softmax", "log-softmax")
        clock.patch(logprobs_mod, "entropy_from_logits", "entropy")
        clock.patch(update_mod, "dapo_policy_loss", "loss")
        clock.patch(module_mod, "score", "rewards")

    rows = question_rows(_shape(job), B * total)
    collate = PromptCollator(load_processor(job["folder"]), source="bench", system_prompt=job["system_prompt"],
                             max_image_side=None, max_prompt_length=None, on_bad_row="error")
    loader = DataLoader(VisualMCQDataset(rows, "bench"), batch_size=B, shuffle=False, collate_fn=collate)
    module = DAPOModule(
        policy=PolicyConfig(model_name_or_path=job["folder"], dtype=job["dtype"], attn_implementation="sdpa"),
        rollout=RolloutConfig(num_generations=G, max_completion_length=T, min_completion_length=T, temperature=1.0,
                              shared_prompt=job["system"] == "ours"),
        rewards=RewardConfig(reward_funcs=["accuracy", "format"]),
        loss=LossConfig(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0),
        optim=OptimConfig(learning_rate=job["lr"], lr_scheduler="constant", max_grad_norm=1.0, num_iterations=1),
        export_final=False,
    )

    class Stepper(RolloutCallback):
        def on_train_start(self, trainer, pl_module):
            self.probe = ParamProbe(pl_module.policy)
            if clock is not None:
                clock.patch(pl_module, "manual_backward", "backward")
                clock.patch(update_mod.LightningHost, "clip_gradients", "grad clip")
                clock.patch(pl_module, "log_step", "logging")
                clock.patch(trainer.optimizers[0], "step", "optimizer step")
                clock.hook(pl_module.policy, model_phase(clock))
                clock.hook(pl_module.policy.model.visual, vision_phase(clock))
            gate.ready({"parameters": sum(p.numel() for p in pl_module.policy.parameters()),
                        "shares_prompts": pl_module.actor.shares_prompts_in_logps})

        def on_rollout_update_end(self, trainer, pl_module, rollout, result):
            lengths = rollout.completion_lengths
            gate.pending.update(tokens=int(lengths.sum()), min_length=int(lengths.min()), max_length=int(lengths.max()),
                                loss=float(result.loss), rows=rollout.num_rows)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            gate.step_done()

    stepper = Stepper()
    trainer = Trainer(
        accelerator="gpu" if job["device"] == "cuda" else "cpu", devices=1, max_steps=total, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[stepper], default_root_dir=str(Path(job["tmp"]) / job["system"]),
    )
    trainer.fit(module, train_dataloaders=loader)
    gate.done({"params_changed": stepper.probe.changed(), "other_phase": OTHER,
               "torch_threads": torch.get_num_threads()})


# --- TRL ------------------------------------------------------------------------------------------


def _run_trl(conn, job: dict) -> None:
    import torch
    import trl
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.bench_setup import question_rows, trl_dataset
    from benchmarks.phases import OTHER, PhaseClock, model_phase, vision_phase
    from dapo_lightning.models import ImageOnlyQwenVLProcessor, load_policy, load_processor
    from dapo_lightning.rewards.accuracy import accuracy
    from dapo_lightning.rewards.format import format_reward
    from dapo_lightning.rollout import VISION_SPECIAL_TOKENS

    _quiet()
    sync = _sync(job["device"])
    clock = PhaseClock(sync if job["device"] == "cuda" else None) if job["phases"] else None
    gate = Gate(conn, clock, sync)
    total = job["warmup"] + job["steps"]
    B, G, T = job["prompts"], job["generations"], job["completion_length"]

    if clock is not None:
        clock.patch(ImageOnlyQwenVLProcessor, "__call__", "data (images, chat template, tokens)")
        clock.patch(ImageOnlyQwenVLProcessor, "apply_chat_template", "data (images, chat template, tokens)")

    processor = load_processor(job["folder"])
    vocab = processor.tokenizer.get_vocab()
    model = load_policy(job["folder"], dtype=job["dtype"], attn_implementation="sdpa")
    probe = ParamProbe(model)
    dataset = trl_dataset(question_rows(_shape(job), B * total), job["system_prompt"])
    args = GRPOConfig(
        output_dir=str(Path(job["tmp"]) / "trl"),
        use_cpu=job["device"] == "cpu",
        bf16=False,  # the model is loaded in the benchmark's dtype; no autocast on either side
        fp16=False,
        seed=job["seed"],
        max_steps=total,
        per_device_train_batch_size=B * G,  # completions per optimizer step: one step per rollout
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        max_completion_length=T,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        # EOS and the vision tokens suppressed as in this project's sampler: every completion is exactly T tokens
        generation_kwargs={"min_new_tokens": T,
                           "suppress_tokens": [vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab]},
        learning_rate=job["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=1,
        scale_rewards="group",
        mask_truncated_completions=False,
        gradient_checkpointing=False,  # TRL's default is on; this project's is off
        shuffle_dataset=False,  # the same questions in the same order as the other systems
        dataloader_num_workers=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        remove_unused_columns=False,
        **(TRL_TUNED if job["system"] == "trl-static" else {}),
    )

    class Stepper(TrainerCallback):
        trainer = None

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            trainer = self.trainer
            if clock is not None:
                clock.patch(model, "generate", "decode loop (sampling, cache, Python)")
                clock.hook(model, model_phase(clock))
                clock.hook(model.model.visual, vision_phase(clock))
                clock.patch(trainer.accelerator, "backward", "backward")
                clock.patch(trainer, "_clip_grad_norm", "grad clip")
                clock.patch(optimizer, "step", "optimizer step")
                clock.patch(trainer, "_calculate_rewards", "rewards")
                clock.patch(trainer, "log", "logging")
            compute_loss = trainer._compute_loss

            def compute_loss_recorded(model_, inputs):
                loss = compute_loss(model_, inputs)
                gate.pending["loss"] = float(loss.detach())
                return loss

            trainer._compute_loss = clock.wrap(compute_loss_recorded, "loss") if clock is not None else compute_loss_recorded
            gate.ready({"parameters": sum(p.numel() for p in model.parameters()), "trl_version": trl.__version__})

        def on_step_end(self, args, state, control, **kwargs):
            metrics = self.trainer._metrics["train"]
            rows = B * G
            gate.pending.update(tokens=int(round(metrics["completions/mean_length"][-1] * rows)),
                                min_length=int(metrics["completions/min_length"][-1]),
                                max_length=int(metrics["completions/max_length"][-1]), rows=rows)
            gate.step_done()

    stepper = Stepper()
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, format_reward], args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[stepper])
    trainer.remove_callback(PrinterCallback)  # the per-step log dict on stdout (disable_tqdm=True puts it there)
    stepper.trainer = trainer
    trainer.train()
    gate.done({"params_changed": probe.changed(), "other_phase": OTHER, "torch_threads": torch.get_num_threads()})


def _shape(job: dict):
    from benchmarks.bench_setup import Shape

    fields = {k: job["shape"][k] for k in ("name", "arch", "image_side", "prompt_tokens", "description")}
    return Shape(**fields)
