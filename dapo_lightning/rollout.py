"""Generation -> ``RolloutBatch``, and teacher-forced log-probs of its completions.

Shapes as in ``batch.py``: B prompts, G completions each, N = B * G rows, P prompt
tokens, T completion tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from dapo_lightning import distributed
from dapo_lightning.batch import PromptBatch, RolloutBatch

# Tokens a policy must never sample: they would make the next forward expect image features.
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class SamplingSettings:
    """One stage's sampling (``Actor.sampling``); the defaults change nothing (``transformers``' meaning for each)."""

    num_generations: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    greedy: bool = False  # argmax after the penalty and suppression; temperature, top-k, top-p, min-p unused
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off


@dataclass(frozen=True)
class TokenIds:
    """Token ids generation needs from the tokenizer."""

    eos: tuple[int, ...]
    pad: int
    suppress: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, generation_config=None) -> TokenIds:
        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        config_eos = getattr(generation_config, "eos_token_id", None)
        if config_eos is not None:
            eos.update(int(t) for t in ([config_eos] if isinstance(config_eos, int) else config_eos))
        if not eos:
            raise ValueError("the tokenizer has no eos_token and the generation config names none")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        vocab = tokenizer.get_vocab()
        suppress = tuple(vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab)
        return cls(eos=tuple(sorted(eos)), pad=int(pad), suppress=suppress)


def completion_mask_from_eos(completion_ids: Tensor, eos_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mask of each row's tokens up to and including its first EOS, and whether it had none.

    Returns ``mask`` [N, T] (long) and ``truncated`` [N] (bool).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [N, T]
    T = completion_ids.shape[1]
    has_eos = is_eos.any(dim=1)  # [N]
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T - 1, dtype=torch.long))  # [N]
    positions = torch.arange(T, device=completion_ids.device).unsqueeze(0)  # [1, T]
    return (positions <= first.unsqueeze(1)).long(), ~has_eos


@torch.no_grad()
def generate_hf(
    model,
    prompts: PromptBatch,
    tokenizer,
    settings: SamplingSettings,
    token_ids: TokenIds,
    *,
    stage: str = "train",
    lockstep: bool = False,
) -> RolloutBatch:
    """Sample G completions for each prompt with ``model.generate`` (rows grouped by prompt).

    ``generate`` repeats each prompt G times before the prefill, so it encodes every
    image and prefills every prompt G times; kept as the reference and as the path
    for models without Qwen2.5-VL's cache layout (``model.rollout.shared_prompt: false``).
    ``lockstep`` (parameters sharded over processes, ``distributed.shards_parameters``): ``generate``'s
    ``synced_gpus``, every process decodes until all are done.
    """
    P = prompts.input_ids.shape[1]
    inputs = prompts.model_inputs(next(model.parameters()).dtype)
    sampling = (
        {"do_sample": False}
        if settings.greedy
        else {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
              "min_p": settings.min_p or None}
    )
    output = model.generate(
        **inputs,
        **sampling,
        # always given: a checkpoint's generation_config.json may set a penalty this project's decoder would not apply
        repetition_penalty=float(settings.repetition_penalty),
        num_return_sequences=settings.num_generations,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None,
        eos_token_id=list(token_ids.eos),
        pad_token_id=token_ids.pad,
        suppress_tokens=list(token_ids.suppress) or None,
        use_cache=True,
        **({"synced_gpus": True} if lockstep else {}),
    )  # [N, P + T]
    completion_ids = output[:, P:]  # [N, T]
    return _rollout_from_ids(completion_ids, prompts, tokenizer, settings, token_ids, stage)


def processed_logits(logits: Tensor, settings: SamplingSettings, suppress: Tensor | None,
                     seen: Tensor | None = None) -> Tensor:
    """Raw logits -> the scores the next token is drawn from, in ``transformers``' order.

    ``GenerationMixin._get_logits_processor`` (transformers 5.x) lists the repetition penalty,
    then the suppression of EOS before ``min_new_tokens`` and of ``suppress_tokens``, then,
    only when sampling, the warpers: temperature, top-k, top-p, min-p. ``seen`` (bool [n, V])
    marks the tokens the repetition penalty applies to (None: off); ``suppress`` the ids set to
    -inf. Each step below reproduces the named ``logits_process.py`` class elementwise, so the
    two generators draw the same tokens.
    [n, V] -> [n, V]
    """
    logits = logits.float()
    if seen is not None:  # RepetitionPenaltyLogitsProcessor (CTRL): shrink a seen token's logit towards 0 and below
        penalty = settings.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)  # [n, V]
    if suppress is not None and suppress.numel():  # MinNewTokensLength..., SuppressTokensLogitsProcessor
        logits = logits.index_fill(-1, suppress, -math.inf)  # [n, V]
    if settings.greedy:
        return logits
    if settings.temperature != 1.0:  # TemperatureLogitsWarper (dividing by 1 changes nothing)
        logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:  # TopKLogitsWarper
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if settings.top_p < 1.0:  # TopPLogitsWarper
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)  # [n, V] ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - settings.top_p
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)
    if settings.min_p > 0:  # MinPLogitsWarper: drop tokens less likely than min_p times the most likely one
        probs = logits.softmax(-1)  # [n, V]
        remove = probs < settings.min_p * probs.amax(-1, keepdim=True)  # [n, V]
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)  # always keep the most likely token
        logits = logits.masked_fill(remove, -math.inf)
    return logits


def sample_next(logits: Tensor, settings: SamplingSettings, suppress: Tensor | None,
                seen: Tensor | None = None) -> Tensor:
    """Next token per row from raw logits: ``processed_logits``, then argmax (greedy) or a draw. [n, V] -> [n]"""
    scores = processed_logits(logits, settings, suppress, seen)  # [n, V]
    if settings.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


def prompt_tokens_seen(prompts: PromptBatch, vocab_size: int) -> Tensor:
    """The tokens ``generate``'s repetition penalty sees in each prompt, bool [B, V + 1].

    ``generate`` penalises every id of its ``input_ids``: the prompt (image placeholders included)
    and the tokens generated so far, but not the left padding (``prompt_ignore_length``: the
    index of each row's first attended token). The left padding and ids past the logits (V and
    above) land in the last column, which the caller drops, as ``RepetitionPenaltyLogitsProcessor`` does.
    """
    ids = prompts.input_ids  # [B, P]
    left_padding = (prompts.attention_mask != 0).int().argmax(dim=1)  # [B]
    positions = torch.arange(ids.shape[1], device=ids.device)  # [P]
    ids = ids.clamp(max=vocab_size).masked_fill(positions < left_padding.unsqueeze(1), vocab_size)  # [B, P]
    return torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


@torch.no_grad()
def generate_shared(
    model,
    prompts: PromptBatch,
    tokenizer,
    settings: SamplingSettings,
    token_ids: TokenIds,
    *,
    stage: str = "train",
    on_decode_step: Callable[[int, Tensor], None] | None = None,
    lockstep: bool = False,
    lean_decode: bool = True,
) -> RolloutBatch:
    """Sample G completions per prompt, encoding each image and prefilling each prompt once.

    The prompt's key/value cache is computed for the B prompts, repeated G times, and
    the N = B * G completions are decoded from it. Positions continue Qwen2.5-VL's
    multimodal rotary positions explicitly: the next text position of a prompt is its
    largest position + 1 (``get_rope_index``), whatever its left padding.
    ``on_decode_step(t, attention_mask)`` runs before the forward that feeds completion
    token t (attention captures use it).

    ``lockstep`` (parameters sharded over processes: every forward is a collective): decoding stops
    when no process has a row left, not when this one's rows are done; one all-reduce of the
    "still running" flag per step. A process whose rows are done feeds padding (no sampling, no
    ``on_decode_step``), so its completions, and its random draws, are those it decodes alone.

    ``lean_decode`` (``model.rollout.lean_decode``): the decode steps run ``lean_decode.LeanDecoder``
    (the text decoder's arithmetic from its fused weights, the group's prompt keys read once per step)
    when ``lean_decode.lean_decoder_weights`` recognises the model, else the model's forward; the same
    logits up to float rounding, so the same samples (``tests/test_lean_decode.py``).
    """
    from transformers import DynamicCache

    from dapo_lightning.lean_decode import LeanDecoder, lean_decoder_weights

    B, P = prompts.input_ids.shape
    G = settings.num_generations
    device = prompts.input_ids.device
    inputs = prompts.model_inputs(next(model.parameters()).dtype)
    next_position = prompt_next_position(base_model(model), prompts)  # [B]
    cache = DynamicCache(config=base_model(model).config)
    out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    weights = lean_decoder_weights(model) if lean_decode else None
    if weights is not None:  # the prompts' keys/values stay once per group; the decoder keeps the completions'
        lean = LeanDecoder(weights, cache, prompts.attention_mask, next_position, G, steps=settings.max_new_tokens - 1)
    else:
        lean = None
        repeat_prompt_cache(cache, G, reserve=settings.max_new_tokens - 1)  # the last token is never fed back
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # [N, V]
    attention_mask = prompts.attention_mask.repeat_interleave(G, dim=0)  # [N, P]
    position = next_position.repeat_interleave(G)  # [N]
    suppress = torch.tensor(token_ids.suppress, dtype=torch.long, device=device) if token_ids.suppress else None
    eos = torch.tensor(token_ids.eos, device=device)
    finished = torch.zeros(B * G, dtype=torch.bool, device=device)
    steps = []
    suppress_eos = torch.cat([suppress, eos]) if suppress is not None else eos
    V = logits.shape[-1]
    # the repetition penalty's tokens: prompt, then each step's (a finished row's pad too, as generate appends it)
    seen = prompt_tokens_seen(prompts, V).repeat_interleave(G, dim=0) if settings.repetition_penalty != 1.0 else None
    done = False  # every row of this process has its EOS (or the length limit)
    # the lean step needs neither the growing attention mask nor the position ids: made only for the model or the hook
    masks = lean is None or on_decode_step is not None
    for t in range(settings.max_new_tokens):
        if not done:
            token = sample_next(logits, settings, suppress_eos if t < settings.min_new_tokens else suppress,
                                seen[:, :V] if seen is not None else None)  # [N]
            token = token.masked_fill_(finished, token_ids.pad)  # a finished row feeds padding
            steps.append(token)
            finished |= token == eos if len(token_ids.eos) == 1 else torch.isin(token, eos)
            if seen is not None:
                seen.scatter_(1, token.clamp(max=V).unsqueeze(1), True)  # [N, V + 1]
            done = bool(finished.all()) or t == settings.max_new_tokens - 1
        if t == settings.max_new_tokens - 1 or not (distributed.any_process(not done, device) if lockstep else not done):
            break
        if done:  # lockstep: idle on padding while another process decodes
            token = torch.full_like(token, token_ids.pad)
        if masks:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)  # [N, P + t + 1]
        if on_decode_step is not None and not done:
            on_decode_step(t, attention_mask)
        if lean is not None:
            logits = lean.step(token, t)  # [N, V]
        else:
            position_ids = (position + t).view(1, -1, 1).expand(3, -1, 1)  # [3, N, 1]
            out = model(input_ids=token.unsqueeze(-1), attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1]  # [N, V]
    completion_ids = torch.stack(steps, dim=1)  # [N, T]
    return _rollout_from_ids(completion_ids, prompts, tokenizer, settings, token_ids, stage)


class RepeatedPromptLayer(DynamicLayer):
    """A ``DynamicLayer`` holding each prompt's keys/values repeated for its G rows, with room reserved for the completion.

    ``DynamicLayer.update`` concatenates, copying every cached key and value at every
    decode step, so the copies grow with prompt length times completion length (with
    G rows of a 600-token prompt they are about a fifth of CPU generation time, see
    ``docs/performance.md``). Here a step writes its token into the reserved slice and
    ``keys``/``values`` are views of the filled part. Past the reserve it concatenates,
    like its parent.
    """

    @classmethod
    def from_prompt(cls, layer: DynamicLayer, repeats: int, reserve: int) -> RepeatedPromptLayer:
        keys, values = layer.keys, layer.values  # [B, H, P, D]
        B, H, P, D = keys.shape
        new = cls()
        new.lazy_initialization(keys, values)
        new.key_buffer = keys.new_empty(B * repeats, H, P + reserve, D)  # [N, H, P + reserve, D]
        new.value_buffer = values.new_empty(B * repeats, H, P + reserve, values.shape[-1])
        # row b * repeats + g holds prompt b, as repeat_interleave orders them
        new.key_buffer.view(B, repeats, H, P + reserve, D)[..., :P, :] = keys.unsqueeze(1)
        new.value_buffer.view(B, repeats, H, P + reserve, values.shape[-1])[..., :P, :] = values.unsqueeze(1)
        new.length = P
        new.keys, new.values = new.key_buffer[..., :P, :], new.value_buffer[..., :P, :]
        return new

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # past the reserve (and from then on): concatenate
            self.length = end
            return super().update(key_states, value_states, *args, **kwargs)
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


def repeat_prompt_cache(cache, repeats: int, reserve: int) -> None:
    """``cache.batch_repeat_interleave(repeats)``, with ``reserve`` more positions per row in its dynamic layers."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            cache.layers[index] = RepeatedPromptLayer.from_prompt(layer, repeats, reserve)
        else:
            layer.batch_repeat_interleave(repeats)


