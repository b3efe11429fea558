"""Attention diagnostics as pure functions: modality masks, layer segments, VGR/AEI, token weights (SPEC 3, 4).

Everything here works on small tensors that the capture (``attention_capture.py``)
leaves behind: for each layer and each generation row, the head-averaged attention
mass on text keys and on vision keys after the sink column is zeroed and the row is
renormalised over the prompt keys. Shapes: N rows, P prompt tokens, R generation
rows per completion (R = T - 1 for T completion tokens), L decoder layers.

Generation rows (SPEC 3): the queries at the completion's own tokens except its last
one. Row r of a completion is the query at completion token r and predicts token r + 1;
a completion of C tokens has C - 1 rows. This is what the original system collected
step by step from ``generate(output_attentions=True)``; :func:`generation_step_masses`
reproduces that collection as the reference the capture is tested (and benchmarked)
against.

Differences from the original code, as SPEC 3 asks:
- the sink column zeroed is the first *real* prompt token (the original zeroed column 0
  of the padded batch, a padding column for left-padded rows);
- the paper's variant (per-head normalisation within the vision and text keys, VGR
  oriented as vision density over text density) is ``variant="paper"``; the code's is the default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

SEGMENTS = ("early", "middle", "late", "all")
SKIP_REASONS = ("no_attention", "no_generation_rows", "no_vision_tokens")
VARIANTS = ("original", "paper")
MIN_VISION_DENSITY = 1e-6  # SPEC 2: a row whose A_V / |V| is at most this has no usable VGR


# --- masks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the modality masks need (SPEC 3)."""

    image_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    not_text: tuple[int, ...]  # bos, eos, pad, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        vocab = tokenizer.get_vocab()
        names = {
            "image_pad": "<|image_pad|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
        }
        missing = [token for token in names.values() if token not in vocab]
        if missing:
            raise ValueError(
                f"attention metrics need Qwen-VL's special tokens; the tokenizer lacks {', '.join(missing)}"
            )
        ids = {key: int(vocab[token]) for key, token in names.items()}
        named = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, vocab.get("<|endoftext|>")]
        not_text = {i for i in named if i is not None}
        not_text.update(ids[k] for k in ("vision_start", "vision_end", "im_start", "im_end"))
        return cls(**ids, not_text=tuple(sorted(int(i) for i in not_text)))


@dataclass(frozen=True)
class ModalityMasks:
    """Which prompt keys are vision (V) and which are text (T), per row."""

    text: Tensor  # [n, P] bool
    vision: Tensor  # [n, P] bool

    @property
    def num_text(self) -> Tensor:
        return self.text.sum(-1)  # [n]

    @property
    def num_vision(self) -> Tensor:
        return self.vision.sum(-1)  # [n]


def modality_masks(input_ids: Tensor, attention_mask: Tensor, special: SpecialTokens) -> ModalityMasks:
    """SPEC 3 masks over the prompt keys of each row (left padding allowed).

    V = ``<|image_pad|>`` tokens strictly between a ``<|vision_start|>`` and the next
    ``<|vision_end|>``. T = every other real prompt token except the special tokens of
    ``special.not_text`` and the first system segment (the first ``<|im_start|>`` through
    the next ``<|im_end|>``, or to the end of the prompt when it is never closed).
    Qwen's chat template always opens with a system turn, so this never removes the question.
    """
    n, P = input_ids.shape
    real = attention_mask.bool()  # [n, P]
    positions = torch.arange(P, device=input_ids.device).expand(n, P)  # [n, P]
    none = torch.full_like(positions, -1)
    is_start = (input_ids == special.vision_start) & real
    is_end = (input_ids == special.vision_end) & real
    # nearest <|vision_start|> and <|vision_end|> strictly to the left of each position
    last_start = _shift_right(torch.where(is_start, positions, none).cummax(-1).values, -1)  # [n, P]
    last_end = _shift_right(torch.where(is_end, positions, none).cummax(-1).values, -1)  # [n, P]
    ends_to_the_right = is_end.flip(-1).long().cumsum(-1).flip(-1) - is_end.long()  # [n, P]
    inside = (last_start > last_end) & (ends_to_the_right > 0)  # an open bracket that closes later
    vision = inside & (input_ids == special.image_pad) & real  # [n, P]

    is_im_start = (input_ids == special.im_start) & real
    is_im_end = (input_ids == special.im_end) & real
    first_open = torch.where(is_im_start, positions, torch.full_like(positions, P)).min(-1).values  # [n] P when absent
    closes = is_im_end & (positions >= first_open.unsqueeze(-1))
    first_close = torch.where(closes, positions, torch.full_like(positions, P - 1)).min(-1).values  # [n]
    system = (positions >= first_open.unsqueeze(-1)) & (positions <= first_close.unsqueeze(-1))  # [n, P]

    not_text = torch.isin(input_ids, torch.tensor(special.not_text, device=input_ids.device))
    text = real & ~vision & ~not_text & ~system  # [n, P]
    return ModalityMasks(text=text, vision=vision)


