"""The capture's two pieces: a kernel hook on chosen decoder layers, and the attention mass of a block of queries.

Why not ``generate(output_attentions=True)``: it keeps every decode step's attention for
every layer and head (O(L·H·T·(P+T)) memory per row), forces eager attention during
generation and ties the metrics to one generator. Instead, while a hook is installed, each
chosen decoder layer runs its normal attention kernel (sdpa, flash, eager: whatever the
policy was loaded with) for its output and hands the kernel's own query and key tensors
(after rotary embedding) to a :class:`LayerRecorder` (``recorders.py``). Nothing of the
attention module is re-implemented: the hook is a kernel registered in transformers'
``AttentionInterface``.

How the kernel is swapped for one module only: the module's ``config`` is replaced, while
the hook is installed, by a view that names the capture kernel as its
``_attn_implementation`` and forwards every other attribute to the real config. Layers
that are not chosen are not touched.

:func:`attention_mass` is what a recorder computes from those tensors: for a block of
queries, the attention mass on three key sets (kept prompt keys: not padding, not the
sink; text keys; vision keys). Mass on a set is Σ_j softmax(q·K^T·scale + mask)_j · 1[j in set],
which is exactly scaled-dot-product attention with the set indicators as value vectors, so
torch's fused kernel computes it (all keys, causal and padding mask, so the softmax is exact)
without storing the attention matrix; queries are taken in chunks of at most
``chunk_elements`` scores, which bounds the memory of a non-fused fallback too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from dapo_lightning.attention.metrics import VARIANTS

CAPTURE_KERNEL = "dapo_lightning_attention_capture"
DEFAULT_CHUNK_ELEMENTS = 2**22  # scores per chunk: 16 MiB in float32
_HOOKED = "_dapo_attention_capture"  # attribute of a hooked attention module: (recorder, layer index)


class LayerRecorder(Protocol):
    """What the kernel hook calls after each hooked layer's own kernel ran (``recorders.py`` has the two kinds)."""

    def record(self, layer: int, query: Tensor, key: Tensor, *, scaling: float | None,
               sliding_window: int | None) -> None:
        """``query`` [n, H, q, d] and ``key`` [n, H_kv, k, d] as the kernel received them (keys of the whole cache)."""
        ...


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
    """The attention function ``module`` would use without the hook."""
    implementation = module.config._attn_implementation
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if implementation in (None, "eager"):
        if eager is None:
            raise ValueError(f"{type(module).__name__}: eager attention function not found")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


