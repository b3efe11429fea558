"""SPEC 3's metrics from captured attention mass: layer segments, VGR, AEI, ratios, the reward's value, skips.

Everything here works on the small tensors the recorders leave behind
(:class:`~dapo_lightning.attention.captured.CapturedAttention`): for each layer and each
generation row, the head-averaged attention mass on text keys and on vision keys after the
sink column is zeroed and the row is renormalised over the prompt keys. Shapes: N rows,
R generation rows per completion (R = T - 1 for T completion tokens), L decoder layers.

VGR comes in three orientations or validities, each a named function:

- :func:`text_over_vision_vgr`: the original code's (A_T/|T|) / (A_V/|V|), logged as ``vgr``
  by default (``variant="original"``) and behind the text/vision ratios of both variants;
- :func:`vision_over_text_vgr`: the paper's vision density over text density, logged as
  ``vgr`` with ``variant="paper"``;
- :func:`reward_vgr`: what the ``vgr`` rewards read (SPEC 2): text over vision, invalid
  when the vision density is at most ``MIN_VISION_DENSITY``, from the late segment
  falling back to all layers.

The per-token VGR of SPEC 4 (with +1e-6 in the denominator) is ``token_weights.token_vgr``.

:class:`AttentionReport`, like :class:`~dapo_lightning.attention.captured.CapturedAttention`, is an
annotation (``dapo_lightning.annotations``): it travels with its groups when the replay buffer
or dynamic sampling move them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from dapo_lightning.attention.captured import CapturedAttention, same_setup

SEGMENTS = ("early", "middle", "late", "all")
SKIP_REASONS = ("no_attention", "no_generation_rows", "no_vision_tokens")
VARIANTS = ("original", "paper")
MIN_VISION_DENSITY = 1e-6  # SPEC 2: a row whose A_V / |V| is at most this has no usable VGR


# --- VGR, each orientation a function -------------------------------------------------------------------


def text_over_vision_vgr(
    attention_text: Tensor, attention_vision: Tensor, num_text: Tensor, num_vision: Tensor
) -> Tensor:
    """The original code's VGR (SPEC 3): (A_T/|T|) / (A_V/|V|), text density over vision density. [N] -> [N] float64

    Smaller = more vision-grounded. +inf when |V| = 0; NaN wherever else it is not in (0, inf).
    Logged as ``vgr`` with ``variant="original"`` (the default); the text/vision ratios of both
    variants are made from it, and :func:`reward_vgr` adds SPEC 2's validity to it.
    """
    text_density = attention_text.double() / num_text.double()  # [N] NaN when |T| = 0
    vision_density = attention_vision.double() / num_vision.double()  # [N] NaN when |V| = 0
    vgr = _in_open_range(text_density / vision_density)  # [N]
    return torch.where(num_vision == 0, torch.full_like(vgr, math.inf), vgr)


def vision_over_text_vgr(
    attention_text: Tensor, attention_vision: Tensor, num_text: Tensor, num_vision: Tensor
) -> Tensor:
    """The paper's VGR: (A_V/|V|) / (A_T/|T|), vision density over text density. [N] -> [N] float64

    Larger = more vision-grounded; NaN wherever it is not in (0, inf) (|V| = 0 included).
    Logged as ``vgr`` with ``variant="paper"``; the rewards never read it.
    """
    text_density = attention_text.double() / num_text.double()
    vision_density = attention_vision.double() / num_vision.double()
    return _in_open_range(vision_density / text_density)


def reward_segment_vgr(
    attention_text: Tensor, attention_vision: Tensor, num_text: Tensor, num_vision: Tensor
) -> Tensor:
    """One segment's value for the ``vgr`` rewards: :func:`text_over_vision_vgr` with SPEC 2's validity. [N] float64

    Invalid rows (|T| <= 0, or A_V/|V| <= ``MIN_VISION_DENSITY``) are NaN; rows with |V| = 0 are
    +inf; the rewards treat both as invalid.
    """
    vgr = text_over_vision_vgr(attention_text, attention_vision, num_text, num_vision)  # [N]
    vision_density = attention_vision.double() / num_vision.double()
    invalid = (num_text <= 0) | ~(vision_density > MIN_VISION_DENSITY)
    vgr = torch.where(invalid, torch.full_like(vgr, math.nan), vgr)
    return torch.where(num_vision <= 0, torch.full_like(vgr, math.inf), vgr)


def reward_vgr(segments: dict[str, SegmentMetrics], num_text: Tensor, num_vision: Tensor) -> Tensor:
    """The per-row value fed to the ``vgr`` rewards (SPEC 2, 3): the late segment's, falling back to all. [N] float64

    Always text density over vision density (smaller = more vision-grounded), whichever
    variant produced the masses (:func:`reward_segment_vgr`).
    """
    late = reward_segment_vgr(segments["late"].attention_text, segments["late"].attention_vision, num_text, num_vision)
    everything = reward_segment_vgr(segments["all"].attention_text, segments["all"].attention_vision, num_text,
                                    num_vision)
    return torch.where(torch.isfinite(late), late, everything)


def _in_open_range(values: Tensor) -> Tensor:
    """values where 0 < v < inf, NaN elsewhere."""
    return torch.where((values > 0) & torch.isfinite(values), values, torch.full_like(values, math.nan))


def _finite_or_nan(values: Tensor) -> Tensor:
    return torch.where(torch.isfinite(values), values, torch.full_like(values, math.nan))


# --- segments -----------------------------------------------------------------------------------------


def segment_layers(num_layers: int) -> dict[str, range]:
    """SPEC 3: k = L // 3; early [0, k), middle [k, 2k), late [2k, L), all [0, L) (early, middle empty when L < 3)."""
    k = num_layers // 3
    return {"early": range(0, k), "middle": range(k, 2 * k), "late": range(2 * k, num_layers), "all": range(num_layers)}