def _shift_right(values: Tensor, fill: int) -> Tensor:
    """[n, P] -> [n, P], column j holds column j - 1 (the first holds ``fill``)."""
    return torch.cat([torch.full_like(values[:, :1], fill), values[:, :-1]], dim=-1)


def first_real_position(attention_mask: Tensor) -> Tensor:
    """Column of each row's first non-padding token: the attention sink of SPEC 3. [n, S] -> [n]"""
    return attention_mask.long().argmax(-1)


# --- captured statistics ---------------------------------------------------------------------------


@dataclass
class CapturedAttention:
    """What the capture keeps: per layer and generation row, renormalised mass on T and V keys.

    ``text[l, i, r]`` is Σ over text keys of row r of completion i at layer l after
    head-averaging, zeroing the sink and renormalising over the prompt keys (``variant``
    "original"), or the head average of per-head shares within T ∪ V ("paper").
    Rows that do not exist (r >= C_i - 1) hold 0.
    """

    text: Tensor  # [L, N, R] float32
    vision: Tensor  # [L, N, R] float32
    rows: Tensor  # [N, R] bool: generation row r exists for completion i
    num_text: Tensor  # [N] |T|
    num_vision: Tensor  # [N] |V|
    captured: Tensor  # [L, N] bool: layer l was captured for completion i
    variant: str = "original"

    @property
    def num_layers(self) -> int:
        return self.text.shape[0]

    @property
    def num_generation_rows(self) -> Tensor:
        return self.rows.sum(-1)  # [N]

    def layer_masses(self) -> tuple[Tensor, Tensor]:
        """A_T and A_V of SPEC 3 per layer: sums over generation rows. -> [L, N], [L, N] (float64)"""
        return self.text.double().sum(-1), self.vision.double().sum(-1)

    def token_masses(self) -> tuple[Tensor, Tensor]:
        """a_T[r] and a_V[r] of SPEC 4: per generation row, averaged over the captured layers. -> [N, R], [N, R]"""
        layers = self.captured.any(-1)  # [L]
        if not layers.any():
            zeros = torch.zeros_like(self.text[0])
            return zeros, zeros
        return self.text[layers].mean(0), self.vision[layers].mean(0)  # [N, R]


# --- segments and metrics ----------------------------------------------------------------------------


def segment_layers(num_layers: int) -> dict[str, range]:
    """SPEC 3: k = L // 3; early [0, k), middle [k, 2k), late [2k, L), all [0, L) (early, middle empty when L < 3)."""
    k = num_layers // 3
    return {"early": range(0, k), "middle": range(k, 2 * k), "late": range(2 * k, num_layers), "all": range(num_layers)}


@dataclass(frozen=True)
class SegmentMetrics:
    """SPEC 3 metrics of one layer segment, one value per row (NaN where undefined)."""

    attention_text: Tensor  # [N] A_T averaged over the segment's layers
    attention_vision: Tensor  # [N] A_V
    vgr: Tensor  # [N] (A_T/|T|) / (A_V/|V|); the paper variant: its inverse
    aei_text: Tensor  # [N] (A_T/(A_T+A_V)) / (|T|/(|T|+|V|))
    aei_vision: Tensor  # [N] (A_V/(A_T+A_V)) / (|V|/(|T|+|V|))
    text_ratio: Tensor  # [N] text density share: VGR/(1+VGR) with the code's VGR
    vision_ratio: Tensor  # [N] vision density share: 1/(1+VGR)

    METRICS = ("vgr", "aei_text", "aei_vision", "text_ratio", "vision_ratio", "attention_text", "attention_vision")


