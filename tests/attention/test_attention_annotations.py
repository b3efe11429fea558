"""CapturedAttention and AttentionReport travel with their groups: select, concat and blank rows (annotations.py)."""

import math

import pytest
import torch
from torch.testing import assert_close

from dapo_lightning.annotations import RowValues, concat_all, select_all
from dapo_lightning.attention import AttentionReport, CapturedAttention, SegmentMetrics, attention_report



def _captured() -> CapturedAttention:
    """Two layers, three completions, three generation rows (completion 1 has one row, completion 2 none)."""
    text = torch.tensor([[[0.6, 0.5, 0.4], [0.7, 0.0, 0.0], [0.0, 0.0, 0.0]],
                         [[0.5, 0.5, 0.5], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # [L=2, N=3, R=3]
    vision = torch.tensor([[[0.2, 0.3, 0.4], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]],
                           [[0.3, 0.4, 0.1], [0.6, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    rows = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])  # [N, R]
    return CapturedAttention(text, vision, rows, torch.tensor([10, 12, 8]), torch.tensor([4, 4, 0]),
                             torch.ones(2, 3, dtype=torch.bool))


def _short() -> CapturedAttention:
    """Two layers, one completion of two tokens: one generation row (R = 1)."""
    return CapturedAttention(torch.tensor([[[0.9]], [[0.8]]]), torch.tensor([[[0.1]], [[0.2]]]),
                             torch.tensor([[True]]), torch.tensor([5]), torch.tensor([2]),
                             torch.ones(2, 1, dtype=torch.bool))


def _assert_same_captured(a: CapturedAttention, b: CapturedAttention) -> None:
    for name in ("text", "vision", "rows", "num_text", "num_vision", "captured"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.variant == b.variant


def _assert_same_report(a: AttentionReport, b: AttentionReport) -> None:
    assert a.skip_reasons == b.skip_reasons
    assert_close(a.reward_vgr, b.reward_vgr, equal_nan=True)
    for name in ("num_text", "num_vision", "num_generation_rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.segments.keys() == b.segments.keys() and a.segment_layers == b.segment_layers
    for segment in a.segments:
        for metric in SegmentMetrics.METRICS:
            assert_close(getattr(a.segments[segment], metric), getattr(b.segments[segment], metric), equal_nan=True)


def test_captured_attention_select_then_concat_gives_back_the_original():
    captured = _captured()
    assert captured.num_rows == 3
    parts = [captured.select(torch.tensor([0])), captured.select(torch.tensor([1, 2]))]
    assert parts[1].text.shape == (2, 2, 3)  # [L, n, R]: cut along N only
    _assert_same_captured(CapturedAttention.concat(parts), captured)
    swapped = captured.select(torch.tensor([2, 0, 0]))  # any order, repeats allowed
    assert swapped.num_text.tolist() == [8, 10, 10] and torch.equal(swapped.text[:, 1], captured.text[:, 0])


def test_captured_attention_concat_pads_generation_rows_to_the_longest():
    joined = CapturedAttention.concat([_short(), _captured()])
    assert joined.text.shape == (2, 4, 3)  # [L, 1 + 3, max(1, 3)]
    assert_close(joined.text[:, 0], torch.tensor([[0.9, 0.0, 0.0], [0.8, 0.0, 0.0]]))  # zeros past R = 1
    assert joined.rows[0].tolist() == [True, False, False]  # padded rows do not exist
    assert joined.num_vision.tolist() == [2, 4, 4, 0]
    # the padding changes no metric: the joined report is the parts' reports joined
    _assert_same_report(attention_report(joined),
                        AttentionReport.concat([attention_report(_short()), attention_report(_captured())]))


def test_blank_captured_rows_are_not_captured_and_report_no_attention():
    blank = _captured().blank(2)
    assert blank.text.shape == (2, 2, 3) and not blank.text.any() and not blank.vision.any()
    assert not blank.rows.any() and not blank.captured.any()
    assert blank.num_text.tolist() == [0, 0] and blank.num_vision.tolist() == [0, 0]
    report = attention_report(CapturedAttention.concat([_short(), blank]))
    assert report.skip_reasons == [None, "no_attention", "no_attention"]
    assert math.isnan(report.reward_vgr[1]) and math.isnan(report.reward_vgr[2])


def test_attention_report_select_then_concat_gives_back_the_original():
    report = attention_report(_captured())
    assert report.skip_reasons == [None, None, "no_generation_rows"]
    parts = [report.select(torch.tensor([0, 1])), report.select(torch.tensor([2]))]
    assert parts[0].num_rows == 2 and parts[0].segments["all"].vgr.shape == (2,)
    _assert_same_report(AttentionReport.concat(parts), report)
    assert report.select(torch.tensor([1])).row(0) == report.row(1)


def test_blank_report_rows_are_skipped_as_no_attention_with_nan_metrics():
    report = attention_report(_captured())
    blank = report.blank(2)
    assert blank.num_rows == 2 and blank.skip_reasons == ["no_attention", "no_attention"]
    assert blank.segment_layers == report.segment_layers and blank.variant == report.variant
    assert all(math.isnan(v) for v in blank.reward_vgr.tolist())
    for segment in blank.segments.values():
        for metric in SegmentMetrics.METRICS:
            assert all(math.isnan(v) for v in getattr(segment, metric).tolist())
    joined = AttentionReport.concat([report, blank])
    assert joined.usable.tolist() == [True, True, False, False, False]
    assert joined.skip_counts() == {"no_attention": 2, "no_generation_rows": 1, "no_vision_tokens": 0}
    assert joined.row(4)["reward_vgr"] is None and joined.row(4)["segments"]["all"]["vgr"] is None


def test_groups_without_attention_get_blank_rows_when_joined():
    # what groups.assemble does with a replayed group (which keeps only its RowValues) and a fresh one
    captured = _captured()
    report = attention_report(captured)
    fresh = select_all({"vgr": RowValues(report.reward_vgr), "attention": report, "attention_tokens": captured},
                       torch.tensor([0, 1]))
    replayed = {"vgr": RowValues(torch.tensor([0.5, 0.7], dtype=torch.float64))}
    joined = concat_all([fresh, replayed], [2, 2])
    assert joined["attention"].skip_reasons == [None, None, "no_attention", "no_attention"]
    assert joined["attention_tokens"].captured.tolist() == [[True, True, False, False]] * 2
    assert joined["vgr"].tolist()[2:] == [0.5, 0.7]


def test_parts_of_different_set_ups_are_refused():
    paper = _short()
    paper.variant = "paper"
    with pytest.raises(ValueError, match="variant"):
        CapturedAttention.concat([_short(), paper])
    with pytest.raises(ValueError, match="segment layers"):
        report = attention_report(_short())
        AttentionReport.concat([report, attention_report(CapturedAttention(
            torch.zeros(3, 1, 1), torch.zeros(3, 1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([1]),
            torch.tensor([1]), torch.ones(3, 1, dtype=torch.bool)))])