@dataclass(frozen=True)
class SegmentMetrics:
    """SPEC 3 metrics of one layer segment, one value per row (NaN where undefined)."""

    attention_text: Tensor  # [N] A_T averaged over the segment's layers
    attention_vision: Tensor  # [N] A_V
    vgr: Tensor  # [N] text_over_vision_vgr; the paper variant: vision_over_text_vgr
    aei_text: Tensor  # [N] (A_T/(A_T+A_V)) / (|T|/(|T|+|V|))
    aei_vision: Tensor  # [N] (A_V/(A_T+A_V)) / (|V|/(|T|+|V|))
    text_ratio: Tensor  # [N] text density share: VGR/(1+VGR) with the code's VGR
    vision_ratio: Tensor  # [N] vision density share: 1/(1+VGR)

    METRICS = ("vgr", "aei_text", "aei_vision", "text_ratio", "vision_ratio", "attention_text", "attention_vision")

    def select(self, rows: Tensor) -> SegmentMetrics:
        return SegmentMetrics(**{f.name: getattr(self, f.name).index_select(0, rows.to(self.vgr.device))
                                 for f in fields(self)})

    def blank(self, num_rows: int) -> SegmentMetrics:
        return SegmentMetrics(**{f.name: torch.full((num_rows,), math.nan, dtype=torch.float64,
                                                    device=self.vgr.device) for f in fields(self)})

    @classmethod
    def concat(cls, parts: Sequence[SegmentMetrics]) -> SegmentMetrics:
        device = parts[0].vgr.device
        return cls(**{f.name: torch.cat([getattr(p, f.name).to(device) for p in parts]) for f in fields(cls)})


def segment_metrics(
    attention_text: Tensor, attention_vision: Tensor, num_text: Tensor, num_vision: Tensor, *, variant: str = "original"
) -> SegmentMetrics:
    """VGR, AEI and ratios from segment-averaged masses (SPEC 3). All inputs [N]; outputs float64 [N].

    ``vgr`` is :func:`text_over_vision_vgr` (``variant="original"``) or :func:`vision_over_text_vgr`
    (``"paper"``); the ratios keep their meaning (``vision_ratio`` = vision density share) in both.
    """
    a_t, a_v = attention_text.double(), attention_vision.double()  # [N]
    n_t, n_v = num_text.double(), num_vision.double()  # [N]
    code_vgr = text_over_vision_vgr(a_t, a_v, n_t, n_v)  # [N]
    if variant == "paper":
        vgr = vision_over_text_vgr(a_t, a_v, n_t, n_v)
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