def segment_metrics(
    attention_text: Tensor, attention_vision: Tensor, num_text: Tensor, num_vision: Tensor, *, variant: str = "original"
) -> SegmentMetrics:
    """VGR, AEI and ratios from segment-averaged masses (SPEC 3). All inputs [N]; outputs float64 [N].

    VGR is +inf when |V| = 0 and NaN whenever else it is not in (0, inf). With
    ``variant="paper"`` VGR is vision density over text density (NaN when |V| = 0);
    the ratios keep their meaning (``vision_ratio`` = vision density share) in both.
    """
    a_t, a_v = attention_text.double(), attention_vision.double()  # [N]
    n_t, n_v = num_text.double(), num_vision.double()  # [N]
    text_density = a_t / n_t  # [N] NaN when |T| = 0
    vision_density = a_v / n_v  # [N] NaN when |V| = 0
    code_vgr = _in_open_range(text_density / vision_density)  # [N]
    code_vgr = torch.where(n_v == 0, torch.full_like(code_vgr, math.inf), code_vgr)
    if variant == "paper":
        vgr = _in_open_range(vision_density / text_density)
    elif variant == "original":
        vgr = code_vgr
    else:
        raise ValueError(f"attention variant: choose from {VARIANTS}, got {variant!r}")
    infinite = torch.isinf(code_vgr)
    text_ratio = torch.where(infinite, torch.ones_like(code_vgr), code_vgr / (1 + code_vgr))
    vision_ratio = torch.where(infinite, torch.zeros_like(code_vgr), 1 / (1 + code_vgr))
    total_attention, total_keys = a_t + a_v, n_t + n_v
    aei_text = _finite_or_nan((a_t / total_attention) / (n_t / total_keys))
    aei_vision = _finite_or_nan((a_v / total_attention) / (n_v / total_keys))
    return SegmentMetrics(a_t, a_v, vgr, aei_text, aei_vision, text_ratio, vision_ratio)


def _in_open_range(values: Tensor) -> Tensor:
    """values where 0 < v < inf, NaN elsewhere."""
    return torch.where((values > 0) & torch.isfinite(values), values, torch.full_like(values, math.nan))


def _finite_or_nan(values: Tensor) -> Tensor:
    return torch.where(torch.isfinite(values), values, torch.full_like(values, math.nan))


