"""``DAPOModule``: rollout -> score -> update, for a vision-language policy.

Each training step takes B prompts (with their images), samples G completions per
prompt, scores them with the configured rewards, turns the scores into group
advantages and takes ``num_iterations`` optimizer steps on the clipped DAPO loss.

How this departs from the DAPO paper and from GRPO (the config key that turns each off):
- clip-higher, ``epsilon_high`` 0.28 > ``epsilon_low`` 0.2 (``model.loss.epsilon_high: 0.2``);
- token-level normalisation over the whole step (``model.loss.loss_type: grpo``);
- soft overlong punishment as the ``length`` reward (drop it from ``model.rewards.reward_funcs``);
- dynamic sampling and the replay buffer are callbacks (remove them from ``trainer.callbacks``);
- the attention-grounding reward ``vgr`` needs the ``AttentionMetrics`` callback;
  per-token advantage weights come from the ``TokenWeights`` callback;
- no KL term by default (``model.loss.beta`` > 0 adds one to the frozen initial policy).

The module only orchestrates; the math lives in ``loss.py``, ``advantages.py``,
``scoring.py`` and ``rollout.py``, and diagnostics live in callbacks that read and
annotate the ``RolloutBatch`` at the hook points of ``hooks.py``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from torch import Tensor
from torchmetrics import MeanMetric

from dapo_lightning import checkpointing, guards, hooks, storage
from dapo_lightning.advantages import frac_zero_std
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.config import LoraSettings, LossConfig, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig
from dapo_lightning.loss import dapo_policy_loss, micro_batch_scale
from dapo_lightning.models import apply_lora, load_policy, load_processor
from dapo_lightning.rewards import get_reward_spec
from dapo_lightning.rewards.accuracy import accuracy as accuracy_reward
from dapo_lightning.rollout import (
    SamplingSettings,
    TokenIds,
    completion_logps,
    completion_logps_shared,
    decodes_with_hooks,
    generate,
    supports_shared_prompt,
)
from dapo_lightning.scoring import score

log = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    """``model.optim.max_bad_steps`` training steps in a row had a NaN or inf; a checkpoint was saved first."""


def _coerce(cls, value):
    """Accept a dataclass instance or a plain dict (as stored in a checkpoint's hyper-parameters)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in value.items() if k in known}
        if cls is PolicyConfig and isinstance(kwargs.get("lora"), dict):
            kwargs["lora"] = LoraSettings(**kwargs["lora"])
        return cls(**kwargs)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


class DAPOModule(LightningModule):
    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        rewards: RewardConfig = RewardConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        export_final: bool = True,
    ):
        """
        Args:
            policy: The model to train and how it is loaded.
            rollout: Sampling of completions (train and validation).
            rewards: Reward functions, weights and advantage scaling.
            loss: The clipped policy-gradient objective.
            optim: Optimizer, schedule, updates per rollout and micro-batching.
            export_final: Save the trained policy (or LoRA adapter) with its processor to ``<default_root_dir>/final``
                (``final-1``, ``final-2``, ... when taken: nothing is overwritten).
        """
        super().__init__()
        self.policy_cfg = _coerce(PolicyConfig, policy)
        self.rollout_cfg = _coerce(RolloutConfig, rollout)
        self.reward_cfg = _coerce(RewardConfig, rewards)
        self.loss_cfg = _coerce(LossConfig, loss)
        self.optim_cfg = _coerce(OptimConfig, optim)
        self.export_final = export_final
        self.save_hyperparameters(
            {
                "policy": asdict(self.policy_cfg),
                "rollout": asdict(self.rollout_cfg),
                "rewards": asdict(self.reward_cfg),
                "loss": asdict(self.loss_cfg),
                "optim": asdict(self.optim_cfg),
                "export_final": export_final,
            }
        )
        self.automatic_optimization = False
        self.reward_specs = [get_reward_spec(name) for name in self.reward_cfg.reward_funcs]
        self.policy = None
        self.processor = None
        self._reference: list = []  # frozen copy for beta > 0, kept out of the state dict
        self.val_accuracy = MeanMetric()
        self.val_reward = MeanMetric()
        self.val_rewards = torch.nn.ModuleDict({self._metric_key(s.name): MeanMetric() for s in self.reward_specs})
        self.accuracy_before_training: float | None = None
        self._rng_to_restore: dict | None = None
        self.bad_steps = 0  # training steps skipped for non-finite values, in all
        self.consecutive_bad_steps = 0
        self._extra_faults: list[guards.Fault] = []  # faults of this step's extra train rollouts (dynamic sampling)

    # --- model ----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        cfg = self.policy_cfg
        model = load_policy(
            cfg.model_name_or_path,
            dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
        if cfg.freeze_vision_tower:
            for p in model.model.visual.parameters():
                p.requires_grad_(False)
        if self.loss_cfg.beta > 0 and cfg.lora is None:
            reference = load_policy(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                    trust_remote_code=cfg.trust_remote_code)
            self._reference = [reference.eval().requires_grad_(False)]
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora is not None:
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
            model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                               target_modules=cfg.lora.target_modules)
        self.policy = model.train()  # from_pretrained returns eval mode
        self.processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.token_ids = TokenIds.from_tokenizer(self.processor.tokenizer, getattr(model, "generation_config", None))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @contextmanager
    def _eval_mode(self):
        was_training = self.policy.training
        self.policy.eval()
        try:
            yield
        finally:
            self.policy.train(was_training)

    # --- fit-time checks --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Before any checkpoint is read or written: crash-safe writes, weights_only reads (storage.py).
        storage.install_atomic_checkpoint_io(self.trainer)

    def check_output_folders(self) -> None:
        """Probe-write every folder this run writes to (rank 0 writes them all); an error names the folder.

        Every process raises the same error (a broadcast), so none waits forever for a dead rank 0.
        """
        trainer = self.trainer
        problem = None
        log_dir = trainer.log_dir if trainer.loggers else None  # a collective under DDP: every process asks
        if trainer.is_global_zero:
            folders = {"output folder (trainer.default_root_dir)": trainer.default_root_dir}
            if log_dir:
                folders["log folder"] = log_dir
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "dirpath", None):
                    folders["checkpoint folder"] = callback.dirpath
            try:
                for what, folder in folders.items():
                    storage.probe_writable(folder, what)
            except OSError as error:
                problem = (error.errno, error.strerror)
            free = storage.free_bytes(trainer.default_root_dir) if problem is None else None
            need = storage.checkpoint_bytes(self.policy) if self.policy is not None else 0
            if trainer.checkpoint_callbacks and free is not None and free < need:
                rank_zero_warn(f"{free / 2**30:.1f} GiB free where this run writes; a checkpoint of this model "
                               f"takes about {need / 2**30:.1f} GiB (and is written beside the previous one)")
        problem = trainer.strategy.broadcast(problem)
        if problem is not None:
            raise OSError(*problem)

    def on_fit_start(self) -> None:
        self.check_output_folders()
        provided = hooks.provided_extras(self.trainer)
        for spec, weight in zip(self.reward_specs, self.reward_cfg.weights):
            missing = [key for key in spec.needs if key not in provided]
            if missing and weight != 0:
                hint = f"; add {spec.provider_hint} to trainer.callbacks" if spec.provider_hint else ""
                raise ValueError(
                    f"model.rewards.reward_funcs: reward {spec.name!r} (weight {weight}) needs per-sample "
                    f"{', '.join(missing)} values that no callback provides{hint}"
                )
        problem = deepspeed_accumulation_problem(getattr(self.trainer.strategy, "config", None), self.optim_cfg)
        if type(self.trainer.strategy).__name__ == "DeepSpeedStrategy" and problem:
            raise ValueError(problem)
        self.export_dir = _free_folder(Path(self.trainer.default_root_dir) / "final")
        if self._reference:
            self._reference[0].to(self.device)

    # --- checkpoints: random-number state and the config the state belongs to -----------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves no generator state and only rank 0's copy: gather every rank's (index = rank).
        checkpoint["rng_states"] = checkpointing.gather_per_rank(checkpointing.capture_rng())
        checkpoint["bad_steps"] = {"total": self.bad_steps, "consecutive": self.consecutive_bad_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.check_same_config(checkpoint.get("hyper_parameters"), self.hparams)
        changes = checkpointing.changed_settings(checkpoint.get("hyper_parameters"), self.hparams)
        if message := checkpointing.describe_changed_settings(changes):
            rank_zero_warn(message)
        counts = checkpoint.get("bad_steps") or {}
        self.bad_steps, self.consecutive_bad_steps = int(counts.get("total", 0)), int(counts.get("consecutive", 0))
        states = checkpoint.get("rng_states") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._rng_to_restore = states[rank] if rank < len(states) else None
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        if self._rng_to_restore is not None and progress.get("is_last_batch"):
            # The checkpoint closed an epoch: the next epoch's loader draws its order from these states, as the
            # uninterrupted run's did. Mid-epoch, the loader is re-created on resume (the uninterrupted run's is
            # not), so the states are restored after it, at train start.
            checkpointing.restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            checkpointing.restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def on_validation_start(self) -> None:
        # Validation samples from the same generators; isolating it keeps training's draws independent of the
        # evaluation cadence (and a resumed run, which skips the sanity check, equal to an uninterrupted one).
        self._rng_before_validation = checkpointing.capture_rng()

    def on_validation_end(self) -> None:
        state = getattr(self, "_rng_before_validation", None)
        if state is not None:
            checkpointing.restore_rng(state)
            self._rng_before_validation = None

    # --- the step ---------------------------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        self._extra_faults = []
        rollout = self.make_rollout(batch, stage="train")  # generate, annotate, score (hooks run inside)
        metrics = self.update(rollout)  # num_iterations optimizer steps on the DAPO loss (skipped on NaN/inf)
        rollout.timings["step"] = time.perf_counter() - start
        hooks.call_hook(self.trainer, "on_rollout_update_end", self, rollout, metrics)
        self.log_rollout(rollout, metrics, skipped=batch.num_skipped)
        self._stop_after_too_many_bad_steps(rollout)

    def sampling(self, stage: str) -> SamplingSettings:
        cfg = self.rollout_cfg
        greedy = stage != "train" and cfg.eval_greedy
        return SamplingSettings(
            num_generations=cfg.num_generations if stage == "train" else (1 if greedy else cfg.eval_num_generations),
            max_new_tokens=cfg.max_completion_length,
            min_new_tokens=cfg.min_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            greedy=greedy,
        )

    def sample(self, batch: PromptBatch, stage: str, tag: str | None = None) -> RolloutBatch:
        """G completions per prompt from the policy (in eval mode, no grad), with the generation captures on."""
        settings = self.sampling(stage)
        captures = []
        if decodes_with_hooks(self.policy, self.rollout_cfg.shared_prompt):
            captures = hooks.generation_captures(self.trainer, self, batch, settings, stage, tag)
        with ExitStack() as stack, self._eval_mode():
            for capture in captures:
                stack.enter_context(capture)
                capture.before_generation(batch, settings.num_generations)

            def on_decode_step(step: int, attention_mask: Tensor) -> None:
                for capture in captures:
                    capture.before_decode_step(step, attention_mask)

            return generate(self.policy, batch, self.tokenizer, settings, self.token_ids, stage=stage,
                            shared_prompt=self.rollout_cfg.shared_prompt,
                            on_decode_step=on_decode_step if captures else None)

    def make_rollout(self, batch: PromptBatch, stage: str, tag: str | None = None) -> RolloutBatch:
        """Sample completions for ``batch`` and score them; callbacks run at their hook points.

        ``tag`` marks a rollout a callback asked for besides the step's own (``rollout.tag``):
        callbacks that act once per step (replay buffer, logs) skip tagged rollouts.
        """
        start = time.perf_counter()
        rollout = self.sample(batch, stage, tag)
        rollout.tag = tag
        rollout.timings.setdefault("generate", time.perf_counter() - start)
        rollout.reward_names = [s.name for s in self.reward_specs]
        rollout.reward_weights = torch.tensor(self.reward_cfg.weights, dtype=torch.float32, device=self.device)
        start = time.perf_counter()
        self.teacher_forced_pass(rollout)
        rollout.timings["teacher_forced"] = time.perf_counter() - start
        hooks.call_hook(self.trainer, "on_rollout_generated", self, rollout)
        start = time.perf_counter()
        score(
            rollout,
            self.reward_specs,
            scale_rewards=self.reward_cfg.scale_rewards,
            extra_kwargs={
                "max_completion_length": self.rollout_cfg.max_completion_length,
                "soft_punish_cache": self.reward_cfg.soft_punish_cache,
            },
            batch_std=self._global_std if stage == "train" else None,  # validation shards are uneven: no collectives
            on_reward_error=self.reward_cfg.on_reward_error,
        )
        if stage == "train" and tag is not None:  # groups of extra rollouts (dynamic sampling) may join the step's
            self._extra_faults.extend(replace(f, tensor=f"{tag}: {f.tensor}") for f in rollout.faults)
        rollout.timings["score"] = time.perf_counter() - start
        if stage == "train" and tag is None:
            rollout.sampled = self.sampled_metrics(rollout)
        hooks.call_hook(self.trainer, "on_rollout_scored", self, rollout)
        return rollout

    def row_chunks(self, num_rows: int) -> list[list[int]]:
        size = self.optim_cfg.micro_batch_size or num_rows
        return [list(range(i, min(i + size, num_rows))) for i in range(0, num_rows, size)]

    @torch.no_grad()
    def teacher_forced_pass(self, rollout: RolloutBatch) -> None:
        """One no-grad forward over prompt + completion, when anything needs it.

        It yields the sampling policy's log-probs (needed for num_iterations > 1 and by
        callbacks that keep rollouts, like the replay buffer), the reference log-probs
        (beta > 0), and carries callbacks' captures (attention statistics).
        """
        train = rollout.stage == "train"
        captures = hooks.captures(self.trainer, self, rollout)
        need_old = train and (self.optim_cfg.num_iterations > 1 or hooks.any_needs_old_logps(self.trainer))
        need_ref = train and self.loss_cfg.beta > 0
        if not (captures or need_old or need_ref):
            return
        T = rollout.completion_ids.shape[1]
        old, ref = [], []
        with self._eval_mode():
            if captures or need_old:
                with ExitStack() as stack:
                    for capture in captures:
                        stack.enter_context(capture)
                    for rows in self.row_chunks(rollout.num_rows):
                        if captures:  # prepared with the full inputs; the forward itself may share the prompt
                            inputs = rollout.model_inputs(rows)
                            for capture in captures:
                                if hasattr(capture, "before_forward"):
                                    capture.before_forward(rows, inputs)
                        old.append(_pad_right(self.completion_logps(rollout, rows).logps, T))
            if need_ref:  # outside the captures: a LoRA reference runs through the same attention modules
                for rows in self.row_chunks(rollout.num_rows):
                    ref.append(_pad_right(self._reference_logps(rollout, rows), T))
        if need_old:
            rollout.old_logps = torch.cat(old)  # [N, T]
        if need_ref:
            rollout.ref_logps = torch.cat(ref)  # [N, T]

    def _logps(self, inputs: dict[str, Tensor], with_entropy: bool = False):
        return completion_logps(self.policy, inputs, temperature=self.rollout_cfg.temperature, with_entropy=with_entropy)

    @property
    def shares_prompts(self) -> bool:
        """Whether log-prob passes run each prompt once (gradient checkpointing recomputes layers: no shared cache)."""
        return (self.rollout_cfg.shared_prompt and not self.policy_cfg.gradient_checkpointing
                and supports_shared_prompt(self.policy))

    def completion_logps(self, rollout: RolloutBatch, rows: list[int], *, with_entropy: bool = False, model=None):
        """Log-probs of the completions of ``rows`` under ``model`` (the policy by default), [n, T']."""
        model = self.policy if model is None else model
        temperature = self.rollout_cfg.temperature
        if self.shares_prompts:
            return completion_logps_shared(model, rollout, rows, temperature=temperature, with_entropy=with_entropy)
        return completion_logps(model, rollout.model_inputs(rows), temperature=temperature, with_entropy=with_entropy)

    def _reference_logps(self, rollout: RolloutBatch, rows: list[int]) -> Tensor:
        if self._reference:
            return self.completion_logps(rollout, rows, model=self._reference[0]).logps
        with self.policy.disable_adapter():  # LoRA: the base model is the reference
            return self.completion_logps(rollout, rows).logps

    def update(self, rollout: RolloutBatch) -> dict[str, float]:
        """``num_iterations`` optimizer steps of the DAPO loss over the rollout, in micro-batches.

        Non-finite values (``guards.py``) skip the step: no optimizer step, gradients dropped,
        and no scheduler step either, so the learning-rate schedule follows the optimizer
        steps actually taken (Lightning's ``global_step`` counts those too, so a skipped step
        does not count towards ``max_steps``). The faults are logged with their rows and
        kept in ``rollout.faults``. The decision is all-reduced, so every process skips
        together (DDP would otherwise diverge).
        """
        start = time.perf_counter()
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        cfg = self.loss_cfg
        chunks = self.row_chunks(rollout.num_rows)
        # DDP all-reduces every backward, so every process must make the same number of them even when its
        # rollout has fewer rows (skipped bad rows): the missing micro-batches back-propagate a zero loss.
        padding_chunks = int(self._global_max(torch.tensor(float(len(chunks)), device=self.device))) - len(chunks)
        scale = micro_batch_scale(cfg.loss_type, len(chunks))
        # SPEC 5: dapo divides by the step's valid tokens over all micro-batches and processes, per process.
        normalizer = self._global_sum(rollout.completion_mask.sum().float()) / self.trainer.world_size
        totals: dict[str, float] = {}
        tokens_seen = 0.0
        faults = [*rollout.faults, *getattr(self, "_extra_faults", []), *guards.rollout_faults(rollout)]
        skipped = self._any_process(bool(faults))
        for iteration in range(0 if skipped else self.optim_cfg.num_iterations):
            for rows in chunks:
                lp = self.completion_logps(rollout, rows, with_entropy=iteration == 0)
                width = lp.logps.shape[1]
                idx = torch.tensor(rows, device=self.device)
                old = rollout.old_logps[idx, :width] if rollout.old_logps is not None else lp.logps.detach()
                advantages = rollout.advantages[idx]  # [n]
                if rollout.token_weights is not None:
                    advantages = advantages.unsqueeze(-1) * rollout.token_weights[idx, :width]  # [n, T']
                out = dapo_policy_loss(
                    lp.logps,
                    old,
                    advantages,
                    lp.mask,
                    epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high,
                    importance_sampling_level=cfg.importance_sampling_level,
                    loss_type=cfg.loss_type,
                    normalizer=normalizer,
                    max_completion_length=self.rollout_cfg.max_completion_length,
                    beta=cfg.beta,
                    ref_logps=None if rollout.ref_logps is None else rollout.ref_logps[idx, :width],
                )
                chunk_faults = guards.row_fault("logps", lp.logps.detach(), lp.mask, rows)
                if not torch.isfinite(out.loss.detach()):
                    chunk_faults.append(guards.Fault("loss", tuple(rows)))
                faults += [f.located(rollout.prompts.index, rollout.num_generations) for f in chunk_faults]
                # a bad micro-batch back-propagates zero instead (same number of backward passes on every process)
                self.manual_backward(self._zero_loss() if chunk_faults else out.loss * scale)
                if iteration == 0:
                    n = float(out.num_tokens)
                    tokens_seen += n
                    totals["loss"] = totals.get("loss", 0.0) + float(out.loss.detach()) * scale
                    for key, value in out.metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * n
                    totals["entropy"] = totals.get("entropy", 0.0) + float((lp.entropy * lp.mask).sum())
            for _ in range(padding_chunks):
                self.manual_backward(self._zero_loss())
            gradients = guards.gradient_fault(self.policy.named_parameters())
            faults += [gradients] if gradients is not None else []
            if self._any_process(bool(faults)):
                optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            totals.setdefault("grad_norm", self._clip_gradients(optimizer))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        rollout.faults = faults
        self._count_step(skipped, faults, rollout)
        metrics = {k: (v if k in ("loss", "grad_norm") else v / max(tokens_seen, 1.0)) for k, v in totals.items()}
        metrics["bad_steps"] = float(self.bad_steps)
        rollout.timings["update"] = time.perf_counter() - start
        return metrics

    def _zero_loss(self) -> Tensor:
        return sum((p * 0).sum() for p in self.policy.parameters() if p.requires_grad)

    def _any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (one all-reduce under DDP)."""
        value = torch.tensor(float(flag), device=self.device)
        if self._distributed():
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value > 0)

    def _count_step(self, skipped: bool, faults: list[guards.Fault], rollout: RolloutBatch) -> None:
        if not skipped:
            self.consecutive_bad_steps = 0
            return
        self.bad_steps += 1
        self.consecutive_bad_steps += 1
        found = "; ".join(f.describe() for f in faults) or "on another process"
        log.warning(rank_prefixed_message(
            f"step {self.global_step}: skipped ({self.consecutive_bad_steps} in a row), non-finite {found}",
            self.global_rank,
        ))

    def _stop_after_too_many_bad_steps(self, rollout: RolloutBatch) -> None:
        limit = self.optim_cfg.max_bad_steps
        if limit is None or self.consecutive_bad_steps < limit:
            return
        folder = next((Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)),
                      Path(self.trainer.default_root_dir))
        path = folder / f"bad-steps-step={self.global_step}.ckpt"
        self.trainer.save_checkpoint(path)  # every process: the decision was all-reduced
        found = "; ".join(f.describe() for f in rollout.faults) or "on another process"
        raise NonFiniteStepError(
            f"{self.consecutive_bad_steps} training steps in a row had non-finite values (model.optim.max_bad_steps="
            f"{limit}); the last: {found}. Skipped steps leave the weights as they were: the state is saved to "
            f"{path}. Find the cause (a reward returning NaN or inf, a too high model.optim.learning_rate, "
            f"bfloat16 overflow), then resume with --ckpt_path {path}"
        )

    def _clip_gradients(self, optimizer) -> float:
        max_norm = self.optim_cfg.max_grad_norm
        strategy = self.trainer.strategy
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            # gradients are already averaged over processes here, so every rank computes the same norm
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
            return float(norm)
        if max_norm is not None and type(strategy).__name__ != "DeepSpeedStrategy":  # DeepSpeed clips in its config
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        return math.nan

    # --- distributed helpers ----------------------------------------------------------------------------

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1

    def _global_sum(self, value: Tensor) -> Tensor:
        value = value.detach().clone()
        if self._distributed():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def _global_max(self, value: Tensor) -> Tensor:
        value = value.detach().clone()
        if self._distributed():
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def _global_std(self, rewards: Tensor) -> Tensor:
        if not self._distributed():
            return rewards.std()
        gathered = self.all_gather(rewards.detach())  # [W, N]
        return gathered.reshape(-1).std()

    # --- logging ----------------------------------------------------------------------------------------

    @staticmethod
    def _metric_key(name: str) -> str:
        return name.replace(".", "_").replace(":", "_")

    def rollout_accuracy(self, rollout: RolloutBatch) -> Tensor:
        """Per-row accuracy (the ``accuracy`` reward's column, computed here when it is not configured)."""
        if "accuracy" in rollout.reward_names:
            return rollout.rewards_per_func[:, rollout.reward_names.index("accuracy")].nan_to_num(0.0)
        values = accuracy_reward(rollout.completions, **rollout.row_columns())
        return torch.tensor(values, dtype=torch.float32, device=rollout.completion_ids.device)

    def rollout_metrics(self, rollout: RolloutBatch) -> dict[str, Tensor]:
        lengths = rollout.completion_lengths.float()
        metrics = {
            "reward_mean": rollout.rewards.mean(),
            "reward_std": rollout.rewards.std() if rollout.num_rows > 1 else torch.zeros(()),
            "accuracy": self.rollout_accuracy(rollout).mean(),
            "completion_length/mean": lengths.mean(),
            "completion_length/min": lengths.min(),
            "completion_length/max": lengths.max(),
            "completion_length/clipped_ratio": rollout.truncated.float().mean(),
        }
        if rollout.num_generations >= 2:
            metrics["frac_reward_zero_std"] = frac_zero_std(rollout.rewards, rollout.num_generations)
        for k, name in enumerate(rollout.reward_names):
            column = rollout.rewards_per_func[:, k]
            valid = ~column.isnan()
            metrics[f"rewards/{name}/mean"] = column[valid].mean() if valid.any() else torch.tensor(math.nan)
            metrics[f"rewards/{name}/std"] = column[valid].std() if valid.sum() > 1 else torch.zeros(())
            metrics[f"reward_weights/{name}"] = rollout.reward_weights[k]
        return metrics

    def sampled_metrics(self, rollout: RolloutBatch) -> dict[str, float]:
        """What the policy did on this step's fresh prompts: logged as ``train/sampled/*``.

        ``train/reward_mean`` and ``train/accuracy`` describe the batch that was trained on, into
        which the replay buffer and dynamic sampling swap groups (kept for their high or varied
        rewards); these do not, so their curves compare across those ablations.
        """
        metrics = {"reward_mean": float(rollout.rewards.mean()), "accuracy": float(self.rollout_accuracy(rollout).mean())}
        if rollout.num_generations >= 2:
            metrics["frac_reward_zero_std"] = float(frac_zero_std(rollout.rewards, rollout.num_generations))
        return metrics

    def log_rollout(self, rollout: RolloutBatch, update: dict[str, float], skipped: int = 0) -> None:
        metrics = {k: v.detach().float().cpu() for k, v in self.rollout_metrics(rollout).items()}
        metrics.update({f"sampled/{k}": torch.tensor(v) for k, v in rollout.sampled.items()})
        tokens = float(rollout.completion_mask.sum())
        step_time = rollout.timings.get("step", math.nan)
        metrics.update({k: torch.tensor(float(v)) for k, v in update.items()})
        metrics["completion_tokens_per_second"] = torch.tensor(tokens / step_time if step_time > 0 else math.nan)
        metrics["learning_rate"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        metrics["skipped_rows"] = torch.tensor(float(skipped))
        for name in rollout.reward_names:
            metrics[f"reward_errors/{name}"] = torch.tensor(float(rollout.reward_errors.get(name, 0)))
        for phase, seconds in rollout.timings.items():
            metrics[f"time/{phase}"] = torch.tensor(seconds)
        metrics = self._reduce_across_ranks(metrics)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False, batch_size=len(rollout.prompts))
        self.log("reward", metrics["reward_mean"], prog_bar=True, logger=False, on_step=True, batch_size=1)
        self.log("acc", metrics["accuracy"], prog_bar=True, logger=False, on_step=True, batch_size=1)

    def _reduce_across_ranks(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """One all-gather for every scalar: min of mins, max of maxes, sum of counts, mean of the rest."""
        if not self._distributed():
            return metrics
        keys = sorted(metrics)
        stacked = torch.stack([metrics[k].float() for k in keys]).to(self.device)
        gathered = self.all_gather(stacked).cpu()  # [W, M]
        out = {}
        for i, key in enumerate(keys):
            column = gathered[:, i]
            if key.endswith("/min"):
                out[key] = column.min()
            elif key.endswith("/max"):
                out[key] = column.max()
            elif key == "skipped_rows" or key.startswith("reward_errors/"):
                out[key] = column.sum()
            else:
                out[key] = column.nanmean()
        return out

    # --- validation -------------------------------------------------------------------------------------

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if len(batch) == 0:  # every row of this batch was unusable and skipped
            return
        rollout = self.make_rollout(batch, stage="val")
        self.val_accuracy.update(self.rollout_accuracy(rollout))
        self.val_reward.update(rollout.rewards)
        for k, spec in enumerate(self.reward_specs):
            column = rollout.rewards_per_func[:, k]
            if (~column.isnan()).any():
                self.val_rewards[self._metric_key(spec.name)].update(column[~column.isnan()])

    def on_validation_epoch_end(self) -> None:
        accuracy = float(self.val_accuracy.compute())
        values = {"val/accuracy": accuracy, "val/reward_mean": float(self.val_reward.compute())}
        for spec in self.reward_specs:  # every process computes every metric: compute() synchronises
            value = float(self.val_rewards[self._metric_key(spec.name)].compute())
            if not math.isnan(value):
                values[f"val/rewards/{spec.name}/mean"] = value
        for metric in (self.val_accuracy, self.val_reward, *self.val_rewards.values()):
            metric.reset()
        if self.trainer.sanity_checking:
            self.accuracy_before_training = accuracy
            rank_zero_info(f"[eval] before training: accuracy {accuracy:.3f}")
            return
        self.log_dict(values, sync_dist=False, rank_zero_only=False)
        rank_zero_info(f"[eval] step {self.global_step}: accuracy {accuracy:.3f}, reward {values['val/reward_mean']:.3f}")

    # --- optimizer --------------------------------------------------------------------------------------

    def total_optimizer_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return int(self.trainer.estimated_stepping_batches) * self.optim_cfg.num_iterations

    def configure_optimizers(self):
        cfg = self.optim_cfg
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay
        )
        total = max(self.total_optimizer_steps(), 1)
        warmup = int(total * cfg.warmup_ratio)
        kind = cfg.lr_scheduler

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if kind == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            if kind == "linear":
                return 1.0 - progress
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- export -----------------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        if not self.export_final or self.trainer.interrupted or self.trainer.global_rank != 0:
            return
        target = self.export_dir
        target.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(target)
        self.processor.save_pretrained(target)
        rank_zero_info(f"saved the trained {'adapter' if self.policy_cfg.lora else 'policy'} to {target}")
        if self.accuracy_before_training is not None and self.trainer.callback_metrics.get("val/accuracy") is not None:
            after = float(self.trainer.callback_metrics["val/accuracy"])
            rank_zero_info(f"[eval] accuracy before training {self.accuracy_before_training:.3f} -> after {after:.3f}")


def deepspeed_accumulation_problem(config: dict | None, optim: OptimConfig) -> str | None:
    """Why a DeepSpeed config would train on the wrong gradient with this module's micro-batches, or None.

    ``update`` calls backward once per micro-batch and steps once. With DeepSpeed's managed
    accumulation and gradient_accumulation_steps 1 (what Lightning sets), every backward is an
    accumulation boundary, and ZeRO-2 resets its gradient partition there: only the last
    micro-batch's gradient reaches the optimizer. ``"managed_gradient_accumulation": false``
    (DeepSpeed >= 0.19) makes ``step()`` the boundary instead.
    """
    if not config or optim.micro_batch_size is None:
        return None  # one backward per optimizer step: any accumulation mode is right
    if config.get("managed_gradient_accumulation", True) is not False:
        return (
            'trainer.strategy: the DeepSpeed config must set "managed_gradient_accumulation": false when '
            "model.optim.micro_batch_size splits a step into several backward passes (with managed accumulation "
            "ZeRO keeps only the last micro-batch's gradient); see configs/deepspeed_zero2.json"
        )
    import deepspeed.runtime.config as ds_config

    if not hasattr(ds_config, "get_managed_gradient_accumulation"):
        return (
            'trainer.strategy: this DeepSpeed ignores "managed_gradient_accumulation"; install a DeepSpeed that '
            "supports it (0.19.8 does) or set model.optim.micro_batch_size: null"
        )
    return None


def _free_folder(path: Path) -> Path:
    """``path`` if it is absent or empty, else the first free ``path-1``, ``path-2``, ... (never overwrite)."""
    candidate, n = path, 0
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _pad_right(values: Tensor, width: int, value: float = 0.0) -> Tensor:
    """[n, t] -> [n, width]"""
    if values.shape[1] == width:
        return values
    return torch.nn.functional.pad(values, (0, width - values.shape[1]), value=value)

