"""Teacher-forced log-probs of a rollout's completions (the loss's and the old policy's), and their entropy.

Shapes as in ``batch.py``: n rows of a chunk, P' prompt tokens, T' completion tokens, V vocabulary.
:func:`completion_logps` runs the whole prompt + completion per row; :func:`completion_logps_shared`
runs each prompt once and its completions from the prompt's repeated cache (same numbers, less
work; ``rollout.uses_shared_prompt`` says when).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dapo_lightning.batch import RolloutBatch
from dapo_lightning.rollout import base_model, prompt_next_position


def selective_log_softmax(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax. [n, T, V], [n, T] -> [n, T]"""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [n, T]
    if logits.dtype in (torch.float32, torch.float64):
        return picked - torch.logsumexp(logits, dim=-1)  # [n, T]
    # half precision: row by row, in float32, to bound memory and keep precision
    return torch.stack([p.float() - torch.logsumexp(row.float(), dim=-1) for p, row in zip(picked, logits)])


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position. [n, T, V] -> [n, T]"""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


@dataclass
class LogProbs:
    logps: Tensor  # [n, T'] log-probs of the completion tokens
    mask: Tensor  # [n, T'] completion mask (trimmed to the rows' longest completion)
    entropy: Tensor | None = None  # [n, T'] detached


def completion_logps(model, inputs: dict[str, Tensor], *, temperature: float = 1.0, with_entropy: bool = False) -> LogProbs:
    """Teacher-forced log-probs of the completions in ``inputs`` (from ``RolloutBatch.model_inputs``).

    Gradients flow when the caller has grad enabled.
    """
    inputs = dict(inputs)
    completion_ids = inputs.pop("completion_ids")  # [n, T']
    mask = inputs.pop("completion_mask")  # [n, T']
    T = completion_ids.shape[1]
    dtype = next(model.parameters()).dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    output = model(**inputs, use_cache=False, logits_to_keep=T + 1)
    logits = output.logits[:, :-1, :]  # [n, T', V] position t predicts completion token t
    return _from_logits(logits, completion_ids, mask, temperature, with_entropy)


def completion_logps_shared(
    model, rollout: RolloutBatch, rows: list[int], *, temperature: float = 1.0, with_entropy: bool = False,
    width: int | None = None, lockstep: bool = False,
) -> LogProbs:
    """``completion_logps`` for ``rows``, running each prompt once and its completions from its repeated cache.

    The prompt pass keeps its graph, so gradients reach every prompt token and the
    vision tower through the cached keys and values, exactly as in the full forward;
    a group split across calls simply runs its prompt in each. [n, T'] results.

    Two forwards, the prompt's and the completions', except that completions of one token need
    only the first. With ``lockstep`` (parameters sharded over processes: each forward is a
    collective, and the backward of each is too) the second runs anyway, on the first token, and
    enters the result times zero: every process makes the same forwards and backwards.
    """
    from transformers import DynamicCache

    G = rollout.num_generations
    rows = [int(r) for r in rows]
    rows_t = torch.tensor(rows, dtype=torch.long, device=rollout.completion_ids.device)
    groups = sorted({r // G for r in rows})
    prompts = rollout.prompts.select(groups)  # [b, P']
    slot = torch.tensor([groups.index(r // G) for r in rows], device=rows_t.device)  # [n]
    inputs = prompts.model_inputs(next(model.parameters()).dtype)
    next_position = prompt_next_position(base_model(model), prompts)  # [b]
    cache = DynamicCache(config=base_model(model).config)
    first = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [b, V] predicts token 0
    cache.batch_select_indices(slot)  # [n, ...] differentiable gather of each row's prompt keys/values

    completion_mask = rollout.completion_mask.index_select(0, rows_t)  # [n, T]
    width = rollout.completion_width(rows_t) if width is None else width
    completion_ids = rollout.completion_ids.index_select(0, rows_t)[:, :width]  # [n, T']
    completion_mask = completion_mask[:, :width]
    prompt_width = prompts.attention_mask.shape[1]  # P'
    attention_mask = torch.cat(
        [prompts.attention_mask.index_select(0, slot), completion_mask.to(prompts.attention_mask.dtype)], dim=1
    )  # [n, P' + T']
    positions = next_position.index_select(0, slot).unsqueeze(1) + torch.arange(width, device=rows_t.device)  # [n, T']
    logits = first.index_select(0, slot).unsqueeze(1)  # [n, 1, V]
    if width > 1 or lockstep:
        fed = max(width - 1, 1)  # lockstep at width 1: the first token, whose logits are not used
        rest = model(
            input_ids=completion_ids[:, :fed],
            attention_mask=attention_mask[:, : prompt_width + fed],
            position_ids=positions[:, :fed].unsqueeze(0).expand(3, -1, -1),
            cache=cache,
            use_cache=True,
        ).logits  # [n, T' - 1, V] position t predicts completion token t + 1
        # width 1: adds exactly 0 (the second forward is in the graph, so its backward runs on every process)
        logits = torch.cat([logits, rest], dim=1) if width > 1 else logits + rest.sum() * 0  # [n, T', V]
    return _from_logits(logits, completion_ids, completion_mask, temperature, with_entropy)


def _from_logits(logits: Tensor, ids: Tensor, mask: Tensor, temperature: float, with_entropy: bool) -> LogProbs:
    """[n, T', V] logits (position t predicts token t of ``ids`` [n, T']) -> the tokens' log-probs, at ``temperature``."""
    if temperature != 1.0:
        logits = logits / temperature
    logps = selective_log_softmax(logits, ids)  # [n, T']
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())  # [n, T']
    return LogProbs(logps=logps, mask=mask, entropy=entropy)
