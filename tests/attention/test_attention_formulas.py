"""SPEC 3 and 4 formulas on hand-worked numbers: segments, VGR/AEI, the reward value, skips, token weights."""

import math

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.attention import (
    MIN_VISION_DENSITY,
    CapturedAttention,
    attention_report,
    gaussian_smooth,
    generation_rows,
    reward_segment_vgr,
    reward_vgr,
    segment_layers,
    segment_metrics,
    skip_reasons,
    text_over_vision_vgr,
    token_vgr,
    token_vgr_weights,
    token_vision_share_weights,
    vision_over_text_vgr,
)

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    "L, expected",
    [
        (2, {"early": [], "middle": [], "late": [0, 1], "all": [0, 1]}),
        (4, {"early": [0], "middle": [1], "late": [2, 3], "all": [0, 1, 2, 3]}),
        (
            28,
            {
                "early": list(range(9)),
                "middle": list(range(9, 18)),
                "late": list(range(18, 28)),
                "all": list(range(28)),
            },
        ),
    ],
)
def test_segments_split_layers_in_thirds_with_the_rest_in_late(L, expected):
    assert {k: list(v) for k, v in segment_layers(L).items()} == expected


def test_vgr_aei_and_ratios_by_hand():
    # row 0: A_T 2.0 over |T| 20 -> density 0.1; A_V 0.5 over |V| 4 -> 0.125; VGR 0.1 / 0.125 = 0.8
    #        AEI_text = (2/2.5) / (20/24) = 0.96; AEI_vision = (0.5/2.5) / (4/24) = 1.2
    #        text_ratio 0.8/1.8 = 0.4444, vision_ratio 1/1.8 = 0.5556
    # row 1: |V| = 0 -> VGR +inf, text ratio 1, vision ratio 0; AEI_text = (2/2)/(20/20) = 1, AEI_vision 0/0 -> NaN
    # row 2: A_V = 0 with |V| = 4 -> VGR = inf is outside (0, inf) -> NaN; AEI_text (1)/(20/24) = 1.2, AEI_vision 0
    m = segment_metrics(
        torch.tensor([2.0, 2.0, 1.0]),
        torch.tensor([0.5, 0.0, 0.0]),
        torch.tensor([20, 20, 20]),
        torch.tensor([4, 0, 4]),
    )
    assert m.vgr.shape == (3,)  # [N]
    assert_close(m.vgr, torch.tensor([0.8, INF, NAN], dtype=torch.float64), equal_nan=True)
    assert_close(m.aei_text, torch.tensor([0.96, 1.0, 1.2], dtype=torch.float64))
    assert_close(m.aei_vision, torch.tensor([1.2, NAN, 0.0], dtype=torch.float64), equal_nan=True)
    assert_close(m.text_ratio, torch.tensor([0.8 / 1.8, 1.0, NAN], dtype=torch.float64), equal_nan=True)
    assert_close(m.vision_ratio, torch.tensor([1 / 1.8, 0.0, NAN], dtype=torch.float64), equal_nan=True)
    # the paper's orientation: vision density over text density = 0.125 / 0.1; ratios keep their meaning
    paper = segment_metrics(
        torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([20]), torch.tensor([4]), variant="paper"
    )
    assert_close(paper.vgr, torch.tensor([1.25], dtype=torch.float64))
    assert_close(paper.vision_ratio, torch.tensor([1 / 1.8], dtype=torch.float64))


def test_the_code_vgr_is_text_density_over_vision_density():
    # row 0: (2.0 / 20) / (0.5 / 4) = 0.1 / 0.125 = 0.8; row 1: |V| = 0 -> +inf; row 2: A_V = 0 -> 0.1 / 0 = inf,
    # outside (0, inf) -> NaN; row 3: A_T = 0 -> 0 / 0.125 = 0, outside (0, inf) -> NaN
    values = text_over_vision_vgr(
        torch.tensor([2.0, 2.0, 1.0, 0.0]), torch.tensor([0.5, 0.0, 0.0, 0.5]), torch.tensor([20, 20, 20, 20]),
        torch.tensor([4, 0, 4, 4]),
    )
    assert values.dtype == torch.float64 and values.shape == (4,)  # [N]
    assert_close(values, torch.tensor([0.8, INF, NAN, NAN], dtype=torch.float64), equal_nan=True)


