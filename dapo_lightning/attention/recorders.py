"""The two attention recorders: in the teacher-forced pass, and during decoding.

Both are ``hooks.PassRecorder`` s (context managers the module enters around a pass, fed
through ``before_*`` calls, finished with ``finish(rollout)``) and ``capture.LayerRecorder`` s
(the kernel hook calls ``record`` with each hooked layer's query and key). Each fills, per
layer and generation row, the text and vision mass of SPEC 3 (``capture.attention_mass``)
into the [L, N, R] tensors of a :class:`~dapo_lightning.attention.captured.CapturedAttention`,
which ``finish`` hands to ``on_finish(rollout, captured)`` (whoever asked for the recorder)
and returns. A recorder's methods that do not concern its pass do nothing.

- :class:`TeacherForcedRecorder`: the module's no-grad forward over prompt + completion, in
  row chunks (``before_chunk``), with any generator's completions. A chunk of n rows has P'
  prompt columns (left-padded, common padding trimmed) then T' completion columns
  (right-padded), so generation row r is the query at column P' + r, for r < C_i - 1. The
  pass may run the whole sequence or the completions from a shared prompt cache
  (``logprobs.completion_logps_shared``); both are recognised by their shapes.
- :class:`DecodeRecorder`: this project's shared-prompt decoder (``before_generation``,
  ``before_decode_step``). Decode step t feeds completion token t, so its single query is
  generation row t: the same rows, with no second forward. Its queries wait and are reduced
  in one batched call per layer every ``GENERATION_FLUSH_STEPS`` steps (and at the end),
  against the keys cached by then: the causal mask keeps each query to the keys it saw.
  Extra memory: L x N x H x flush x d floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dapo_lightning.attention.capture import DEFAULT_CHUNK_ELEMENTS, KernelHook, attention_mass
from dapo_lightning.attention.captured import CapturedAttention
from dapo_lightning.attention.masks import SpecialTokens, generation_rows, key_sets
from dapo_lightning.attention.metrics import VARIANTS

GENERATION_FLUSH_STEPS = 32  # decode steps whose queries are reduced together

OnFinish = Callable[[object, CapturedAttention], None]  # (rollout, captured)


def _check_settings(variant: str, chunk_elements: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"attention variant: choose from {VARIANTS}, got {variant!r}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements: must be >= 1, got {chunk_elements}")


class _Statistics:
    """The tensors a recorder fills: per layer, completion and generation row, text and vision mass."""

    def __init__(self, num_layers: int, num_rows: int, num_generation_rows: int, device):
        L, N, R = num_layers, num_rows, num_generation_rows
        self.device = device
        self.text = torch.zeros(L, N, R, device=device)  # [L, N, R]
        self.vision = torch.zeros(L, N, R, device=device)  # [L, N, R]
        self.rows = torch.zeros(N, R, dtype=torch.bool, device=device)  # [N, R]
        self.num_text = torch.zeros(N, dtype=torch.long, device=device)  # [N]
        self.num_vision = torch.zeros(N, dtype=torch.long, device=device)  # [N]
        self.captured = torch.zeros(L, N, dtype=torch.bool, device=device)  # [L, N]

    def store(self, layer: int, rows: Tensor | slice, first: int, text: Tensor, vision: Tensor) -> None:
        """Generation rows ``first ..`` of completions ``rows`` at ``layer``: ``text``, ``vision`` [n, count]."""
        count = text.shape[1]
        self.text[layer, rows, first : first + count] = text.to(self.device)
        self.vision[layer, rows, first : first + count] = vision.to(self.device)
        self.captured[layer, rows] = True

    def result(self, variant: str) -> CapturedAttention:
        return CapturedAttention(text=self.text, vision=self.vision, rows=self.rows, num_text=self.num_text,
                                 num_vision=self.num_vision, captured=self.captured, variant=variant)


@dataclass
class _Chunk:
    """The rows of the teacher-forced forward about to run."""

    rows: Tensor  # [n] rollout row indices
    width: int  # S = P' + T' columns
    prompt_width: int  # P'
    num_generation_rows: int  # R' = T' - 1
    key_valid: Tensor  # [n, S] bool
    indicators: Tensor  # [n, P', 3] kept prompt keys, text keys, vision keys (masks.key_sets)
    row_exists: Tensor  # [n, R'] bool


class TeacherForcedRecorder:
    """Fills a :class:`CapturedAttention` during the module's teacher-forced pass over prompt + completion.

    Args:
        model: the policy (plain, peft-wrapped, ...).
        special: token ids for the modality masks.
        num_rows: N, rows of the rollout.
        completion_width: T, the rollout's padded completion width.
        layers: decoder layers to capture (None: all). The others keep running untouched.
        variant: "original" (head average, sink zeroed, renormalised over prompt keys) or
            "paper" (per-head shares within text ∪ vision keys, then head average).
        chunk_elements: most attention scores held at once.
        device: where the statistics live (the model's by default).
        on_finish: called by ``finish`` with the rollout and the statistics.
    """

    def __init__(self, model: nn.Module, special: SpecialTokens, num_rows: int, completion_width: int, *,
                 layers: Sequence[int] | None = None, variant: str = "original",
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, device: torch.device | str | None = None,
                 on_finish: OnFinish | None = None):
        _check_settings(variant, chunk_elements)
        self.special, self.variant, self.chunk_elements = special, variant, int(chunk_elements)
        self.on_finish = on_finish
        self.hook = KernelHook(model, self, layers)
        device = device if device is not None else next(model.parameters()).device
        self.statistics = _Statistics(self.hook.num_layers, num_rows, max(completion_width - 1, 0), device)
        self._chunk: _Chunk | None = None

    def __enter__(self) -> TeacherForcedRecorder:
        self.hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hook.__exit__(*exc)
        self._chunk = None

    def before_generation(self, prompts, num_generations: int) -> None:
        pass

    def before_decode_step(self, step: int, attention_mask: Tensor) -> None:
        pass

    def before_chunk(self, rows: list[int] | Tensor, inputs: dict[str, Tensor]) -> None:
        """Prepare masks and positions for the forward over ``inputs`` (``RolloutBatch.model_inputs(rows)``)."""
        stats = self.statistics
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=stats.device)  # [n]
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]  # [n, S]
        S, T = input_ids.shape[1], inputs["completion_ids"].shape[1]
        P = S - T
        keys = key_sets(input_ids[:, :P], attention_mask[:, :P], self.special)  # [n, P, 3]
        row_exists = generation_rows(inputs["completion_mask"]).to(stats.device)  # [n, T - 1]
        R = row_exists.shape[1]
        stats.rows[rows_t, :R] = row_exists
        stats.num_text[rows_t] = keys.num_text.to(stats.device)
        stats.num_vision[rows_t] = keys.num_vision.to(stats.device)
        self._chunk = _Chunk(rows=rows_t, width=S, prompt_width=P, num_generation_rows=R,
                             key_valid=attention_mask.bool(), indicators=keys.indicators, row_exists=row_exists)

    @torch.no_grad()
    def record(self, layer: int, query: Tensor, key: Tensor, *, scaling: float | None,
               sliding_window: int | None) -> None:
        """Reduce one layer's attention for the prepared rows to per-row text and vision masses."""
        chunk = self._chunk
        if chunk is None or query.shape[0] != len(chunk.rows):
            return
        P, R = chunk.prompt_width, chunk.num_generation_rows
        if query.shape[2] == key.shape[2] == chunk.width:
            first_query = P  # one forward over prompt + completion
        elif R and query.shape[2] == R and key.shape[2] == P + R:
            first_query = 0  # shared-prompt pass: the completion's queries only, the prompt's keys from the cache
        else:
            return  # another forward (a prompt-only pass)
        text, vision = attention_mass(query, key, chunk.indicators, chunk.key_valid, first_query=first_query,
                                      first_position=P, count=R, scaling=scaling, sliding_window=sliding_window,
                                      variant=self.variant, chunk_elements=self.chunk_elements)  # [n, R]
        exists = chunk.row_exists.to(text.device)  # [n, R]
        self.statistics.store(layer, chunk.rows, 0, torch.where(exists, text, torch.zeros_like(text)),
                              torch.where(exists, vision, torch.zeros_like(vision)))

    def finish(self, rollout) -> CapturedAttention:
        """The statistics of every chunk, handed to ``on_finish`` and returned."""
        captured = self.statistics.result(self.variant)
        if self.on_finish is not None:
            self.on_finish(rollout, captured)
        return captured


class DecodeRecorder:
    """Fills a :class:`CapturedAttention` from the decode steps of ``rollout.generate_shared``, with no second forward.

    Args are those of :class:`TeacherForcedRecorder`, with ``max_new_tokens`` (the decoder's
    limit) for the completion width, and ``flush_steps``: decode steps reduced together.
    """

    def __init__(self, model: nn.Module, special: SpecialTokens, num_rows: int, max_new_tokens: int, *,
                 layers: Sequence[int] | None = None, variant: str = "original",
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, device: torch.device | str | None = None,
                 on_finish: OnFinish | None = None, flush_steps: int = GENERATION_FLUSH_STEPS):
        _check_settings(variant, chunk_elements)
        if flush_steps < 1:
            raise ValueError(f"flush_steps: must be >= 1, got {flush_steps}")
        self.special, self.variant, self.chunk_elements = special, variant, int(chunk_elements)
        self.on_finish, self.flush_steps = on_finish, int(flush_steps)
        self.hook = KernelHook(model, self, layers)
        device = device if device is not None else next(model.parameters()).device
        self.statistics = _Statistics(self.hook.num_layers, num_rows, max(max_new_tokens - 1, 0), device)
        self._prompt_width: int | None = None  # P, set by before_generation
        self._indicators: Tensor | None = None  # [N, P, 3]
        self._step: tuple[int, Tensor] | None = None  # the decode step about to run and its [N, P + t + 1] mask
        self._queued: dict[int, list[tuple[int, Tensor]]] = {}  # layer -> [(step, query [N, H, 1, d])]
        self._latest: dict[int, tuple[Tensor, float | None, int | None]] = {}  # layer -> newest key and kernel args

    def __enter__(self) -> DecodeRecorder:
        self.hook.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for layer in list(self._queued):  # decode steps still waiting for their reduction
                    self._flush(layer)
        finally:
            self._queued.clear()
            self._latest.clear()
            self.hook.__exit__(*exc)

    def before_generation(self, prompts, num_generations: int) -> None:
        """Masks of the N = B * G rows' prompts, repeated as the decoder repeats them."""
        G = num_generations
        input_ids = prompts.input_ids.repeat_interleave(G, dim=0)  # [N, P]
        prompt_mask = prompts.attention_mask.repeat_interleave(G, dim=0)  # [N, P]
        keys = key_sets(input_ids, prompt_mask, self.special)  # [N, P, 3]
        stats = self.statistics
        stats.num_text[:] = keys.num_text.to(stats.device)
        stats.num_vision[:] = keys.num_vision.to(stats.device)
        self._prompt_width, self._indicators = input_ids.shape[1], keys.indicators

    def before_decode_step(self, step: int, attention_mask: Tensor) -> None:
        """The next forward feeds completion token ``step``; ``attention_mask`` is its [N, P + step + 1] mask."""
        self._step = (step, attention_mask)

    def before_chunk(self, rows: list[int], inputs: dict[str, Tensor]) -> None:
        pass

    @torch.no_grad()
    def record(self, layer: int, query: Tensor, key: Tensor, *, scaling: float | None,
               sliding_window: int | None) -> None:
        """Queue one decode step's query of ``layer`` (generation row ``step``); reduce every ``flush_steps``."""
        stats = self.statistics
        if self._prompt_width is None or self._step is None or query.shape[0] != stats.text.shape[1]:
            return
        step = self._step[0]
        if query.shape[2] != 1 or key.shape[2] != self._prompt_width + step + 1:
            return  # the prefill, or a forward outside the decode loop
        if step < stats.text.shape[2]:
            self._queued.setdefault(layer, []).append((step, query.detach()))
            self._latest[layer] = (key.detach(), scaling, sliding_window)
            if len(self._queued[layer]) >= self.flush_steps:
                self._flush(layer)

    def _flush(self, layer: int) -> None:
        queued = self._queued.pop(layer, [])
        if not queued:
            return
        key, scaling, sliding_window = self._latest[layer]
        first = queued[0][0]
        query = torch.cat([q for _, q in queued], dim=2)  # [N, H, k, d] consecutive decode steps
        mask = self._step[1]  # [N, P + t + 1] the newest step's mask covers every queued query's keys
        text, vision = attention_mass(query, key, self._indicators, mask.bool(), first_query=0,
                                      first_position=self._prompt_width + first, count=len(queued), scaling=scaling,
                                      sliding_window=sliding_window, variant=self.variant,
                                      chunk_elements=self.chunk_elements)  # [N, k]
        self.statistics.store(layer, slice(None), first, text, vision)

    def finish(self, rollout) -> CapturedAttention:
        """Keep the rows that exist (r < C_i - 1), trimmed to the completion width; hand to ``on_finish``, return."""
        stats = self.statistics
        R = max(rollout.completion_mask.shape[1] - 1, 0)
        exists = generation_rows(rollout.completion_mask).to(stats.device)  # [N, R]
        text = torch.where(exists, stats.text[:, :, :R], torch.zeros_like(stats.text[:, :, :R]))  # [L, N, R]
        vision = torch.where(exists, stats.vision[:, :, :R], torch.zeros_like(stats.vision[:, :, :R]))
        captured = CapturedAttention(text=text, vision=vision, rows=exists, num_text=stats.num_text,
                                     num_vision=stats.num_vision, captured=stats.captured, variant=self.variant)
        if self.on_finish is not None:
            self.on_finish(rollout, captured)
        return captured
