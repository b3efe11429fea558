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
- no KL term by default (``model.loss.beta`` > 0 adds one to the frozen initial policy);
- no preference term among correct completions by default (``model.loss.preference_weight`` > 0, SPEC 9).

The module only orchestrates (see ``docs/architecture.md``): generation is ``rollout.py``,
log-probs ``logprobs.py``, scoring ``scoring.py``, the optimizer steps ``update.py``, the
numbers it logs ``metrics.py``, the checks before a fit ``fit_checks.py`` and
``hooks.check_callbacks``. Callbacks read and annotate the ``RolloutBatch`` at the hook
points of ``hooks.py`` and use only the members listed in ``hooks.RolloutModule``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from transformers import TrainerState

from dapo_lightning import checkpointing, distributed, evaluation, fit_checks, guards, metrics, preference, storage
from dapo_lightning.actor import Actor
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.config import LossConfig, OptimConfig, PolicyConfig, RewardConfig, RolloutConfig, coerce, default_settings
from dapo_lightning.hooks import check_callbacks, rollout_callbacks
from dapo_lightning.logprobs import LogProbs
from dapo_lightning.models import build_policy, export_trained
from dapo_lightning.optim import build_optimizer
from dapo_lightning.predictions import prediction_rows
from dapo_lightning.rewards import get_reward_spec
from dapo_lightning.scoring import score
from dapo_lightning.update import LightningHost, UpdateResult, UpdateSettings, row_chunks, update_policy

log = logging.getLogger(__name__)