def test_the_paper_vgr_is_vision_density_over_text_density():
    # row 0: 0.125 / 0.1 = 1.25; row 1: |V| = 0 -> 0 / 0 = NaN (no +inf in this orientation); row 2: (0.2 / 4) / 0.1
    values = vision_over_text_vgr(
        torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.5, 0.0, 0.2]), torch.tensor([20, 20, 20]),
        torch.tensor([4, 0, 4]),
    )
    assert_close(values, torch.tensor([1.25, NAN, 0.5], dtype=torch.float64), equal_nan=True)


def test_the_reward_segment_vgr_needs_a_vision_density_above_one_millionth():
    # A_T 2.0 over |T| 20 -> text density 0.1 in every row.
    # row 0: A_V 8e-6 / |V| 4 = 2e-6 > 1e-6 -> 0.1 / 2e-6 = 50000; row 1: 4e-6 / 4 = 1e-6, not above -> NaN;
    # row 2: |T| = 0 -> NaN; row 3: |V| = 0 -> +inf
    assert MIN_VISION_DENSITY == 1e-6
    values = reward_segment_vgr(
        torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64), torch.tensor([8e-6, 4e-6, 0.5, 0.5],
                                                                              dtype=torch.float64),
        torch.tensor([20, 20, 0, 20]), torch.tensor([4, 4, 4, 0]),
    )
    assert_close(values, torch.tensor([50000.0, NAN, NAN, INF], dtype=torch.float64), equal_nan=True)


def test_the_token_vgr_adds_one_millionth_to_the_vision_density():
    # |T| 10, |V| 2. token 0: (0.5 / 10) / (0.5 / 2 + 1e-6) = 0.05 / 0.250001 = 0.19999920;
    # token 1: A_V 0 -> 0.05 / 1e-6 = 50000 (finite: no NaN as in the row VGR); token 2: A_T 0 -> 0 -> 1;
    # row 1 (|V| = 0): 0 / 0 = NaN -> 1
    values = token_vgr(
        torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.5]]), torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]),
        torch.tensor([10, 10]), torch.tensor([2, 0]),
    )
    assert values.shape == (2, 3)  # [N, R]
    assert_close(values, torch.tensor([[0.05 / 0.250001, 50000.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64))


def test_the_reward_value_is_late_falling_back_to_all_and_marks_invalid_rows():
    num_text, num_vision = torch.tensor([20, 20, 20, 0, 20]), torch.tensor([4, 4, 4, 4, 0])
    # late: row 0 valid (0.1 / 0.125 = 0.8); row 1 A_V/|V| = 4e-6/4 = 1e-6 <= 1e-6 invalid;
    # row 2 (A_V = 0) invalid in late and in all
    late = segment_metrics(
        torch.tensor([2.0, 2.0, 2.0, 0.0, 2.0]), torch.tensor([0.5, 4e-6, 0.0, 0.5, 0.0]), num_text, num_vision
    )
    # all: row 1 has A_V 1.0 -> density 0.25, VGR 0.1 / 0.25 = 0.4
    everything = segment_metrics(
        torch.tensor([2.0, 2.0, 2.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 0.0, 0.5, 0.0]), num_text, num_vision
    )
    values = reward_vgr({"late": late, "all": everything}, num_text, num_vision)
    # row 3 has no text keys: invalid (NaN); row 4 has no vision keys: +inf
    assert_close(values, torch.tensor([0.8, 0.4, NAN, NAN, INF], dtype=torch.float64), equal_nan=True)


def test_skip_reasons_in_order():
    reasons = skip_reasons(
        torch.tensor([False, True, True, True]), torch.tensor([0, 0, 3, 3]), torch.tensor([0, 4, 0, 4])
    )
    assert reasons == ["no_attention", "no_generation_rows", "no_vision_tokens", None]


def test_generation_rows_are_the_completion_tokens_but_the_last():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])  # C = 4, 2, 1
    assert generation_rows(mask).tolist() == [[True, True, True], [True, False, False], [False, False, False]]


