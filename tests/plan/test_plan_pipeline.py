"""Pipeline bubble closed forms (DualPipe README table) and stage placement."""

import re

import pytest

from frugalm.plan.pipeline import (
    check_schedule, in_flight_chunks, pipeline_bubble, pipeline_bubble_fraction, rank_stages, split_layers,
)


@pytest.mark.parametrize("pp,m", [(2, 1), (4, 8), (8, 8), (16, 120), (5, 3)])
def test_1f1b_fraction_is_the_classic_formula(pp, m):
    assert pipeline_bubble_fraction("1f1b", pp, m, 1.0, 2.0, 1.0) == pytest.approx((pp - 1) / (m + pp - 1))


def test_table_formulas_with_explicit_times():
    f, b, w, fb = 1.0, 2.0, 0.9, 2.5
    assert pipeline_bubble("1f1b", 8, 16, f, b, w) == pytest.approx(7 * 3.0)
    assert pipeline_bubble("zb1p", 8, 16, f, b, w) == pytest.approx(7 * (3.0 - 1.8))
    assert pipeline_bubble("dualpipe", 8, 16, f, b, w, fb) == pytest.approx(3 * (2.5 + 2.0 - 2.7))
    # DualPipeV: pp ranks run 2·pp stages, so the table's PP/2 − 1 is pp − 1 with per-stage times
    assert pipeline_bubble("dualpipev", 4, 16, f, b, w, fb) == pytest.approx(3 * (2.5 + 2.0 - 2.7))
    # F&B defaults to F + B (no overlap gain)
    assert pipeline_bubble("dualpipe", 8, 16, f, b, w) == pytest.approx(3 * (3.0 + 2.0 - 2.7))
    assert pipeline_bubble("dualpipe", 2, 4, f, b, w) == 0.0


def test_bubble_does_not_grow_with_micro_batches_and_fraction_shrinks():
    for s in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        a = pipeline_bubble(s, 8, 16, 1.0, 2.0, 1.0)
        z = pipeline_bubble(s, 8, 64, 1.0, 2.0, 1.0)
        assert a == z
        assert pipeline_bubble_fraction(s, 8, 64, 1.0, 2.0, 1.0) < pipeline_bubble_fraction(s, 8, 16, 1.0, 2.0, 1.0)


def test_dualpipe_beats_1f1b_and_zb1p_at_v3_scale():
    f, b, w = 1.0, 2.0, 1.0  # W is half of a full backward
    one = pipeline_bubble("1f1b", 16, 120, f, b, w)
    zb = pipeline_bubble("zb1p", 16, 120, f, b, w)
    dual = pipeline_bubble("dualpipe", 16, 120, f, b, w)
    assert dual < zb < one
    assert one == 15 * 3 and zb == 15 * 1 and dual == 7 * 2


@pytest.mark.parametrize("schedule,pp,micro,msg", [
    ("dualpipe", 3, 12, "even number of pipeline ranks"),
    ("dualpipe", 4, 6, "micro-batches >= 2*pp"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipev", 4, 7, "at least 2*pp"),
    ("zb1p", 8, 4, "at least pp"),
    ("gpipe", 4, 8, "unknown pipeline schedule"),
])
def test_schedule_constraints(schedule, pp, micro, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_schedule(schedule, pp, micro)
    with pytest.raises(ValueError):
        pipeline_bubble(schedule, pp, micro, 1.0, 2.0, 1.0)


def test_w_must_be_part_of_b():
    with pytest.raises(ValueError, match="W is part of B"):
        pipeline_bubble("zb1p", 4, 8, 1.0, 1.0, 1.5)


def test_placement_and_in_flight_activations():
    assert rank_stages("dualpipe", 4) == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert rank_stages("dualpipev", 2) == [(0, 3), (1, 2)]
    assert rank_stages("1f1b", 3) == [(0,), (1,), (2,)]
    parts = split_layers(61, 16)
    assert sum(len(p) for p in parts) == 61 and [len(p) for p in parts[:2]] == [4, 4] and len(parts[-1]) == 3
    assert list(parts[0]) == [0, 1, 2, 3] and parts[-1][-1] == 60
    with pytest.raises(ValueError):
        split_layers(4, 8)
    assert in_flight_chunks("1f1b", 16, 120) == 16
    assert in_flight_chunks("1f1b", 16, 4) == 4
    assert in_flight_chunks("dualpipe", 16, 120) == 17
    assert in_flight_chunks("dualpipev", 8, 120) == 17
