"""The event simulator against hand-derived timelines and the DualPipe README bubble table."""

from __future__ import annotations

import itertools
import json

import pytest

from frugalm.parallel.schedules import build_schedule
from frugalm.parallel.sim import ChunkTimes, in_table_regime, plot_timeline, simulate, table_bubble

# (f, b, w, fb) points inside each schedule's table regime (see frugalm.parallel.sim's docstring)
REGIME_TIMES = {
    "1f1b": [(1, 2, 1, None), (1, 1, 0, None), (2, 3, 0.5, None), (1.5, 4, 1, None), (3, 1, 0.2, None)],
    "zb1p": [(1, 2, 1, None), (1, 1, 0, None), (2, 3, 1, None), (1.5, 4, 1.5, None), (1, 2, 0.5, None)],
    "dualpipe": [(1, 2, 1, None), (1, 2, 1, 2.5), (2, 3, 1, 3.5), (1, 1, 0, None), (2, 4, 2, 5), (1, 1.5, 0.5, 1.5)],
}
REGIME_TIMES["dualpipev"] = REGIME_TIMES["dualpipe"]
PPS = {"1f1b": [2, 3, 4, 8], "zb1p": [2, 3, 4, 8], "dualpipe": [2, 4, 6, 8], "dualpipev": [1, 2, 3, 4]}


def _micro_counts(name: str, pp: int) -> list[int]:
    if name in ("1f1b", "zb1p"):
        return [pp, 2 * pp + 1]
    return [2 * pp, 2 * pp + 4]


def test_hand_derived_1f1b_timeline() -> None:
    # 2 stages, 2 micro-batches, F=1, B=2. Rank 1 can start F0 at 1; B0 on rank 0 waits for rank 1's B0.
    r = simulate(build_schedule("1f1b", 2, 2), ChunkTimes(f=1, b=2, w=1))
    got = [[(s.label, s.start, s.end) for s in row] for row in r.spans]
    assert got == [
        [("F0@s0", 0, 1), ("F1@s0", 1, 2), ("B0@s0", 4, 6), ("B1@s0", 7, 9)],
        [("F0@s1", 1, 2), ("B0@s1", 2, 4), ("F1@s1", 4, 5), ("B1@s1", 5, 7)],
    ]
    assert r.makespan == 9 and r.idle == [3, 3] and r.bubble == 3
    assert r.bubble_fraction == pytest.approx(3 / 9)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_bubble_matches_dualpipe_table_in_its_regime(name: str) -> None:
    for pp, (f, b, w, fb) in itertools.product(PPS[name], REGIME_TIMES[name]):
        times = ChunkTimes(f, b, w, fb)
        assert in_table_regime(name, times)
        for micro in _micro_counts(name, pp):
            r = simulate(build_schedule(name, pp, micro), times)
            assert r.bubble == pytest.approx(table_bubble(name, pp, times), abs=1e-9), (name, pp, micro, times)


def test_table_is_only_an_approximation_outside_its_regime() -> None:
    # F != B - W: DualPipe's fixed order leaves a different idle time than the formula says
    times = ChunkTimes(f=1, b=3, w=1, fb=3.5)
    assert not in_table_regime("dualpipe", times)
    r = simulate(build_schedule("dualpipe", 8, 16), times)
    assert r.bubble != pytest.approx(table_bubble("dualpipe", 8, times))
    # a P2P latency is not in the table at all, and can only lengthen the step
    slow = simulate(build_schedule("1f1b", 4, 8), ChunkTimes(comm=0.25))
    assert slow.bubble > table_bubble("1f1b", 4, ChunkTimes())


def test_dualpipe_beats_1f1b_at_equal_pp_and_micro() -> None:
    for pp in (4, 8):
        one = simulate(build_schedule("1f1b", pp, 2 * pp))
        dual = simulate(build_schedule("dualpipe", pp, 2 * pp))
        assert dual.bubble < one.bubble and dual.makespan < one.makespan


def test_memory_matches_table() -> None:
    for pp in (2, 4, 8):
        one = simulate(build_schedule("1f1b", pp, 2 * pp))
        assert one.peak_activations == list(range(pp, 0, -1)) and one.param_copies == [1] * pp
        zb = simulate(build_schedule("zb1p", pp, 2 * pp))
        assert max(zb.peak_activations) == pp
        dual = simulate(build_schedule("dualpipe", pp, 2 * pp))
        assert dual.peak_activations == [pp + 1] * pp and dual.param_copies == [2] * pp
        # DualPipeV: pp ranks run 2*pp stages, so the table's "PP + 1" is 2*pp + 1 stage-activations
        v = simulate(build_schedule("dualpipev", pp, 2 * pp))
        assert v.peak_activations == [2 * pp + 1] * pp and v.param_copies == [2] * pp


def test_planner_formula_agrees_with_simulator() -> None:
    pipeline = pytest.importorskip("frugalm.plan.pipeline", reason="planner's closed forms not merged yet")
    # pp is the number of pipeline ranks for every schedule (DualPipeV: 2*pp stages), as in pipeline-sim
    for name in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        for pp, (f, b, w, fb) in itertools.product(PPS[name], REGIME_TIMES[name]):
            micro = _micro_counts(name, pp)[0]
            r = simulate(build_schedule(name, pp, micro), ChunkTimes(f, b, w, fb))
            closed = pipeline.pipeline_bubble(name, pp, micro, f, b, w, fb)
            assert closed == pytest.approx(r.bubble, abs=1e-9), (name, pp, micro, f, b, w, fb)
            if fb is None:  # without overlap gains every rank is busy micro x visits x (F+B) in both
                frac = pipeline.pipeline_bubble_fraction(name, pp, micro, f, b, w, fb)
                assert frac == pytest.approx(r.bubble_fraction, abs=1e-9), (name, pp, micro, f, b, w)
            if pp > 1:  # the planner treats pp=1 as "no pipeline"
                assert max(r.peak_activations) == pipeline.in_flight_chunks(name, pp, micro), (name, pp)
                assert max(r.param_copies) == pipeline.param_copies(name), name


def test_timeline_png(tmp_path) -> None:
    r = simulate(build_schedule("dualpipev", 2, 4))
    out = plot_timeline(r.spans, tmp_path / "t.png", "dualpipev")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_cli_json_and_errors(capsys, tmp_path) -> None:
    from frugalm.cli import main

    png = tmp_path / "dp.png"
    assert main(["pipeline-sim", "--schedule", "dualpipe", "--pp", "4", "--micro", "8", "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bubble"] == pytest.approx(2.0) and out["table_bubble"] == pytest.approx(2.0)
    assert 0 < out["bubble_fraction"] < 1 and out["peak_activations"] == 5 and out["param_copies"] == 2
    assert png.is_file()

    assert main(["pipeline-sim", "--schedule", "1f1b", "--pp", "4", "--micro", "8", "--f", "2", "--b", "4", "--w", "1"]) == 0
    text = capsys.readouterr().out
    assert "bubble         18" in text and "peak 4" in text

    assert main(["pipeline-sim", "--schedule", "dualpipe", "--pp", "4", "--micro", "6"]) == 2
    assert ">= 2*pp = 8" in capsys.readouterr().err
    assert main(["pipeline-sim", "--schedule", "zb1p", "--pp", "2", "--micro", "4", "--w", "3"]) == 2
    assert "cannot exceed" in capsys.readouterr().err