def generate(
    model,
    prompts: PromptBatch,
    tokenizer,
    settings: SamplingSettings,
    token_ids: TokenIds,
    *,
    stage: str = "train",
    shared_prompt: bool = True,
    on_decode_step: Callable[[int, Tensor], None] | None = None,
    lockstep: bool = False,
    lean_decode: bool = True,
) -> RolloutBatch:
    """G completions per prompt: prefilled once per prompt when the model allows it, else by ``model.generate``.

    ``on_decode_step`` is only called by the shared-prompt decoder (see ``uses_shared_prompt``). ``lockstep``:
    every process decodes until all are done (parameters sharded: each forward is a collective). ``lean_decode``:
    the shared-prompt decoder's decode steps run ``lean_decode.LeanDecoder`` where the model allows it.
    """
    if uses_shared_prompt(model, shared_prompt):
        return generate_shared(model, prompts, tokenizer, settings, token_ids, stage=stage,
                               on_decode_step=on_decode_step, lockstep=lockstep, lean_decode=lean_decode)
    return generate_hf(model, prompts, tokenizer, settings, token_ids, stage=stage, lockstep=lockstep)


def prompt_next_position(model, prompts: PromptBatch) -> Tensor:
    """Qwen2.5-VL's rotary position of each prompt's first completion token (max prompt position + 1). [B]"""
    if prompts.mm_token_type_ids is None:
        return prompts.attention_mask.sum(-1)
    _, deltas = model.model.get_rope_index(
        prompts.input_ids, mm_token_type_ids=prompts.mm_token_type_ids, image_grid_thw=prompts.image_grid_thw,
        attention_mask=prompts.attention_mask,
    )  # deltas [B, 1] = max position + 1 - real length
    return prompts.attention_mask.sum(-1) + deltas.view(-1).to(prompts.attention_mask.device)


