"""Capturing SPEC 3's attention statistics inside the teacher-forced forward, with the policy's own kernel.

Why not ``generate(output_attentions=True)``: it keeps every decode step's attention
for every layer and head (O(L·H·T·(P+T)) memory per row), forces eager attention
during generation and ties the metrics to one generator. Instead, while
:class:`AttentionCapture` is active, each decoder layer that is needed runs its normal
attention kernel (sdpa, flash, eager: whatever the policy was loaded with) for its
output and, beside it, computes for the generation-row queries only the attention
mass on three key sets: kept prompt keys (not padding, not the sink), text keys and
vision keys. Mass on a set is Σ_j softmax(q·K^T·scale + mask)_j · 1[j in set], which is
exactly scaled-dot-product attention with the set indicators as value vectors, so
torch's fused kernel computes it (all keys, causal and padding mask, so the softmax is
exact) without storing the attention matrix; queries are taken in chunks of at most
``chunk_elements`` scores, which bounds the memory of a non-fused fallback too. In all
only L·N·(T-1)·2 floats are kept. The queries and keys are the kernel's own inputs
(after rotary embedding), read through a kernel registered in transformers'
``AttentionInterface``: nothing of the attention module is re-implemented.

How the kernel is swapped for one module only: the module's ``config`` is replaced,
for the duration of the context, by a view that names the capture kernel as its
``_attn_implementation`` and forwards every other attribute to the real config.
Layers that are not needed are not touched.

Positions (``RolloutBatch.model_inputs``): a chunk of n rows has P' prompt columns
(left-padded, common padding trimmed) followed by T' completion columns (right-padded),
so completion token r of every row sits at column P' + r, and generation row r is the
query at that column for r < C_i - 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from dapo_lightning.attention import (
    VARIANTS,
    CapturedAttention,
    SpecialTokens,
    first_real_position,
    generation_rows,
    modality_masks,
)

CAPTURE_KERNEL = "dapo_lightning_attention_capture"
DEFAULT_CHUNK_ELEMENTS = 2**22  # scores per chunk: 16 MiB in float32
GENERATION_FLUSH_STEPS = 32  # decode steps whose queries are reduced together


def decoder_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer of the language model, in layer order.

    Works for ``Qwen2_5_VLForConditionalGeneration`` and for it wrapped by peft or DDP
    (the layers are found by name: ``...language_model.layers``, else ``...model.layers``).
    """
    candidates = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (
            name.endswith("language_model.layers") or name.endswith("model.layers")
        ):
            candidates[name] = module
    for suffix in ("language_model.layers", "model.layers"):
        for name, layers in candidates.items():
            if name.endswith(suffix) and all(hasattr(layer, "self_attn") for layer in layers):
                return [layer.self_attn for layer in layers]
    raise ValueError(f"{type(model).__name__}: no decoder layers with a self_attn module were found")


