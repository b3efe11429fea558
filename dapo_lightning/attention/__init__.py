"""Attention diagnostics (SPEC 3, 4): how much the generated tokens attend to the image.

- ``masks``: which prompt keys are text and vision, the sink, the generation rows, the key sets;
- ``capture``: the kernel hook on decoder layers and ``attention_mass``, the one mass computation;
- ``recorders``: ``TeacherForcedRecorder`` and ``DecodeRecorder``, which fill a ``CapturedAttention``;
- ``captured``: ``CapturedAttention``, per layer and generation row the text and vision mass;
- ``metrics``: segments, each VGR orientation, AEI, ratios, the reward's value, ``AttentionReport``;
- ``token_weights``: SPEC 4's per-token advantage weights;
- ``reference``: the original system's collection from ``generate(output_attentions=True)``.

Differences from the original code, as SPEC 3 asks: the sink column zeroed is the first *real*
prompt token (the original zeroed column 0 of the padded batch, a padding column for
left-padded rows); the paper's variant (per-head normalisation within the vision and text
keys, VGR oriented as vision density over text density) is ``variant="paper"``; the code's is
the default.
"""

from dapo_lightning.attention.capture import (
    CAPTURE_KERNEL,
    DEFAULT_CHUNK_ELEMENTS,
    KernelHook,
    LayerRecorder,
    attention_mass,
    decoder_attention_modules,
)
from dapo_lightning.attention.captured import CapturedAttention
from dapo_lightning.attention.masks import (
    KeySets,
    ModalityMasks,
    SpecialTokens,
    first_real_position,
    generation_rows,
    key_sets,
    modality_masks,
)
from dapo_lightning.attention.metrics import (
    MIN_VISION_DENSITY,
    SEGMENTS,
    SKIP_REASONS,
    VARIANTS,
    AttentionReport,
    SegmentMetrics,
    attention_report,
    reward_segment_vgr,
    reward_vgr,
    segment_layers,
    segment_masses,
    segment_metrics,
    skip_reasons,
    text_over_vision_vgr,
    vision_over_text_vgr,
)
from dapo_lightning.attention.recorders import GENERATION_FLUSH_STEPS, DecodeRecorder, TeacherForcedRecorder
from dapo_lightning.attention.reference import generation_step_masses
from dapo_lightning.attention.token_weights import (
    gaussian_smooth,
    token_vgr,
    token_vgr_weights,
    token_vision_share_weights,
)

__all__ = [
    "CAPTURE_KERNEL",
    "DEFAULT_CHUNK_ELEMENTS",
    "GENERATION_FLUSH_STEPS",
    "MIN_VISION_DENSITY",
    "SEGMENTS",
    "SKIP_REASONS",
    "VARIANTS",
    "AttentionReport",
    "CapturedAttention",
    "DecodeRecorder",
    "KernelHook",
    "KeySets",
    "LayerRecorder",
    "ModalityMasks",
    "SegmentMetrics",
    "SpecialTokens",
    "TeacherForcedRecorder",
    "attention_mass",
    "attention_report",
    "decoder_attention_modules",
    "first_real_position",
    "gaussian_smooth",
    "generation_rows",
    "generation_step_masses",
    "key_sets",
    "modality_masks",
    "reward_segment_vgr",
    "reward_vgr",
    "segment_layers",
    "segment_masses",
    "segment_metrics",
    "skip_reasons",
    "text_over_vision_vgr",
    "token_vgr",
    "token_vgr_weights",
    "token_vision_share_weights",
    "vision_over_text_vgr",
]
