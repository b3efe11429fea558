"""Typed configuration of ``DAPOModule``: one dataclass per concern, one docstring per field.

The attribute docstrings are what ``dapo-lightning fit --help`` prints. Each
``__post_init__`` rejects bad values with the config key in the message, so a
wrong YAML fails before any model is loaded.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from dapo_lightning.advantages import AGGREGATIONS, SCALE_MODES
from dapo_lightning.loss import IMPORTANCE_LEVELS, LOSS_TYPES, PolicyLossSettings, PreferenceSettings


def coerce(cls, value: Any, key: str = "model"):
    """A config dataclass from an instance or a plain dict (a notebook's, or a checkpoint's hyper-parameters).

    An unknown key is an error naming it (``key`` is the section's, e.g. ``model.optim``), with
    the nearest known key: a misspelt setting must not train at its default without a word.
    """
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = [f.name for f in fields(cls)]
        for name in value:
            if name not in known:
                near = difflib.get_close_matches(str(name), known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}"
                raise ValueError(f"{key}.{name}: unknown key{hint}")
        kwargs = dict(value)
        if cls is PolicyConfig and isinstance(kwargs.get("lora"), dict):
            kwargs["lora"] = coerce(LoraSettings, kwargs["lora"], f"{key}.lora")
        return cls(**kwargs)
    raise TypeError(f"{key}: expected {cls.__name__} or dict, got {type(value).__name__}")


def reward_name(fn) -> str:
    """The name a reward function passed as an object is known by: its dotted path, registered in this process.

    A module-level function is found again by that path when a checkpoint is resumed in a new
    process; a lambda or a nested function works in this process only.
    """
    from dapo_lightning.rewards.registry import register_reward_object

    return register_reward_object(fn)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


@dataclass
class LoraSettings:
    """Low-rank adapters (peft) on the language model's linear layers."""

    r: int = 16
    """Rank of the adapter matrices."""
    alpha: int = 32
    """Scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt (matched by suffix, as peft does)."""

    def __post_init__(self) -> None:
        _check(self.r > 0, "model.policy.lora.r", f"must be > 0, got {self.r}")
        _check(_finite(self.alpha) and self.alpha > 0, "model.policy.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(_finite(self.dropout) and 0 <= self.dropout < 1, "model.policy.lora.dropout",
               f"must be in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), "model.policy.lora.target_modules", "must name at least one module")


@dataclass
class PolicyConfig:
    """Which model is trained and how it is loaded."""

    model_name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Hub name or local folder; both load through the same ``from_pretrained`` code."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype (bfloat16 on GPUs)."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the policy: sdpa, eager or flash_attention_2."""
    trust_remote_code: bool = False
    """Allow code from the checkpoint folder to run (off unless you trust it)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights (None: full fine-tuning)."""
    freeze_vision_tower: bool = False
    """Keep the vision encoder's weights fixed."""
    build_tiny_if_missing: Literal["tiny", "small"] | None = None
    """If ``model_name_or_path`` is a folder that does not exist, write the offline random model of this size there first."""


@dataclass
class RolloutConfig:
    """How completions are sampled, in training and in validation.

    Each sampling key acts as ``transformers``' ``generate`` argument of the same name, in its
    order (repetition penalty, temperature, top-k, top-p, min-p); the loss's log-probs see only
    ``temperature``. Validation takes the ``eval_*`` keys, each None by default: the training value.
    """

    num_generations: int = 8
    """Completions per prompt (G); one group per prompt."""
    max_completion_length: int = 384
    """Most tokens a completion may have (EOS included)."""
    min_completion_length: int = 0
    """EOS cannot be sampled before this many tokens (benchmarks force a fixed length with it)."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs of the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    min_p: float = 0.0
    """Min-p sampling: drop the tokens less likely than ``min_p`` times the most likely one, after temperature, top-k and top-p (0: off)."""
    repetition_penalty: float = 1.0
    """Divide the positive logits, and multiply the negative ones, of every token already in the prompt or the completion by this (CTRL's penalty; 1.0: off; below 1 favours repeats). Greedy validation applies it too. The loss's log-probs do not see it, so above 1 in training the samples are off-policy."""
    eval_num_generations: int = 4
    """Completions per prompt in validation."""
    eval_greedy: bool = False
    """Validate with greedy decoding (then one completion per prompt is enough); ``eval_temperature``, ``eval_top_p``, ``eval_top_k`` and ``eval_min_p`` must then be unset."""
    eval_temperature: float | None = None
    """Validation's sampling temperature (None: ``temperature``)."""
    eval_top_p: float | None = None
    """Validation's nucleus sampling mass (None: ``top_p``)."""
    eval_top_k: int | None = None
    """Validation's top-k (None: ``top_k``; 0: all)."""
    eval_min_p: float | None = None
    """Validation's min-p (None: ``min_p``; 0: off), e.g. to evaluate with a truncation that training does without."""
    eval_repetition_penalty: float | None = None
    """Validation's repetition penalty (None: ``repetition_penalty``; 1.0: off), e.g. a model card's inference penalty while training stays on-policy."""
    shared_prompt: bool = True
    """Encode each image and run each prompt once per group, in generation and in the log-prob passes (same numbers, less work)."""
    lean_decode: bool = True
    """Run the shared-prompt decoder's decode steps from the language model's fused weights (q/k/v and gate/up as one product each, rotary prepared once, each group's prompt keys read once per step) instead of the model's forward: the same logits up to float rounding, so the same samples. Used when the model is a Qwen2-VL/Qwen2.5-VL text decoder in eval mode with plain or LoRA projections and unsharded parameters; otherwise (and when false) the model's forward runs."""

    # (key, valid value, the rule its error states) for the sampling keys; eval_<key> follows the same rule
    _SAMPLING_RULES = (
        ("temperature", lambda v: v > 0, "must be > 0"),
        ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ("top_k", lambda v: v >= 0, "must be >= 0 (0: all tokens)"),
        ("min_p", lambda v: 0 <= v < 1, "must be in [0, 1) (0: off)"),
        ("repetition_penalty", lambda v: v > 0, "must be > 0 (1.0: off)"),
    )

    def __post_init__(self) -> None:
        _check(self.num_generations >= 2, "model.rollout.num_generations", f"must be >= 2, got {self.num_generations}")
        _check(self.max_completion_length >= 1, "model.rollout.max_completion_length", "must be >= 1")
        _check(
            0 <= self.min_completion_length <= self.max_completion_length,
            "model.rollout.min_completion_length",
            f"must be in [0, max_completion_length={self.max_completion_length}], got {self.min_completion_length}",
        )
        for name, valid, rule in self._SAMPLING_RULES:  # each training key, then its eval_ twin when set
            value, eval_value = getattr(self, name), getattr(self, f"eval_{name}")
            _check(valid(value), f"model.rollout.{name}", f"{rule}, got {value}")
            _check(eval_value is None or valid(eval_value), f"model.rollout.eval_{name}", f"{rule}, got {eval_value}")
        _check(self.eval_num_generations >= 1, "model.rollout.eval_num_generations", "must be >= 1")
        if self.eval_greedy:  # greedy validation takes the argmax: a sampling key set for it would do nothing
            for key in ("eval_temperature", "eval_top_p", "eval_top_k", "eval_min_p"):
                _check(getattr(self, key) is None, f"model.rollout.{key}",
                       "is not used when model.rollout.eval_greedy is true (greedy validation takes the most likely "
                       "token); set eval_greedy: false to sample validation completions, or leave it unset")


@dataclass
class RewardConfig:
    """Which rewards score a completion and how they combine into advantages (SPEC section 2)."""

    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format", "length"])
    """Registered reward names or dotted paths to functions ``f(completions, **kwargs) -> list[float]`` (in Python, the function itself also works)."""
    reward_weights: list[float] | None = None
    """One weight per reward, same order (None: all 1)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group's std, the batch's std, or nothing."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """``sum_then_normalize``: the weighted sum of the rewards, then group advantages (``scale_rewards``). ``normalize_then_sum`` (GDPO, TRL's option): each reward centred and scaled by its group's std first, then the weighted sum centred and scaled by the batch's std over all processes (``scale_rewards`` does not apply): rewards on different scales weigh as their weights say."""
    soft_punish_cache: int = 50
    """Length reward: tokens before max_completion_length where the linear penalty starts."""
    completions_format: Literal["text", "conversational"] = "text"
    """How rewards receive each completion: ``text``, a string; ``conversational``, TRL's shape for chat data, ``[{"role": "assistant", "content": text}]`` (a TRL reward written with ``c[0]["content"]`` works unchanged). Rewards also get TRL's ``trainer_state`` and, per row, the ``image``."""
    on_reward_error: Literal["raise", "zero"] = "raise"
    """When a reward function raises: ``raise`` stops with an error naming the reward, the sample and its dataset row; ``zero`` scores the failing samples 0, counts them in ``train/reward_errors/<name>`` and goes on."""

    def __post_init__(self) -> None:
        _check(bool(self.reward_funcs), "model.rewards.reward_funcs", "must list at least one reward")
        self.reward_funcs = [reward_name(f) if callable(f) else f for f in self.reward_funcs]  # names: checkpoint-safe
        if self.reward_weights is not None:
            _check(
                len(self.reward_weights) == len(self.reward_funcs),
                "model.rewards.reward_weights",
                f"has {len(self.reward_weights)} weights but model.rewards.reward_funcs has "
                f"{len(self.reward_funcs)} rewards ({', '.join(self.reward_funcs)})",
            )
        _check(self.scale_rewards in SCALE_MODES, "model.rewards.scale_rewards", f"choose from {SCALE_MODES}")
        _check(self.multi_objective_aggregation in AGGREGATIONS, "model.rewards.multi_objective_aggregation",
               f"choose from {AGGREGATIONS}, got {self.multi_objective_aggregation!r}")
        _check(self.soft_punish_cache >= 0, "model.rewards.soft_punish_cache", "must be >= 0")
        _check(self.on_reward_error in ("raise", "zero"), "model.rewards.on_reward_error", "choose from raise, zero")
        _check(self.completions_format in ("text", "conversational"), "model.rewards.completions_format",
               f"choose from text, conversational; got {self.completions_format!r}")

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.reward_funcs)


@dataclass
class LossConfig:
    """The clipped policy-gradient objective (SPEC section 5)."""

    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo"
    """Normaliser: dapo = valid tokens of the whole step; grpo = per sequence; bnpo = per micro-batch; dr_grpo = constant."""
    epsilon_low: float = 0.2
    """Lower clip range: ratio >= 1 - epsilon_low."""
    epsilon_high: float = 0.28
    """Upper clip range (clip-higher): ratio <= 1 + epsilon_high."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """Ratio per token, or one per sequence (geometric mean, GSPO)."""
    beta: float = 0.0
    """KL penalty weight to the frozen initial policy (0: no reference model is loaded)."""
    mask_truncated_completions: bool = False
    """Completions cut at ``max_completion_length`` (no EOS) take no part in the loss and its token count (TRL's option of the same name, verl's overlong filtering); the ``length`` reward still scores them."""
    preference_weight: float = 0.0
    """lambda of the preference term among a group's correct completions (SPEC section 9): lambda x the mean over pairs of -log sigmoid(beta (d_top - d_bottom) - m), d a completion's summed log-ratio to the sampling policy, top the more image-grounded (smaller VGR) of the pair. 0: off. Above 0 it needs the ``accuracy`` reward and the ``AttentionMetrics`` callback."""
    preference_beta: float = 0.1
    """beta of the preference term: the scale of the pair's difference of sequence log-ratios."""
    preference_margin: float = 0.0
    """m of the preference term: the margin that beta (d_top - d_bottom) is pushed past."""
    preference_pairs_per_group: int = 2
    """K of the preference term: at most this many pairs per group, the i-th most grounded correct completion with the i-th least grounded (fewer when the group has fewer than 2K correct completions with a usable VGR)."""

    def __post_init__(self) -> None:
        _check(self.loss_type in LOSS_TYPES, "model.loss.loss_type", f"choose from {LOSS_TYPES}")
        _check(0 <= self.epsilon_low < 1, "model.loss.epsilon_low", f"must be in [0, 1), got {self.epsilon_low}")
        _check(_finite(self.epsilon_high) and self.epsilon_high >= 0, "model.loss.epsilon_high",
               f"must be a finite number >= 0, got {self.epsilon_high}")
        _check(
            self.importance_sampling_level in IMPORTANCE_LEVELS,
            "model.loss.importance_sampling_level",
            f"choose from {IMPORTANCE_LEVELS}",
        )
        _check(_finite(self.beta) and self.beta >= 0, "model.loss.beta", f"must be a finite number >= 0, got {self.beta}")
        _check(_finite(self.preference_weight) and self.preference_weight >= 0, "model.loss.preference_weight",
               f"must be a finite number >= 0 (0: off), got {self.preference_weight}")
        _check(_finite(self.preference_beta) and self.preference_beta > 0, "model.loss.preference_beta",
               f"must be a finite number > 0, got {self.preference_beta}")
        _check(_finite(self.preference_margin) and self.preference_margin >= 0, "model.loss.preference_margin",
               f"must be a finite number >= 0, got {self.preference_margin}")
        _check(isinstance(self.preference_pairs_per_group, int) and not isinstance(self.preference_pairs_per_group, bool)
               and self.preference_pairs_per_group >= 1, "model.loss.preference_pairs_per_group",
               f"must be an integer >= 1, got {self.preference_pairs_per_group!r}")

    def settings(self, max_completion_length: int) -> PolicyLossSettings:
        """The loss function's constants (``dr_grpo`` divides by ``max_completion_length``)."""
        return PolicyLossSettings(
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level, loss_type=self.loss_type, beta=self.beta,
            max_completion_length=max_completion_length, mask_truncated=self.mask_truncated_completions,
            preference=PreferenceSettings(weight=self.preference_weight, beta=self.preference_beta,
                                          margin=self.preference_margin,
                                          pairs_per_group=self.preference_pairs_per_group)
            if self.preference_weight > 0 else None,
        )


@dataclass
class OptimConfig:
    """AdamW, the schedule, and how a rollout is turned into optimizer steps."""

    learning_rate: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps with a linear learning-rate warm-up."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm (None: no clipping)."""
    num_iterations: int = 1
    """Passes over each rollout (mu, as TRL's ``num_iterations``); each pass takes ``steps_per_generation`` optimizer steps. Above 1 the sampling policy's log-probs are computed once and kept."""
    steps_per_generation: int = 1
    """Optimizer steps per pass over a rollout: its rows are split into this many consecutive mini-batches, each its own step (TRL's ``steps_per_generation``); above 1 the sampling policy's log-probs are computed once and kept. At most ``model.rollout.num_generations``."""
    micro_batch_size: int | None = None
    """Completions per forward/backward; the rollout's N = B*G rows are accumulated into one step (None: all at once)."""
    max_bad_steps: int | None = 3
    """A step with a NaN or inf in its rewards, advantages, log-probs, loss or gradients is skipped (no optimizer or scheduler step); after this many in a row the run saves a checkpoint and stops with an error (None: never stop)."""

    def __post_init__(self) -> None:
        _check(_finite(self.learning_rate) and self.learning_rate > 0, "model.optim.learning_rate",
               f"must be a finite number > 0, got {self.learning_rate}")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "model.optim.weight_decay",
               f"must be >= 0, got {self.weight_decay}")
        _check(len(self.adam_betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.adam_betas),
               "model.optim.adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}")
        _check(_finite(self.adam_epsilon) and self.adam_epsilon > 0, "model.optim.adam_epsilon",
               f"must be > 0, got {self.adam_epsilon}")
        _check(0 <= self.warmup_ratio < 1, "model.optim.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.num_iterations >= 1, "model.optim.num_iterations", f"must be >= 1, got {self.num_iterations}")
        _check(self.steps_per_generation >= 1, "model.optim.steps_per_generation",
               f"must be >= 1, got {self.steps_per_generation}")
        _check(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            "model.optim.micro_batch_size",
            f"must be >= 1, got {self.micro_batch_size}",
        )
        _check(
            self.max_bad_steps is None or self.max_bad_steps >= 1,
            "model.optim.max_bad_steps",
            f"must be >= 1 or null, got {self.max_bad_steps}",
        )
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "model.optim.max_grad_norm",
            f"must be > 0 or null, got {self.max_grad_norm}",
        )


SECTIONS = {"policy": PolicyConfig, "rollout": RolloutConfig, "rewards": RewardConfig, "loss": LossConfig,
            "optim": OptimConfig}  # DAPOModule's arguments, as its hyper-parameters name them


def default_settings() -> dict[str, dict]:
    """The hyper-parameters of a default configuration (``{section: {key: value}}``)."""
    return {name: asdict(cls()) for name, cls in SECTIONS.items()}