def _capture_kernel(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Registered attention function: the module's own kernel, then the recorder sees its query and key."""
    recorder, layer = getattr(module, _HOOKED)
    view = module.config
    module.config = view.wrapped  # kernels such as flash attention read module.config themselves
    try:
        output = _own_kernel(module)(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = view
    recorder.record(layer, query, key, scaling=kwargs.get("scaling"), sliding_window=kwargs.get("sliding_window"))
    return output


AttentionInterface.register(CAPTURE_KERNEL, _capture_kernel)


def hooked_recorder(module: nn.Module) -> tuple[LayerRecorder, int] | None:
    """The recorder and layer index a :class:`KernelHook` installed on attention ``module`` (None: not hooked).

    A decoder that would run a layer's arithmetic without calling its attention module (``lean_decode``)
    checks this and calls the model instead, so the recorder sees the model's own kernels' tensors.
    """
    return getattr(module, _HOOKED, None)


class KernelHook:
    """Context manager: ``layers`` of ``model`` run through the capture kernel, which calls ``recorder.record``.

    One hook per model at a time (a second is refused); on exit the modules are as they were.
    """

    def __init__(self, model: nn.Module, recorder: LayerRecorder, layers: Sequence[int] | None = None):
        self.modules = decoder_attention_modules(model)
        L = len(self.modules)
        self.layers = list(range(L)) if layers is None else sorted(set(int(i) for i in layers))
        if any(not 0 <= i < L for i in self.layers):
            raise ValueError(f"layers: the model has {L} decoder layers, got {list(layers)}")
        self.recorder = recorder
        self._installed: list[tuple[nn.Module, object]] = []

    @property
    def num_layers(self) -> int:
        return len(self.modules)

    def __enter__(self) -> KernelHook:
        for layer in self.layers:
            module = self.modules[layer]
            if hasattr(module, _HOOKED):
                self.__exit__(None, None, None)
                raise RuntimeError("another attention recorder is already active on this model")
            self._installed.append((module, module.config))
            module.config = _KernelConfig(module.config)
            setattr(module, _HOOKED, (self.recorder, layer))
        return self

    def __exit__(self, *exc) -> None:
        while self._installed:
            module, config = self._installed.pop()
            module.config = config
            delattr(module, _HOOKED)


@torch.no_grad()
def attention_mass(
    query: Tensor,
    key: Tensor,
    indicators: Tensor,
    key_valid: Tensor,
    *,
    first_query: int,
    first_position: int,
    count: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
    variant: str = "original",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Text and vision attention mass of ``count`` consecutive queries. -> [n, count], [n, count] float32

    ``query`` [n, H, q, d]: the queries used are ``query[:, :, first_query : first_query + count]``,
    which sit at key positions ``first_position, first_position + 1, ...`` (causal mask, and
    ``sliding_window`` when given). ``key`` [n, H_kv, S, d] (grouped heads allowed). ``indicators``
    [n, P, 3]: the key sets over the first P key columns (``masks.key_sets``: kept prompt keys,
    text keys, vision keys). ``key_valid`` [n, >= S] bool: the padding mask. ``scaling``: the
    kernel's (1/sqrt(d) when None).

    ``variant="original"``: the head-averaged mass, renormalised over the kept prompt keys
    (SPEC 3: sink zeroed, row summing to 1 over the prompt; a zero row stays zero).
    ``"paper"``: each head's shares within text ∪ vision keys, then averaged over heads.
    """
    if variant not in VARIANTS:
        raise ValueError(f"attention variant: choose from {VARIANTS}, got {variant!r}")
    n, H, _, d = query.shape
    P = indicators.shape[1]
    S = key.shape[2]
    R = count
    groups = H // key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    sums = torch.zeros(n, R, 3 if variant == "original" else 2, device=query.device)  # [n, R, .] over heads
    rows_per_chunk = max(1, min(R, chunk_elements // max(n * S, 1))) if R else 1
    heads_per_chunk = max(1, min(H, chunk_elements // max(n * rows_per_chunk * S, 1)))
    columns = torch.arange(S, device=query.device)  # [S]
    valid = key_valid[:, :S].to(query.device)[:, None, None, :]  # [n, 1, 1, S]
    # Value vectors = key-set indicators, padded to the head size (the fused kernels want equal sizes): the
    # attention output of a query is then its attention mass on each set, and no [r, S] matrix is stored.
    values = torch.zeros(n, 1, S, max(d, 3), device=query.device)  # [n, 1, S, d]
    values[:, 0, :P, :3] = indicators.to(query.device)
    for h0 in range(0, H, heads_per_chunk):
        heads = torch.arange(h0, min(h0 + heads_per_chunk, H), device=query.device)
        keys = key.index_select(1, heads // groups).float()  # [n, h, S, d]
        for r0 in range(0, R, rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, R)
            positions = torch.arange(first_position + r0, first_position + r1, device=query.device)  # [r] columns
            allowed = columns[None, :] <= positions[:, None]  # [r, S] causal
            if sliding_window is not None:
                allowed = allowed & (columns[None, :] > positions[:, None] - sliding_window)
            q = query[:, h0 : h0 + len(heads), first_query + r0 : first_query + r1].float()  # [n, h, r, d]
            mass = scaled_dot_product_attention(
                q,
                keys,
                values.expand(n, len(heads), S, values.shape[-1]),
                attn_mask=allowed[None, None] & valid,
                scale=scale,
            )[..., :3]  # [n, h, r, 3]: softmax(q k^T) summed over kept prompt keys, text keys, vision keys
            if variant == "original":
                sums[:, r0:r1] += mass.sum(1)
            else:  # per-head shares within T ∪ V
                text, vision = mass[..., 1], mass[..., 2]  # [n, h, r]
                total = text + vision
                safe = torch.where(total > 0, total, torch.ones_like(total))
                sums[:, r0:r1, 0] += torch.where(total > 0, text / safe, torch.zeros_like(text)).sum(1)
                sums[:, r0:r1, 1] += torch.where(total > 0, vision / safe, torch.zeros_like(vision)).sum(1)
    if variant == "original":
        total = sums[..., 0]  # [n, R] head-summed prompt mass without the sink
        safe = torch.where(total > 0, total, torch.ones_like(total))
        text = torch.where(total > 0, sums[..., 1] / safe, torch.zeros_like(total))  # [n, R] renormalised
        vision = torch.where(total > 0, sums[..., 2] / safe, torch.zeros_like(total))
    else:
        text, vision = sums[..., 0] / H, sums[..., 1] / H  # [n, R] head averages
    return text, vision
