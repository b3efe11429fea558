"""The actor: the policy model with its processor, and the forward passes the algorithm runs on it.

Sampling (``rollout.py``), teacher-forced log-probs (``logprobs.py``) and the frozen
reference's log-probs, in eval mode where they do not train. The passes go through this
project's shared-prompt code when the model allows it (``rollout.uses_shared_prompt``):
each image is encoded and each prompt prefilled once per group. ``DAPOModule`` holds one
actor, made in ``configure_model``; recorders (``hooks.PassRecorder``) ride along the passes.

``lockstep`` (set by the module when the strategy shards the parameters, ``distributed.shards_parameters``):
every forward is then a collective, so every process makes the same forwards: the decoders step until
all processes are done, and each pass makes as many forwards as the busiest process.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

from dapo_lightning import distributed
from dapo_lightning.batch import PromptBatch, RolloutBatch
from dapo_lightning.config import PolicyConfig, RolloutConfig
from dapo_lightning.hooks import PassRecorder
from dapo_lightning.logprobs import LogProbs, completion_logps, completion_logps_shared
from dapo_lightning.rollout import SamplingSettings, TokenIds, generate, uses_shared_prompt


class Actor:
    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module | None, processor,
                 policy_cfg: PolicyConfig, rollout_cfg: RolloutConfig):
        self.model = model  # the trained policy (plain or peft-wrapped)
        self.reference = reference  # frozen initial policy for beta > 0 (None: none, or LoRA's disabled adapter)
        self.processor = processor
        self.policy_cfg, self.rollout_cfg = policy_cfg, rollout_cfg
        self.token_ids = TokenIds.from_tokenizer(processor.tokenizer, getattr(model, "generation_config", None))
        self.lockstep = False  # parameters sharded over processes: every process makes the same forwards

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @contextmanager
    def eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    # --- generation -----------------------------------------------------------------------------------

    def sampling(self, stage: str) -> SamplingSettings:
        """Training samples G = num_generations with the training keys; validation (any other stage)
        eval_num_generations (1 when greedy) with the ``eval_*`` keys, each unset one taking the training value."""
        cfg = self.rollout_cfg
        train = stage == "train"

        def pick(value, eval_value):
            return value if train or eval_value is None else eval_value

        greedy = not train and cfg.eval_greedy
        return SamplingSettings(
            num_generations=cfg.num_generations if train else (1 if greedy else cfg.eval_num_generations),
            max_new_tokens=cfg.max_completion_length, min_new_tokens=cfg.min_completion_length,
            temperature=pick(cfg.temperature, cfg.eval_temperature), top_p=pick(cfg.top_p, cfg.eval_top_p),
            top_k=pick(cfg.top_k, cfg.eval_top_k), min_p=pick(cfg.min_p, cfg.eval_min_p),
            repetition_penalty=pick(cfg.repetition_penalty, cfg.eval_repetition_penalty), greedy=greedy,
        )

    @property
    def shares_prompts_in_generation(self) -> bool:
        """Whether generation runs this project's shared-prompt decoder (recorders can watch its decode steps)."""
        return uses_shared_prompt(self.model, self.rollout_cfg.shared_prompt)

    def sample(self, batch: PromptBatch, stage: str, recorders: Sequence[PassRecorder] = ()) -> RolloutBatch:
        """G completions per prompt (eval mode, no grad); each recorder is entered around generation, then finished."""
        settings = self.sampling(stage)
        with ExitStack() as stack, self.eval_mode():
            for recorder in recorders:
                stack.enter_context(recorder)
                recorder.before_generation(batch, settings.num_generations)

            def on_decode_step(step: int, attention_mask: Tensor) -> None:
                for recorder in recorders:
                    recorder.before_decode_step(step, attention_mask)

            rollout = generate(self.model, batch, self.tokenizer, settings, self.token_ids, stage=stage,
                               shared_prompt=self.rollout_cfg.shared_prompt,
                               on_decode_step=on_decode_step if recorders else None, lockstep=self.lockstep,
                               lean_decode=self.rollout_cfg.lean_decode)
        for recorder in recorders:
            recorder.finish(rollout)
        return rollout

    # --- log-probs ------------------------------------------------------------------------------------

    @property
    def shares_prompts_in_logps(self) -> bool:
        """Whether the log-prob passes run each prompt once (gradient checkpointing recomputes layers: it cannot)."""
        return uses_shared_prompt(self.model, self.rollout_cfg.shared_prompt,
                                  recomputes_layers=self.policy_cfg.gradient_checkpointing)

    def completion_logps(self, rollout: RolloutBatch, rows: list[int], *, with_entropy: bool = False, model=None,
                         width: int | None = None) -> LogProbs:
        """Log-probs of the completions of ``rows`` under ``model`` (the policy by default), [n, T'].

        Gradients flow when the caller has grad enabled. ``width`` is the rows' longest completion
        (computed when not given).
        """
        model = self.model if model is None else model
        temperature = self.rollout_cfg.temperature
        if self.shares_prompts_in_logps:
            return completion_logps_shared(model, rollout, rows, temperature=temperature, with_entropy=with_entropy,
                                           width=width, lockstep=self.lockstep)
        return completion_logps(model, rollout.model_inputs(rows, width), temperature=temperature,
                                with_entropy=with_entropy)

    def reference_logps(self, rollout: RolloutBatch, rows: list[int]) -> Tensor:
        if self.reference is not None:
            return self.completion_logps(rollout, rows, model=self.reference).logps
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self.completion_logps(rollout, rows).logps

    @torch.no_grad()
    def teacher_forced(self, rollout: RolloutBatch, chunks: list[list[int]], recorders: Sequence[PassRecorder], *,
                       old: bool, reference: bool) -> None:
        """No-grad forwards over prompt + completion, in micro-batches ``chunks``, for what is asked.

        ``old``: the sampling policy's log-probs (``rollout.old_logps``); ``reference``: the frozen
        reference's (``rollout.ref_logps``); the recorders are entered around the policy's passes
        (which run for them even without ``old``) and finished after them.
        """
        T = rollout.completion_ids.shape[1]
        old_parts, ref_parts = [], []
        idle = self.idle_forwards(len(chunks), rollout.completion_ids.device)
        with self.eval_mode():
            if recorders or old:
                with ExitStack() as stack:
                    for recorder in recorders:
                        stack.enter_context(recorder)
                    for rows in chunks:
                        if recorders:  # prepared with the full inputs; the forward itself may share the prompt
                            inputs = rollout.model_inputs(rows)
                            for recorder in recorders:
                                recorder.before_chunk(rows, inputs)
                        old_parts.append(_pad_right(self.completion_logps(rollout, rows).logps, T))
                for recorder in recorders:
                    recorder.finish(rollout)
                for _ in range(idle):  # outside the recorders: forwards that only keep step with the other processes
                    self.completion_logps(rollout, chunks[0])
            if reference:  # outside the recorders: a LoRA reference runs through the same attention modules
                ref_parts = [_pad_right(self.reference_logps(rollout, rows), T) for rows in chunks]
                for _ in range(idle):
                    self.reference_logps(rollout, chunks[0])
        if old:
            rollout.old_logps = torch.cat(old_parts)  # [N, T]
        if reference:
            rollout.ref_logps = torch.cat(ref_parts)  # [N, T]

    def idle_forwards(self, count: int, device) -> int:
        """How many more forwards than ``count`` the busiest process makes in a pass (0 unless ``lockstep``)."""
        return distributed.most(count, device) - count if self.lockstep else 0


def _pad_right(values: Tensor, width: int, value: float = 0.0) -> Tensor:
    """[n, t] -> [n, width]"""
    if values.shape[1] == width:
        return values
    return torch.nn.functional.pad(values, (0, width - values.shape[1]), value=value)