def test_report_from_captured_masses_by_hand():
    # 4 layers (segments early [0], middle [1], late [2, 3]); one row with 2 generation rows, |T| 10, |V| 2.
    # Per layer and generation row: text, vision masses (they sum to <= 1 after renormalisation over prompt keys).
    text = torch.tensor([[[0.6, 0.6]], [[0.5, 0.5]], [[0.4, 0.6]], [[0.8, 0.2]]])  # [L=4, N=1, R=2]
    vision = torch.tensor([[[0.2, 0.2]], [[0.3, 0.3]], [[0.4, 0.2]], [[0.1, 0.3]]])
    captured = CapturedAttention(
        text=text,
        vision=vision,
        rows=torch.tensor([[True, True]]),
        num_text=torch.tensor([10]),
        num_vision=torch.tensor([2]),
        captured=torch.ones(4, 1, dtype=torch.bool),
    )
    report = attention_report(captured)
    # per layer A_T = [1.2, 1.0, 1.0, 1.0], A_V = [0.4, 0.6, 0.6, 0.4]
    # late: A_T = 1.0, A_V = 0.5 -> VGR (1.0/10) / (0.5/2) = 0.4; all: A_T 1.05, A_V 0.5 -> 0.105 / 0.25 = 0.42
    # early: 0.12 / 0.2 = 0.6; middle: 0.1 / 0.3 = 0.3333
    assert_close(report.segments["late"].vgr, torch.tensor([0.4], dtype=torch.float64))
    assert_close(report.segments["all"].vgr, torch.tensor([0.42], dtype=torch.float64))
    assert_close(report.segments["early"].vgr, torch.tensor([0.6], dtype=torch.float64))
    assert_close(report.segments["middle"].vgr, torch.tensor([1 / 3], dtype=torch.float64))
    assert_close(report.reward_vgr, torch.tensor([0.4], dtype=torch.float64))
    row = report.row(0)
    assert row["skip_reason"] is None and row["vision_tokens"] == 2 and row["generation_rows"] == 2
    assert row["segments"]["late"]["attention_text"] == pytest.approx(1.0)
    assert set(row["segments"]) == {"early", "middle", "late", "all"}
    # no layer captured: no attention, no reward value
    captured.captured[:] = False
    empty = attention_report(captured)
    assert empty.skip_reasons == ["no_attention"] and math.isnan(float(empty.reward_vgr[0]))


# --- token weights (SPEC 4) ------------------------------------------------------------------------

# Kernel for sigma 0.5: half-width max(1, int(1.5)) = 1; exp(-x^2 / 0.5) at x = -1, 0, 1 is e^-2, 1, e^-2,
# normalised: k1 = e^-2 / (1 + 2 e^-2) = 0.106507, k0 = 1 / (1 + 2 e^-2) = 0.786986.
K1 = math.exp(-2) / (1 + 2 * math.exp(-2))
K0 = 1 / (1 + 2 * math.exp(-2))


def test_gaussian_smoothing_with_replicate_padding():
    values = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [1.0, 3.0, 9.0]], dtype=torch.float64)
    lengths = torch.tensor([3, 3, 2])
    out = gaussian_smooth(values, lengths, 0.5)
    expected = torch.tensor(
        [
            [3 * K1, 3 * K0, 3 * K1],  # padded 0 | 0 3 0 | 0
            [2 * K1 + 2 * K0, 2 * K1, 0.0],  # padded 2 | 2 0 0 | 0 (left edge replicated)
            [
                K1 + K0 + 3 * K1,
                K1 + 3 * K0 + 3 * K1,
                9.0,
            ],  # valid prefix [1, 3], padded 1 | 1 3 | 3; position 2 untouched
        ],
        dtype=torch.float64,
    )
    assert_close(out, expected)
    assert_close(gaussian_smooth(values, lengths, 0.0), values)