class NonFiniteStepError(RuntimeError):
    """``model.optim.max_bad_steps`` training steps in a row had a NaN or inf; a checkpoint was saved first."""


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
        self.policy_cfg = coerce(PolicyConfig, policy, "model.policy")
        self.rollout_cfg = coerce(RolloutConfig, rollout, "model.rollout")
        self.reward_cfg = coerce(RewardConfig, rewards, "model.rewards")
        self.loss_cfg = coerce(LossConfig, loss, "model.loss")
        self.optim_cfg = coerce(OptimConfig, optim, "model.optim")
        self.export_final = export_final
        configs = {"policy": self.policy_cfg, "rollout": self.rollout_cfg, "rewards": self.reward_cfg,
                   "loss": self.loss_cfg, "optim": self.optim_cfg}
        self.save_hyperparameters({**{k: asdict(v) for k, v in configs.items()}, "export_final": export_final})
        self.automatic_optimization = False
        self.reward_specs = [get_reward_spec(name) for name in self.reward_cfg.reward_funcs]
        preference.check_rewards(self.loss_cfg.preference_weight, self.reward_names)  # SPEC 9 pairs correct rows
        if self.optim_cfg.steps_per_generation > self.rollout_cfg.num_generations:  # every mini-batch gets rows
            raise ValueError(f"model.optim.steps_per_generation: at most model.rollout.num_generations="
                             f"{self.rollout_cfg.num_generations}, got {self.optim_cfg.steps_per_generation}")
        self.update_settings = UpdateSettings(loss=self.loss_cfg.settings(self.rollout_cfg.max_completion_length),
                                              num_iterations=self.optim_cfg.num_iterations,
                                              steps_per_generation=self.optim_cfg.steps_per_generation,
                                              micro_batch_size=self.optim_cfg.micro_batch_size)
        self.actor: Actor | None = None  # the policy and its forward passes, made in configure_model
        self.policy = None  # the actor's model, registered here so Lightning moves, wraps and checkpoints it
        self.val_metrics = metrics.ValidationMetrics(self.reward_names)
        self.accuracy_before_training: float | None = None
        self.generators = checkpointing.GeneratorStates()
        self.bad_steps = 0  # training steps skipped for non-finite values, in all
        self.consecutive_bad_steps = 0
        self.needed_annotations: frozenset[str] = frozenset()  # set by check_callbacks at set-up

    # --- what callbacks may read (hooks.RolloutModule) ------------------------------------------------

    @property
    def tokenizer(self):
        return self.actor.tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.actor.token_ids.pad

    @property
    def policy_dtype(self) -> torch.dtype:
        return next(self.policy.parameters()).dtype

    @property
    def reward_names(self) -> list[str]:
        return [spec.name for spec in self.reward_specs]

    @property
    def num_generations(self) -> int:
        return self.rollout_cfg.num_generations

    @property
    def warmup_ratio(self) -> float:
        return self.optim_cfg.warmup_ratio

    def trainer_state(self) -> TrainerState:
        """The step as TRL's rewards receive it (``trainer_state``: global_step, max_steps, epoch; -1 outside a fit)."""
        fitting = self.trainer.state.fn == "fit"
        return TrainerState(global_step=self.global_step, max_steps=self.total_optimizer_steps() if fitting else -1,
                            epoch=float(self.current_epoch))

    def total_optimizer_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        steps_per_rollout = self.optim_cfg.num_iterations * self.optim_cfg.steps_per_generation
        return int(self.trainer.estimated_stepping_batches) * steps_per_rollout

    # --- model, checks, checkpoints -------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.actor is None:
            policy, reference, processor = build_policy(self.policy_cfg, with_reference=self.loss_cfg.beta > 0)
            self.actor = Actor(policy, reference, processor, self.policy_cfg, self.rollout_cfg)
            self.policy = policy
        self.actor.lockstep = distributed.shards_parameters(self._trainer)  # sharded: every forward is a collective

    def configure_callbacks(self):
        # The earliest hook of a fit: Lightning's loggers write before ``setup``; a full disk is an error naming it.
        fit_checks.check_folders_before_loggers(self.trainer)
        return []

    def setup(self, stage: str) -> None:
        # Before any checkpoint is read or written: crash-safe writes, weights_only reads (storage.py).
        storage.install_atomic_checkpoint_io(self.trainer)
        # Before the model loads: a configuration the callbacks or rewards cannot serve fails now.
        plan = check_callbacks(self.trainer.callbacks, self.reward_specs, self.reward_cfg.weights)
        self.needed_annotations = plan.needed_annotations | preference.needed_annotations(
            self.loss_cfg.preference_weight, self.trainer.callbacks)  # the preference term reads each row's vgr

    def on_fit_start(self) -> None:
        fit_checks.check_output_folders(self.trainer, self.policy)
        fit_checks.check_strategy(self.trainer, self.optim_cfg)
        self.export_dir = fit_checks.free_folder(Path(self.trainer.default_root_dir) / "final") if self.export_final \
            else None  # claimed now: two fits sharing a root never export to the same folder
        if self.actor.reference is not None:  # kept out of the state dict, moved here
            self.actor.reference.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.generators.save(checkpoint)
        checkpoint["bad_steps"] = {"total": self.bad_steps, "consecutive": self.consecutive_bad_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.check_same_config(checkpoint.get("hyper_parameters"), self.hparams)
        if self._trainer is None or self.trainer.state.fn == "fit":  # test and predict train nothing
            checkpointing.warn_if_nothing_left_to_train(checkpoint, self._trainer)
        changes = checkpointing.changed_settings(checkpoint.get("hyper_parameters"), self.hparams, default_settings())
        if message := checkpointing.describe_changed_settings(changes):
            rank_zero_warn(message)
        counts = checkpoint.get("bad_steps") or {}
        self.bad_steps, self.consecutive_bad_steps = int(counts.get("total", 0)), int(counts.get("consecutive", 0))
        self.generators.load(checkpoint, self.trainer.global_rank if self._trainer is not None else 0)

    def on_train_start(self) -> None:
        self.generators.restore_pending()

    def on_validation_start(self) -> None:
        self.generators.enter_validation()

    def on_validation_end(self) -> None:
        self.generators.leave_validation()

    # --- the step -------------------------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        rollout = self.generate_rollout(batch, stage="train")  # G completions per prompt, recorded and annotated
        self.score_rollout(rollout)  # rewards -> group advantages; then callbacks may move groups, weigh tokens
        result = self.update(rollout)  # num_iterations optimizer steps on the DAPO loss (skipped on NaN/inf)
        rollout.timings["step"] = time.perf_counter() - start
        for callback in rollout_callbacks(self.trainer):
            callback.on_rollout_update_end(self.trainer, self, rollout, result)
        self.log_step(rollout, result, skipped_rows=batch.num_skipped, resized_rows=batch.num_resized)
        self._stop_after_too_many_bad_steps(rollout)

    def sample(self, batch: PromptBatch, stage: str, requested_by: str | None = None) -> RolloutBatch:
        """G completions per prompt, watched by the callbacks' generation recorders (when the decoder has hooks).

        The generation seam: another generator (vLLM, a server) overrides this method.
        """
        recorders = []
        if self.actor.shares_prompts_in_generation:  # this project's decoder: recorders can watch it
            settings = self.actor.sampling(stage)
            recorders = [r for c in rollout_callbacks(self.trainer)
                         if (r := c.generation_recorder(self.trainer, self, batch, settings, stage, requested_by))]
        return self.actor.sample(batch, stage, recorders)

    def make_rollout(self, batch: PromptBatch, stage: str, requested_by: str | None = None) -> RolloutBatch:
        """Sample completions for ``batch`` and score them; callbacks run at their hook points.

        ``requested_by`` names the callback that asks for a rollout besides the step's own
        (``rollout.is_extra``): callbacks that act once per step skip such rollouts.
        """
        rollout = self.generate_rollout(batch, stage, requested_by)
        self.score_rollout(rollout)
        return rollout

    def generate_rollout(self, batch: PromptBatch, stage: str, requested_by: str | None = None) -> RolloutBatch:
        """Completions, the teacher-forced pass when needed, then ``on_rollout_generated`` (annotations, weights)."""
        callbacks = rollout_callbacks(self.trainer)
        start = time.perf_counter()
        rollout = self.sample(batch, stage, requested_by)
        rollout.requested_by = requested_by
        rollout.timings.setdefault("generate", time.perf_counter() - start)
        rollout.reward_names = self.reward_names
        rollout.reward_weights = torch.tensor(self.reward_cfg.weights, dtype=torch.float32, device=self.device)
        start = time.perf_counter()
        self.teacher_forced_pass(rollout, needs_old_logps=any(c.needs_old_logps for c in callbacks))
        rollout.timings["teacher_forced"] = time.perf_counter() - start
        for callback in callbacks:
            callback.on_rollout_generated(self.trainer, self, rollout)
        return rollout

    def score_rollout(self, rollout: RolloutBatch) -> None:
        """Rewards and group advantages (``scoring.score``), then ``on_rollout_scored`` (groups moved, token weights)."""
        start = time.perf_counter()
        extra = {"max_completion_length": self.rollout_cfg.max_completion_length,
                 "soft_punish_cache": self.reward_cfg.soft_punish_cache, "trainer_state": self.trainer_state()}
        train = rollout.stage == "train"
        score(rollout, self.reward_specs, scale_rewards=self.reward_cfg.scale_rewards,
              aggregation=self.reward_cfg.multi_objective_aggregation, extra_kwargs=extra,
              gather=distributed.gather_flat if train else None,  # uneven validation shards: no collective
              on_reward_error=self.reward_cfg.on_reward_error,
              conversational=self.reward_cfg.completions_format == "conversational")
        rollout.timings["score"] = time.perf_counter() - start
        if train and not rollout.is_extra:  # the fresh rows, before callbacks move groups
            rollout.sampled_rewards, rollout.sampled_accuracy = rollout.rewards.clone(), metrics.row_accuracy(rollout)
        for callback in rollout_callbacks(self.trainer):
            callback.on_rollout_scored(self.trainer, self, rollout)

    def teacher_forced_pass(self, rollout: RolloutBatch, needs_old_logps: bool = False) -> None:
        """The no-grad forward over prompt + completion (``Actor.teacher_forced``) when anything needs it: the old
        log-probs (num_iterations > 1, a callback that keeps rollouts), the reference's (beta > 0), a recorder."""
        train = rollout.stage == "train"
        callbacks = rollout_callbacks(self.trainer)
        recorders = [r for c in callbacks if (r := c.teacher_forced_recorder(self.trainer, self, rollout))]
        off_policy = self.optim_cfg.num_iterations > 1 or self.optim_cfg.steps_per_generation > 1  # after a step
        old = train and (off_policy or needs_old_logps)
        reference = train and self.loss_cfg.beta > 0
        if recorders or old or reference:
            chunks = row_chunks(rollout.num_rows, self.optim_cfg.micro_batch_size)
            self.actor.teacher_forced(rollout, chunks, recorders, old=old, reference=reference)

    def completion_logps(self, rollout: RolloutBatch, rows: list[int], *, with_entropy: bool = False,
                         width: int | None = None) -> LogProbs:
        """The policy's log-probs of the completions of ``rows`` (with grad in the update), [n, T']."""
        return self.actor.completion_logps(rollout, rows, with_entropy=with_entropy, width=width)

    # --- the update ------------------------------------------------------------------------------------

    def update(self, rollout: RolloutBatch) -> UpdateResult:
        """The step's optimizer steps (``update.py``); a skipped step is counted and logged with its faults."""
        start = time.perf_counter()
        result = update_policy(rollout, LightningHost(self, self.optim_cfg.max_grad_norm), self.update_settings)
        rollout.faults = result.faults
        self._count_step(result)
        rollout.timings["update"] = time.perf_counter() - start
        return result

    def _count_step(self, result: UpdateResult) -> None:
        self.consecutive_bad_steps = self.consecutive_bad_steps + 1 if result.skipped else 0
        if result.skipped:
            self.bad_steps += 1
            log.warning(rank_prefixed_message(f"step {self.global_step}: skipped ({self.consecutive_bad_steps} in a "
                                              f"row), non-finite {guards.describe_all(result.faults)}", self.global_rank))

    def _stop_after_too_many_bad_steps(self, rollout: RolloutBatch) -> None:
        limit = self.optim_cfg.max_bad_steps
        if limit is None or self.consecutive_bad_steps < limit:
            return
        folder = next((Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)),
                      Path(self.trainer.default_root_dir))
        path = folder / f"bad-steps-step={self.global_step}.ckpt"
        self.trainer.save_checkpoint(path)  # every process: the decision was all-reduced
        raise NonFiniteStepError(guards.too_many_bad_steps(self.consecutive_bad_steps, limit, rollout.faults, path))

    # --- logging and validation -----------------------------------------------------------------------

    def log_step(self, rollout: RolloutBatch, result: UpdateResult, skipped_rows: int = 0,
                 resized_rows: int = 0) -> None:
        """Every ``train/*`` scalar of the step (``metrics.step_metrics``), reduced over processes in one gather."""
        values = metrics.step_metrics(rollout, result.metrics(), learning_rate=self.optimizers().param_groups[0]["lr"],
                                      skipped_rows=skipped_rows, resized_rows=resized_rows, bad_steps=self.bad_steps)
        values = metrics.reduce_across_processes(values)
        self.log_dict({f"train/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False,
                      batch_size=len(rollout.prompts))
        self.log("reward", values["reward_mean"], prog_bar=True, logger=False, on_step=True, batch_size=1)
        self.log("acc", values["accuracy"], prog_bar=True, logger=False, on_step=True, batch_size=1)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if len(batch) == 0:  # every row of this batch was unusable and skipped
            return
        self.val_metrics.update(self.make_rollout(batch, stage="val"))

    test_step = validation_step  # a validation epoch over data.test_path, its metrics logged as test/* (evaluation.py)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict]:
        return prediction_rows(self.make_rollout(batch, stage="val")) if len(batch) else []  # predictions.py

    def on_test_epoch_start(self) -> None:
        evaluation.start_test_epoch(self.trainer, self)

    def on_test_epoch_end(self) -> None:
        evaluation.end_test_epoch(self.trainer, self)

    def log(self, name: str, value, *args, **kwargs) -> None:
        super().log(evaluation.metric_name(self._trainer, name), value, *args, **kwargs)  # val/* as test/* in test

    def on_train_epoch_end(self) -> None:
        report = getattr(self.trainer.datamodule, "report_skipped_rows", None)  # a collective: every process
        if report is not None:
            report("train")  # one line when rows were skipped (data.on_bad_row: skip)

    def on_validation_epoch_end(self) -> None:
        report = getattr(self.trainer.datamodule, "report_skipped_rows", None)  # before the sanity check returns
        skipped = report("val") if report is not None else 0
        values = {**self.val_metrics.compute(), "val/skipped_rows": float(skipped)}
        accuracy = values["val/accuracy"]
        if self.trainer.sanity_checking:  # Lightning logs nothing of its sanity check: the loggers get it here
            self.accuracy_before_training = accuracy
            for logger in self.loggers:  # each logger's log_metrics writes on rank zero only
                logger.log_metrics({key: float(value) for key, value in values.items()}, step=self.global_step)
            rank_zero_info(f"[eval] before training: accuracy {accuracy:.3f}")
            return
        # "step": Lightning logs this validation (the callbacks' val/* scalars too) at the step the console names,
        # not at its count of finished steps less one
        self.log_dict({**values, "step": float(self.global_step)}, sync_dist=False, rank_zero_only=False)
        rank_zero_info(f"[eval] step {self.global_step}: accuracy {accuracy:.3f}, reward {values['val/reward_mean']:.3f}")

    def configure_optimizers(self):
        trainable = (p for p in self.policy.parameters() if p.requires_grad)
        return build_optimizer(trainable, self.optim_cfg, self.total_optimizer_steps())

    def on_fit_end(self) -> None:
        if not self.export_final or self.trainer.interrupted:
            return
        export_trained(self.trainer, self.policy, self.actor.processor, self.export_dir)  # sharded: every process
        rank_zero_info(f"saved the trained {'adapter' if self.policy_cfg.lora else 'policy'} to {self.export_dir}")
        if self.accuracy_before_training is not None and self.trainer.callback_metrics.get("val/accuracy") is not None:
            after = float(self.trainer.callback_metrics["val/accuracy"])
            rank_zero_info(f"[eval] accuracy before training {self.accuracy_before_training:.3f} -> after {after:.3f}")