def segment_masses(layer_text: Tensor, layer_vision: Tensor, layers: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean of per-layer A_T, A_V over ``layers`` ([L, N] -> [N]); NaN for an empty segment."""
    if len(layers) == 0:
        nan = torch.full_like(layer_text[0], math.nan)
        return nan, nan
    index = torch.tensor(list(layers), device=layer_text.device)
    return layer_text.index_select(0, index).mean(0), layer_vision.index_select(0, index).mean(0)


def reward_vgr(segments: dict[str, SegmentMetrics], num_text: Tensor, num_vision: Tensor) -> Tensor:
    """The per-row value fed to the ``vgr`` rewards (SPEC 2, 3): late segment, falling back to all. [N] float64

    Always text density over vision density (smaller = more vision-grounded), whichever
    variant produced the masses. Invalid rows (SPEC 2: |T| <= 0, |V| <= 0 or
    A_V/|V| <= 1e-6) are NaN, or +inf when |V| = 0, so the rewards treat them as invalid.
    """

    def value(metrics: SegmentMetrics) -> Tensor:
        text_density = metrics.attention_text / num_text.double()
        vision_density = metrics.attention_vision / num_vision.double()
        vgr = _in_open_range(text_density / vision_density)  # [N]
        invalid = (num_text <= 0) | ~(vision_density > MIN_VISION_DENSITY)
        vgr = torch.where(invalid, torch.full_like(vgr, math.nan), vgr)
        return torch.where(num_vision <= 0, torch.full_like(vgr, math.inf), vgr)

    late, everything = value(segments["late"]), value(segments["all"])
    return torch.where(torch.isfinite(late), late, everything)


def skip_reasons(captured: Tensor, num_generation_rows: Tensor, num_vision: Tensor) -> list[str | None]:
    """Why a row has no metrics (SPEC 3), checked in this order; None for a usable row. Inputs [N]."""
    reasons: list[str | None] = []
    for has_attention, rows, vision in zip(
        captured.tolist(), num_generation_rows.tolist(), num_vision.tolist(), strict=True
    ):
        if not has_attention:
            reasons.append("no_attention")
        elif rows <= 0:
            reasons.append("no_generation_rows")
        elif vision <= 0:
            reasons.append("no_vision_tokens")
        else:
            reasons.append(None)
    return reasons


@dataclass
class AttentionReport:
    """Per-row results of one rollout's capture: what ``AttentionMetrics`` attaches as ``extras["attention"]``."""

    segments: dict[str, SegmentMetrics]  # SEGMENTS -> metrics, each [N]
    reward_vgr: Tensor  # [N] float64, the value the vgr rewards read
    skip_reasons: list[str | None]  # [N]
    num_text: Tensor  # [N]
    num_vision: Tensor  # [N]
    num_generation_rows: Tensor  # [N]
    segment_layers: dict[str, range] = field(default_factory=dict)
    variant: str = "original"

    @property
    def num_rows(self) -> int:
        return len(self.skip_reasons)

    @property
    def usable(self) -> Tensor:
        return torch.tensor([r is None for r in self.skip_reasons], dtype=torch.bool)  # [N]

    def skip_counts(self) -> dict[str, int]:
        return {reason: sum(1 for r in self.skip_reasons if r == reason) for reason in SKIP_REASONS}

    def row(self, i: int) -> dict:
        """Row ``i`` as plain JSON-ready values (non-finite numbers become None)."""
        segments = {
            name: {metric: _plain(getattr(m, metric)[i]) for metric in SegmentMetrics.METRICS}
            for name, m in self.segments.items()
            if len(self.segment_layers.get(name, (0,))) > 0
        }
        return {
            "skip_reason": self.skip_reasons[i],
            "reward_vgr": _plain(self.reward_vgr[i]),
            "text_tokens": int(self.num_text[i]),
            "vision_tokens": int(self.num_vision[i]),
            "generation_rows": int(self.num_generation_rows[i]),
            "segments": segments,
        }


def _plain(value: Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def attention_report(captured: CapturedAttention) -> AttentionReport:
    """Every SPEC 3 metric of every row from the captured masses."""
    layer_text, layer_vision = captured.layer_masses()  # [L, N]
    layers_of = segment_layers(captured.num_layers)
    was_captured = captured.captured.any(-1).tolist()  # [L]: a layer left out of the capture is left out of the means
    segments = {}
    for name, layers in layers_of.items():
        a_t, a_v = segment_masses(layer_text, layer_vision, [i for i in layers if was_captured[i]])  # [N]
        segments[name] = segment_metrics(a_t, a_v, captured.num_text, captured.num_vision, variant=captured.variant)
    reasons = skip_reasons(captured.captured.any(0), captured.num_generation_rows, captured.num_vision)
    values = reward_vgr(segments, captured.num_text, captured.num_vision)
    values = torch.where(captured.captured.any(0).to(values.device), values, torch.full_like(values, math.nan))
    return AttentionReport(
        segments=segments,
        reward_vgr=values,
        skip_reasons=reasons,
        num_text=captured.num_text,
        num_vision=captured.num_vision,
        num_generation_rows=captured.num_generation_rows,
        segment_layers=layers_of,
        variant=captured.variant,
    )


# --- token weights (SPEC 4) --------------------------------------------------------------------------


def gaussian_smooth(values: Tensor, lengths: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of each row's first ``lengths[i]`` values, replicate-padded at both ends. [N, R] -> [N, R]

    Kernel half-width max(1, int(3 sigma)), weights exp(-x^2 / (2 sigma^2)) normalised
    to sum 1 (SPEC 4). Positions at or past a row's length are returned unchanged.
    """
    if sigma <= 0 or values.shape[1] == 0:
        return values
    half = max(1, int(3 * sigma))
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=values.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(values.dtype)  # [2h+1]
    N, R = values.shape
    positions = torch.arange(R, device=values.device)
    # replicate padding on the right of each row's valid prefix: position p reads min(p, length - 1)
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)  # [N, 1]
    padded_index = torch.minimum(torch.arange(-half, R + half, device=values.device).clamp(min=0).unsqueeze(0), last)
    padded = values.gather(1, padded_index)  # [N, R + 2h]
    smoothed = torch.nn.functional.conv1d(padded.unsqueeze(1), kernel.view(1, 1, -1)).squeeze(1)  # [N, R]
    return torch.where(positions.unsqueeze(0) < lengths.unsqueeze(-1), smoothed, values)


def token_vgr_weights(
    text: Tensor,
    vision: Tensor,
    rows: Tensor,
    num_text: Tensor,
    num_vision: Tensor,
    width: int,
    *,
    smooth_sigma: float = 0.0,
    clip: tuple[float, float] | None = (0.2, 3.0),
    topk_ratio: float | None = None,
) -> Tensor:
    """SPEC 4 per-token advantage multipliers from inverse per-token VGR. -> [N, width] float32

    ``text``/``vision`` [N, R] are a_T[r], a_V[r] (layer-averaged masses of generation
    row r), ``rows`` [N, R] marks the rows that exist. Weight r belongs to completion
    token r; the completion's last token, padding, and every token of a row without
    vision keys get 1. Steps per row: vgr_tok = (a_T/|T|) / (a_V/|V| + 1e-6), 1 where it
    is non-finite or <= 0; w = 1/(vgr_tok + 1e-6); optional Gaussian smoothing; w / mean(w)
    over the row's valid tokens; clamp to ``clip``; with ``topk_ratio`` only the top
    max(1, int(ratio * n)) weights of a row are kept and the rest are set to 1.
    """
    N, R = text.shape
    out = torch.ones(N, width, dtype=torch.float32, device=text.device)
    if R == 0 or N == 0:
        return out
    valid = rows.bool()  # [N, R]
    lengths = valid.sum(-1)  # [N]
    a_t, a_v = text.double(), vision.double()
    text_density = a_t / num_text.double().unsqueeze(-1)  # [N, R]
    vision_density = a_v / num_vision.double().unsqueeze(-1) + 1e-6  # [N, R]
    vgr = text_density / vision_density
    vgr = torch.where(torch.isfinite(vgr) & (vgr > 0), vgr, torch.ones_like(vgr))  # [N, R]
    weights = 1.0 / (vgr + 1e-6)  # [N, R]
    weights = gaussian_smooth(weights, lengths, smooth_sigma)
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    mean = weights.sum(-1, keepdim=True) / lengths.clamp(min=1).unsqueeze(-1)  # [N, 1]
    weights = weights / mean.clamp(min=torch.finfo(torch.float64).tiny)
    if clip is not None:
        weights = weights.clamp(clip[0], clip[1])
    if topk_ratio is not None:
        weights = _keep_top(weights, valid, lengths, topk_ratio)
    weights = torch.where(valid & (num_vision > 0).unsqueeze(-1), weights, torch.ones_like(weights))
    k = min(R, width)
    out[:, :k] = weights[:, :k].float()
    return out


def _keep_top(weights: Tensor, valid: Tensor, lengths: Tensor, ratio: float) -> Tensor:
    """Each row's top max(1, int(ratio * n)) valid weights stay; the others become 1. [N, R] -> [N, R]"""
    ranked = torch.where(valid, weights, torch.full_like(weights, -math.inf))
    order = ranked.argsort(dim=-1, descending=True, stable=True)  # [N, R]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(weights.shape[1], device=weights.device).expand_as(order))  # [N, R]
    keep = torch.clamp((ratio * lengths.double()).floor().long(), min=1).unsqueeze(-1)  # [N, 1]
    return torch.where(rank < keep, weights, torch.ones_like(weights))


def token_vision_share_weights(
    text: Tensor,
    vision: Tensor,
    rows: Tensor,
    num_vision: Tensor,
    lengths: Tensor,
    width: int,
    *,
    smooth_sigma: float = 0.0,
) -> Tensor:
    """The paper's variant of SPEC 4: w = vision share of each token's attention, summing to 1 over the completion.

    share[r] = a_V / (a_T + a_V) for the C - 1 generation rows (0 when both are 0); the
    last token, which has no row, gets the mean share of its completion; w = share / Σ share
    over the C tokens (1/C each when Σ = 0). Padding and completions without vision keys
    get 1. ``lengths`` [N] are the completion lengths C. -> [N, width] float32
    """
    N, R = text.shape
    out = torch.ones(N, width, dtype=torch.float32, device=text.device)
    valid = rows.bool()  # [N, R]
    total = text.double() + vision.double()
    share = torch.where(total > 0, vision.double() / total, torch.zeros_like(total))  # [N, R]
    share = gaussian_smooth(share, valid.sum(-1), smooth_sigma)
    share = torch.where(valid, share, torch.zeros_like(share))
    for i in range(N):
        C = int(lengths[i])
        if C <= 0 or int(num_vision[i]) <= 0:
            continue
        values = share[i, : C - 1]  # [C - 1]
        last = values.mean() if C > 1 else torch.zeros((), dtype=share.dtype, device=share.device)
        token_shares = torch.cat([values, last.reshape(1)])  # [C]
        s = token_shares.sum()
        row = token_shares / s if s > 0 else torch.full_like(token_shares, 1.0 / C)
        out[i, :C] = row[:width].float()
    return out


# --- the original system's collection, as a reference ------------------------------------------------


def generation_step_masses(
    step_attentions: Sequence[Sequence[Tensor]],
    prompt_attention_mask: Tensor,
    completion_mask: Tensor,
    masks: ModalityMasks,
    *,
    variant: str = "original",
) -> tuple[Tensor, Tensor]:
    """Per-layer masses from ``generate(output_attentions=True, return_dict_in_generate=True)``, the original way.

    ``step_attentions[s][l]`` is step s's attention of layer l, [N, H, q, K]: the prefill
    (q = P) at s = 0, then one query per decode step. As the original did, the prefill's
    last row is dropped and each decode step's last row appended, so step s >= 1 gives
    generation row s - 1; the rows are stacked into full [N, H, R, K] matrices per layer.
    ``prompt_attention_mask`` [N, P], ``completion_mask`` [N, T], ``masks`` over the P
    prompt keys. Returns text, vision [L, N, R] like :class:`CapturedAttention`.
    """
    num_layers = len(step_attentions[0])
    N, P = prompt_attention_mask.shape
    R = max(completion_mask.shape[1] - 1, 0)
    rows = generation_rows(completion_mask)  # [N, R]
    sink = first_real_position(prompt_attention_mask)  # [N]
    text_out = torch.zeros(num_layers, N, R)
    vision_out = torch.zeros(num_layers, N, R)
    for layer in range(num_layers):
        # the original's per-layer stack: every decode step's last query row, padded to the longest key width
        steps = [step_attentions[s][layer][:, :, -1, :].float() for s in range(1, R + 1)]  # each [N, H, P + s]
        if not steps:
            continue
        width = steps[-1].shape[-1]
        stacked = torch.stack(
            [torch.nn.functional.pad(a, (0, width - a.shape[-1])) for a in steps], dim=2
        )  # [N, H, R, K]
        prompt = stacked[..., :P].clone()  # [N, H, R, P]
        prompt[torch.arange(N), :, :, sink] = 0.0  # the attention sink: first real prompt token
        if variant == "paper":
            t = (prompt * masks.text[:, None, None, :]).sum(-1)  # [N, H, R]
            v = (prompt * masks.vision[:, None, None, :]).sum(-1)
            total = t + v
            safe = torch.where(total > 0, total, torch.ones_like(total))
            t = torch.where(total > 0, t / safe, torch.zeros_like(t)).mean(1)  # [N, R]
            v = torch.where(total > 0, v / safe, torch.zeros_like(v)).mean(1)
        else:
            g = prompt.mean(1)  # [N, R, P] head average
            total = g.sum(-1, keepdim=True)  # [N, R, 1]
            g = torch.where(total > 0, g / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(g))
            t = (g * masks.text[:, None, :]).sum(-1)  # [N, R]
            v = (g * masks.vision[:, None, :]).sum(-1)
        text_out[layer] = torch.where(rows, t, torch.zeros_like(t))
        vision_out[layer] = torch.where(rows, v, torch.zeros_like(v))
    return text_out, vision_out


def generation_rows(completion_mask: Tensor) -> Tensor:
    """[N, T] completion mask -> [N, T - 1] bool: row r exists when r < C - 1."""
    T = completion_mask.shape[1]
    lengths = completion_mask.sum(-1)  # [N]
    positions = torch.arange(max(T - 1, 0), device=completion_mask.device)
    return positions.unsqueeze(0) < (lengths - 1).unsqueeze(-1)  # [N, T - 1]