class _KernelConfig:
    """A module's config that names the capture kernel; every other attribute is the real config's."""

    _attn_implementation = CAPTURE_KERNEL

    def __init__(self, config):
        object.__setattr__(self, "wrapped", config)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def _own_kernel(module: nn.Module):
    """The attention function ``module`` would use without the capture."""
    implementation = module.config._attn_implementation
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if implementation in (None, "eager"):
        if eager is None:
            raise ValueError(f"{type(module).__name__}: eager attention function not found")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def _capture_kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Registered attention function: the module's own kernel, then the capture's statistics."""
    capture, layer = module._dapo_attention_capture
    view = module.config
    module.config = view.wrapped  # kernels such as flash attention read module.config themselves
    try:
        output = _own_kernel(module)(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = view
    capture.record(layer, query, key, scaling=kwargs.get("scaling"), sliding_window=kwargs.get("sliding_window"))
    return output


AttentionInterface.register(CAPTURE_KERNEL, _capture_kernel)


@dataclass
class _Chunk:
    """The rows of the forward about to run, prepared by ``before_forward``."""

    rows: Tensor  # [n] rollout row indices
    width: int  # S = P' + T' columns
    prompt_width: int  # P'
    num_generation_rows: int  # R' = T' - 1
    key_valid: Tensor  # [n, S] bool
    indicators: Tensor  # [n, P', 3] float32 columns: kept prompt key (not padding, not the sink), text, vision
    row_exists: Tensor  # [n, R'] bool


class AttentionCapture:
    """Context manager that fills a :class:`CapturedAttention` during the module's teacher-forced pass.

    Args:
        model: the policy (plain, peft-wrapped, ...).
        special: token ids for the modality masks.
        num_rows: N, rows of the rollout.
        completion_width: T, the rollout's padded completion width.
        layers: decoder layers to capture (None: all). The others keep running untouched.
        variant: "original" (head average, sink zeroed, renormalised over prompt keys) or
            "paper" (per-head shares within text ∪ vision keys, then head average).
        chunk_elements: most attention scores held at once.

    The module calls ``before_forward(rows, inputs)`` before each chunk's forward;
    ``result`` holds the statistics after the context exits.
    """

    def __init__(
        self,
        model: nn.Module,
        special: SpecialTokens,
        num_rows: int,
        completion_width: int,
        *,
        layers: list[int] | None = None,
        variant: str = "original",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        device: torch.device | str | None = None,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"attention variant: choose from {VARIANTS}, got {variant!r}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements: must be >= 1, got {chunk_elements}")
        self.model = model
        self.special = special
        self.variant = variant
        self.chunk_elements = int(chunk_elements)
        self.modules = decoder_attention_modules(model)
        L = len(self.modules)
        self.layers = list(range(L)) if layers is None else sorted(set(int(i) for i in layers))
        if any(not 0 <= i < L for i in self.layers):
            raise ValueError(f"layers: the model has {L} decoder layers, got {layers}")
        device = device if device is not None else next(model.parameters()).device
        R = max(completion_width - 1, 0)
        self.text = torch.zeros(L, num_rows, R, device=device)  # [L, N, R]
        self.vision = torch.zeros(L, num_rows, R, device=device)  # [L, N, R]
        self.rows = torch.zeros(num_rows, R, dtype=torch.bool, device=device)  # [N, R]
        self.num_text = torch.zeros(num_rows, dtype=torch.long, device=device)  # [N]
        self.num_vision = torch.zeros(num_rows, dtype=torch.long, device=device)  # [N]
        self.captured = torch.zeros(L, num_rows, dtype=torch.bool, device=device)  # [L, N]
        self._chunk: _Chunk | None = None
        self._installed: list[tuple[nn.Module, object]] = []
        self.result: CapturedAttention | None = None

    # --- context ---------------------------------------------------------------------------------

    def __enter__(self) -> AttentionCapture:
        for layer in self.layers:
            module = self.modules[layer]
            if hasattr(module, "_dapo_attention_capture"):
                self.__exit__(None, None, None)
                raise RuntimeError("another AttentionCapture is already active on this model")
            self._installed.append((module, module.config))
            module.config = _KernelConfig(module.config)
            module._dapo_attention_capture = (self, layer)
        return self

    def __exit__(self, *exc) -> None:
        if self._chunk is not None and exc[0] is None:
            for layer in list(getattr(self, "_queued", {})):  # decode steps still waiting for their reduction
                self._flush(layer)
        while self._installed:
            module, config = self._installed.pop()
            module.config = config
            del module._dapo_attention_capture
        self._chunk = None
        self.result = CapturedAttention(
            text=self.text,
            vision=self.vision,
            rows=self.rows,
            num_text=self.num_text,
            num_vision=self.num_vision,
            captured=self.captured,
            variant=self.variant,
        )

    # --- per chunk -------------------------------------------------------------------------------

    def before_forward(self, rows: list[int] | Tensor, inputs: dict[str, Tensor]) -> None:
        """Prepare masks and positions for the forward over ``inputs`` (``RolloutBatch.model_inputs(rows)``)."""
        device = self.text.device
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)  # [n]
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]  # [n, S]
        S, T = input_ids.shape[1], inputs["completion_ids"].shape[1]
        P = S - T
        masks = modality_masks(input_ids[:, :P], attention_mask[:, :P], self.special)  # [n, P]
        sink = first_real_position(attention_mask[:, :P])  # [n]
        kept = attention_mask[:, :P].bool().clone()  # [n, P]
        kept[torch.arange(len(rows_t), device=kept.device), sink] = False  # SPEC 3: the sink column is zeroed
        indicators = torch.stack([kept, masks.text & kept, masks.vision & kept], dim=-1).float()  # [n, P, 3]
        row_exists = generation_rows(inputs["completion_mask"]).to(device)  # [n, T - 1]
        R = row_exists.shape[1]
        self.rows[rows_t, :R] = row_exists
        self.num_text[rows_t] = masks.num_text.to(device)
        self.num_vision[rows_t] = masks.num_vision.to(device)
        self._chunk = _Chunk(
            rows=rows_t,
            width=S,
            prompt_width=P,
            num_generation_rows=R,
            key_valid=attention_mask.bool(),
            indicators=indicators,
            row_exists=row_exists,
        )

    # --- capture during generation ----------------------------------------------------------------

    def before_generation(self, prompts, num_generations: int) -> None:
        """Prepare to capture the decode steps of ``generate_shared`` for all N = B * G rows.

        Decode step t feeds completion token t, so its single query is generation row t
        (SPEC 3): the same rows the original collected from ``generate(output_attentions=True)``
        and the teacher-forced pass computes, here without a second forward.
        """
        device = self.text.device
        G = num_generations
        input_ids = prompts.input_ids.repeat_interleave(G, dim=0)  # [N, P]
        prompt_mask = prompts.attention_mask.repeat_interleave(G, dim=0)  # [N, P]
        P = input_ids.shape[1]
        masks = modality_masks(input_ids, prompt_mask, self.special)  # [N, P]
        sink = first_real_position(prompt_mask)  # [N]
        kept = prompt_mask.bool().clone()
        kept[torch.arange(len(kept), device=kept.device), sink] = False
        rows_t = torch.arange(input_ids.shape[0], device=device)
        self.num_text[rows_t] = masks.num_text.to(device)
        self.num_vision[rows_t] = masks.num_vision.to(device)
        self._chunk = _Chunk(
            rows=rows_t,
            width=-1,
            prompt_width=P,
            num_generation_rows=self.text.shape[2],
            key_valid=prompt_mask.bool(),
            indicators=torch.stack([kept, masks.text & kept, masks.vision & kept], dim=-1).float(),
            row_exists=torch.ones(len(rows_t), self.text.shape[2], dtype=torch.bool, device=device),
        )
        self._decode_step: tuple[int, Tensor] | None = None
        # Decode-step queries wait here and are reduced in one batched call per layer every
        # GENERATION_FLUSH_STEPS steps (and at the end), against the keys cached by then: the
        # causal mask keeps each query to the keys it saw. Memory: L x N x H x flush x d floats.
        self._queued: dict[int, list[tuple[int, Tensor]]] = {}
        self._latest: dict[int, tuple[Tensor, float | None, int | None]] = {}

    def before_decode_step(self, step: int, attention_mask: Tensor) -> None:
        """The next forward feeds completion token ``step``; ``attention_mask`` is its [N, P + step + 1] mask."""
        self._decode_step = (step, attention_mask)

    def _flush(self, layer: int) -> None:
        queued = self._queued.pop(layer, [])
        if not queued:
            return
        key, scaling, sliding_window = self._latest[layer]
        first = queued[0][0]
        query = torch.cat([q for _, q in queued], dim=2)  # [N, H, k, d] consecutive decode steps
        mask = self._decode_step[1]  # [N, P + t + 1] the newest step's mask covers every queued query's keys
        self._store(layer, self._chunk, first, len(queued), *self._masses(
            query, key, self._chunk, 0, first, len(queued), mask.bool(), scaling, sliding_window
        ))

    def finish_generation(self, completion_mask: Tensor) -> None:
        """Reduce the queued decode steps, keep the rows that exist (r < C_i - 1), trim to the completion width."""
        self._latest.clear()  # (queued steps were reduced when the context closed)
        R = max(completion_mask.shape[1] - 1, 0)
        exists = generation_rows(completion_mask).to(self.text.device)  # [N, R]
        self.text = torch.where(exists, self.text[:, :, :R], torch.zeros_like(self.text[:, :, :R]))
        self.vision = torch.where(exists, self.vision[:, :, :R], torch.zeros_like(self.vision[:, :, :R]))
        self.rows = exists
        self.result = CapturedAttention(
            text=self.text, vision=self.vision, rows=self.rows, num_text=self.num_text,
            num_vision=self.num_vision, captured=self.captured, variant=self.variant,
        )

    # --- recording ---------------------------------------------------------------------------------

    @torch.no_grad()
    def record(
        self, layer: int, query: Tensor, key: Tensor, *, scaling: float | None, sliding_window: int | None
    ) -> None:
        """Reduce one layer's attention for the prepared rows to per-row text and vision masses."""
        chunk = self._chunk
        if chunk is None or query.shape[0] != len(chunk.rows):
            return
        P, R = chunk.prompt_width, chunk.num_generation_rows
        decode = getattr(self, "_decode_step", None) if chunk.width < 0 else None
        if chunk.width < 0:  # generation: one decode step, one generation row, queued for a batched reduction
            if decode is None or query.shape[2] != 1 or key.shape[2] != P + decode[0] + 1:
                return  # the prefill, or a forward outside the decode loop
            if decode[0] < self.text.shape[2]:
                self._queued.setdefault(layer, []).append((decode[0], query.detach()))
                self._latest[layer] = (key.detach(), scaling, sliding_window)
                if len(self._queued[layer]) >= GENERATION_FLUSH_STEPS:
                    self._flush(layer)
            return
        elif query.shape[2] == key.shape[2] == chunk.width:
            offset, first, count, key_valid = P, 0, R, chunk.key_valid  # one forward over prompt + completion
        elif R and query.shape[2] == R and key.shape[2] == P + R:
            offset, first, count, key_valid = 0, 0, R, chunk.key_valid  # shared-prompt pass: completion queries only
        else:
            return  # another forward (a prompt-only pass)
        self._store(layer, chunk, first, count,
                    *self._masses(query, key, chunk, offset, first, count, key_valid, scaling, sliding_window))

    def _store(self, layer: int, chunk: _Chunk, first: int, count: int, text: Tensor, vision: Tensor) -> None:
        exists = chunk.row_exists[:, first : first + count].to(text.device)
        device = self.text.device
        self.text[layer, chunk.rows, first : first + count] = torch.where(exists, text, torch.zeros_like(text)).to(device)
        self.vision[layer, chunk.rows, first : first + count] = torch.where(
            exists, vision, torch.zeros_like(vision)
        ).to(device)
        self.captured[layer, chunk.rows] = True

    def _masses(self, query, key, chunk, offset, first, R, key_valid, scaling, sliding_window):
        """Text and vision mass [n, R] of generation rows first .. first + R - 1 (queries from ``offset``)."""
        n, H, _, d = query.shape
        P = chunk.prompt_width
        S = key.shape[2]
        groups = H // key.shape[1]
        scale = scaling if scaling is not None else d**-0.5
        sums = torch.zeros(n, R, 3 if self.variant == "original" else 2, device=query.device)  # [n, R, .] over heads
        rows_per_chunk = max(1, min(R, self.chunk_elements // max(n * S, 1))) if R else 1
        heads_per_chunk = max(1, min(H, self.chunk_elements // max(n * rows_per_chunk * S, 1)))
        columns = torch.arange(S, device=query.device)  # [S]
        valid = key_valid[:, :S].to(query.device)[:, None, None, :]  # [n, 1, 1, S]
        # Value vectors = key-set indicators, padded to the head size (the fused kernels want equal sizes): the
        # attention output of a query is then its attention mass on each set, and no [r, S] matrix is stored.
        values = torch.zeros(n, 1, S, max(d, 3), device=query.device)  # [n, 1, S, d]
        values[:, 0, :P, :3] = chunk.indicators.to(query.device)
        for h0 in range(0, H, heads_per_chunk):
            heads = torch.arange(h0, min(h0 + heads_per_chunk, H), device=query.device)
            keys = key.index_select(1, heads // groups).float()  # [n, h, S, d]
            for r0 in range(0, R, rows_per_chunk):
                r1 = min(r0 + rows_per_chunk, R)
                positions = torch.arange(P + first + r0, P + first + r1, device=query.device)  # [r] query columns
                allowed = columns[None, :] <= positions[:, None]  # [r, S] causal
                if sliding_window is not None:
                    allowed = allowed & (columns[None, :] > positions[:, None] - sliding_window)
                q = query[:, h0 : h0 + len(heads), offset + r0 : offset + r1].float()  # [n, h, r, d]
                mass = scaled_dot_product_attention(
                    q,
                    keys,
                    values.expand(n, len(heads), S, values.shape[-1]),
                    attn_mask=allowed[None, None] & valid,
                    scale=scale,
                )[..., :3]  # [n, h, r, 3]: softmax(q k^T) summed over kept prompt keys, text keys, vision keys
                if self.variant == "original":
                    sums[:, r0:r1] += mass.sum(1)
                else:  # per-head shares within T ∪ V
                    text, vision = mass[..., 1], mass[..., 2]  # [n, h, r]
                    total = text + vision
                    safe = torch.where(total > 0, total, torch.ones_like(total))
                    sums[:, r0:r1, 0] += torch.where(total > 0, text / safe, torch.zeros_like(text)).sum(1)
                    sums[:, r0:r1, 1] += torch.where(total > 0, vision / safe, torch.zeros_like(vision)).sum(1)
        if self.variant == "original":
            total = sums[..., 0]  # [n, R] head-summed prompt mass without the sink
            safe = torch.where(total > 0, total, torch.ones_like(total))
            text = torch.where(total > 0, sums[..., 1] / safe, torch.zeros_like(total))  # [n, R] renormalised
            vision = torch.where(total > 0, sums[..., 2] / safe, torch.zeros_like(total))
        else:
            text, vision = sums[..., 0] / H, sums[..., 1] / H  # [n, R] head averages
        return text, vision