# One completion of C = 4 tokens (3 generation rows) padded to width 5; |T| = 10, |V| = 2.
# a_T = [0.5, 0.8, 0.6], a_V = [0.5, 0.2, 0.4] -> densities text [0.05, 0.08, 0.06], vision [0.25, 0.1, 0.2] (+1e-6)
# token VGR ~ [0.2, 0.8, 0.3] -> w ~ [5, 1.25, 10/3], mean 115/36 -> [180/115, 45/115, 120/115] (the 1e-6 terms move
# these by < 1e-5), then the last token and the padding get 1.
A_T = torch.tensor([[0.5, 0.8, 0.6, 0.0]])  # [N=1, R=4] (width 5 -> R = 4; row 3 does not exist)
A_V = torch.tensor([[0.5, 0.2, 0.4, 0.0]])
ROWS = torch.tensor([[True, True, True, False]])
BASE = [180 / 115, 45 / 115, 120 / 115]


def _weights(**kwargs):
    return token_vgr_weights(A_T, A_V, ROWS, torch.tensor([10]), torch.tensor([2]), 5, **kwargs)


def test_inverse_token_vgr_weights_by_hand():
    weights = _weights(clip=None)
    assert weights.shape == (1, 5)  # [N, T]
    assert_close(weights, torch.tensor([[*BASE, 1.0, 1.0]]), atol=1e-5, rtol=0)
    assert_close(_weights(clip=(0.5, 1.5)), torch.tensor([[1.5, 0.5, 120 / 115, 1.0, 1.0]]), atol=1e-5, rtol=0)
    # default clip (0.2, 3.0) leaves these inside
    assert_close(_weights(), weights)


def test_topk_keeps_the_largest_weights_and_sets_the_rest_to_one():
    # n = 3 valid tokens: ratio 0.34 keeps int(1.02) = 1, ratio 0.67 keeps int(2.01) = 2
    assert_close(_weights(topk_ratio=0.34), torch.tensor([[BASE[0], 1.0, 1.0, 1.0, 1.0]]), atol=1e-5, rtol=0)
    assert_close(_weights(topk_ratio=0.67), torch.tensor([[BASE[0], 1.0, BASE[2], 1.0, 1.0]]), atol=1e-5, rtol=0)


def test_smoothing_happens_before_the_mean_normalisation():
    w = torch.tensor([5.0, 1.25, 10 / 3], dtype=torch.float64)
    smoothed = torch.stack(
        [K1 * w[0] + K0 * w[0] + K1 * w[1], K1 * w[0] + K0 * w[1] + K1 * w[2], K1 * w[1] + K0 * w[2] + K1 * w[2]]
    )
    expected = (smoothed / smoothed.mean()).float()
    assert_close(_weights(smooth_sigma=0.5)[0, :3], expected, atol=1e-5, rtol=0)


def test_rows_without_vision_keys_or_text_get_weight_one():
    weights = token_vgr_weights(
        A_T.repeat(2, 1), A_V.repeat(2, 1), ROWS.repeat(2, 1), torch.tensor([10, 0]), torch.tensor([0, 2]), 5
    )
    # |V| = 0: all 1 (SPEC 4); |T| = 0: every token VGR is 0 -> replaced by 1 -> equal weights -> 1 after normalising
    assert_close(weights, torch.ones(2, 5))


def test_vision_share_weights_sum_to_one_over_the_completion():
    # shares a_V / (a_T + a_V) = [0.5, 0.2, 0.4]; the last token gets their mean 1.1/3; total 1.1 + 1.1/3 = 4.4/3
    weights = token_vision_share_weights(A_T, A_V, ROWS, torch.tensor([2]), torch.tensor([4]), 5)
    expected = torch.tensor([[0.5 * 3 / 4.4, 0.2 * 3 / 4.4, 0.4 * 3 / 4.4, 0.25, 1.0]])
    assert_close(weights, expected)
    assert weights[0, :4].sum().item() == pytest.approx(1.0)