def _rollout_from_ids(completion_ids, prompts, tokenizer, settings, token_ids, stage) -> RolloutBatch:
    mask, truncated = completion_mask_from_eos(completion_ids, token_ids.eos)
    completion_ids = completion_ids.masked_fill(mask == 0, token_ids.pad)
    texts = tokenizer.batch_decode([row[m.bool()] for row, m in zip(completion_ids, mask)], skip_special_tokens=True)
    return RolloutBatch(
        prompts=prompts,
        num_generations=settings.num_generations,
        completion_ids=completion_ids,
        completion_mask=mask,
        completions=texts,
        stage=stage,
        truncated=truncated,
        replayed=torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device),
    )


def base_model(model):
    """The ``transformers`` model under a peft wrapper (for its config and rotary-position helpers)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def uses_shared_prompt(model, enabled: bool, *, recomputes_layers: bool = False) -> bool:
    """Whether this project's shared-prompt code runs: each image encoded and each prompt prefilled once per group.

    It runs when ``enabled`` (``model.rollout.shared_prompt``) and the model exposes Qwen2-VL's
    rotary-position helper; in generation it is this project's decoder (with per-step hooks)
    instead of ``model.generate``. The log-prob passes also need a model that does not
    recompute its layers in the backward (``recomputes_layers``: gradient checkpointing),
    since a recomputed layer cannot reuse a cache shared between rows.
    """
    supported = hasattr(getattr(base_model(model), "model", None), "get_rope_index")
    return enabled and supported and not recomputes_layers