def segment_masses(layer_text: Tensor, layer_vision: Tensor, layers: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean of per-layer A_T, A_V over ``layers`` ([L, N] -> [N]); NaN for an empty segment."""
    if len(layers) == 0:
        nan = torch.full_like(layer_text[0], math.nan)
        return nan, nan
    index = torch.tensor(list(layers), device=layer_text.device)
    return layer_text.index_select(0, index).mean(0), layer_vision.index_select(0, index).mean(0)


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


# --- the report -----------------------------------------------------------------------------------------


@dataclass
class AttentionReport:
    """Per-row results of one rollout's capture: what ``AttentionMetrics`` attaches as ``annotations["attention"]``.

    A blank row (a group that arrived without one) is skipped as "no_attention", its metrics NaN.
    """

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
            name: {metric: _json_number(getattr(m, metric)[i]) for metric in SegmentMetrics.METRICS}
            for name, m in self.segments.items()
            if len(self.segment_layers.get(name, (0,))) > 0
        }
        return {
            "skip_reason": self.skip_reasons[i],
            "reward_vgr": _json_number(self.reward_vgr[i]),
            "text_tokens": int(self.num_text[i]),
            "vision_tokens": int(self.num_vision[i]),
            "generation_rows": int(self.num_generation_rows[i]),
            "segments": segments,
        }

    # --- annotations.Annotation -------------------------------------------------------------------------

    def select(self, rows: Tensor) -> AttentionReport:
        """Rows ``rows`` [n], in order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.reward_vgr.device)
        return AttentionReport(
            segments={name: m.select(rows) for name, m in self.segments.items()},
            reward_vgr=self.reward_vgr.index_select(0, rows),
            skip_reasons=[self.skip_reasons[i] for i in rows.tolist()],
            num_text=self.num_text.index_select(0, rows.to(self.num_text.device)),
            num_vision=self.num_vision.index_select(0, rows.to(self.num_vision.device)),
            num_generation_rows=self.num_generation_rows.index_select(0, rows.to(self.num_generation_rows.device)),
            segment_layers=dict(self.segment_layers),
            variant=self.variant,
        )

    def blank(self, num_rows: int) -> AttentionReport:
        """``num_rows`` rows without attention: skipped as "no_attention", every metric NaN, no keys or rows."""

        def zeros(like: Tensor) -> Tensor:
            return torch.zeros(num_rows, dtype=like.dtype, device=like.device)

        return AttentionReport(
            segments={name: m.blank(num_rows) for name, m in self.segments.items()},
            reward_vgr=torch.full((num_rows,), math.nan, dtype=torch.float64, device=self.reward_vgr.device),
            skip_reasons=["no_attention"] * num_rows,
            num_text=zeros(self.num_text),
            num_vision=zeros(self.num_vision),
            num_generation_rows=zeros(self.num_generation_rows),
            segment_layers=dict(self.segment_layers),
            variant=self.variant,
        )

    @classmethod
    def concat(cls, parts: Sequence[AttentionReport]) -> AttentionReport:
        """The parts' rows one after another (same segments and variant)."""
        same_setup("AttentionReport", "segment layers", [p.segment_layers for p in parts])
        same_setup("AttentionReport", "variant", [p.variant for p in parts])
        device = parts[0].reward_vgr.device

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(p, name).to(device) for p in parts])

        return cls(
            segments={name: SegmentMetrics.concat([p.segments[name] for p in parts]) for name in parts[0].segments},
            reward_vgr=cat("reward_vgr"),
            skip_reasons=[reason for p in parts for reason in p.skip_reasons],
            num_text=cat("num_text"),
            num_vision=cat("num_vision"),
            num_generation_rows=cat("num_generation_rows"),
            segment_layers=dict(parts[0].segment_layers),
            variant=parts[0].variant,
        )


def _json_number(value: Tensor) -> float | None:
    """A finite number as a float, anything else as None (JSON has no NaN or infinity)."""
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
