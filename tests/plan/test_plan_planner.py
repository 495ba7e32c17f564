"""The planner: layouts, memory, communication, time and cost, and its error messages."""

import pytest

from frugalm.model.config import ModelConfig
from frugalm.plan.arch import shape_of
from frugalm.plan.chips import load_catalogue
from frugalm.plan.comm import CommConfig, ep_traffic, expected_nodes_hit
from frugalm.plan.dense import DenseModelConfig
from frugalm.plan.errors import PlanError
from frugalm.plan.layout import LayoutConfig, resolve_layout
from frugalm.plan.memory import GIB, memory_per_gpu
from frugalm.plan.planner import PlanConfig, compare, parse_amount, plan_run

V3_RUN = dict(model="deepseek-v3", tokens="14.8T", gpu="h800", count=2048)
REQUIRED_KEYS = ("flops_per_token", "total_flops", "gpu_hours", "days", "cost_usd", "memory_per_gpu_gb",
                 "comm_seconds_per_step", "compute_seconds_per_step", "bubble_fraction")


@pytest.fixture(scope="module")
def published():
    return plan_run(PlanConfig(**V3_RUN, layout="published", mfu=0.39))


def test_published_v3_layout_fits_and_reports_everything(published):
    d = published.to_dict()
    for key in REQUIRED_KEYS:
        assert d[key] is not None, key
    assert published.layout["pp"] == 16 and published.layout["ep"] == 64 and published.layout["dp"] == 128
    assert published.micro_batches == 120 and published.global_batch == 15360
    assert 40 < published.memory_per_gpu_gb <= 80
    m = published.memory
    assert m["weights_gib"] > 0 and m["grads_gib"] > m["weights_gib"]  # FP32 gradients, BF16 weights
    assert published.bubble_fraction == pytest.approx(0.0, abs=0.06)  # DualPipe at 120 micro-batches
    # the all-to-all is bound by the 50 GB/s IB leg, ~3.6 of a token's ≤4 nodes reached
    assert published.comm["ep_scale_out_s"] > published.comm["ep_scale_up_s"]
    assert 3.0 < published.comm["nodes_reached"] <= 4.0
    assert published.comm["ep_s"] < published.compute_seconds_per_step  # DualPipe can hide it
    assert published.energy_mwh == pytest.approx(published.gpu_hours * 700 / 1e6)
    assert published.export["rule_2022"] == "not controlled" and published.export["rule_2023"] == "3A090.a"


def test_gpu_hours_scale_with_peak_at_equal_mfu():
    h800 = plan_run(PlanConfig(**V3_RUN, mfu=0.35, layout="published"))
    h20 = plan_run(PlanConfig(**{**V3_RUN, "gpu": "h20"}, mfu=0.35, layout="published"))
    assert h20.gpu_hours / h800.gpu_hours == pytest.approx(989.5 / 148)  # "about 6.7x more GPU-hours"
    assert h800.total_flops == pytest.approx(14.8e12 * h800.flops_per_token)


def test_efficiency_mode_sees_overlap_and_bubble():
    base = PlanConfig(**V3_RUN, efficiency=0.5, layout="published")
    dual = plan_run(base)
    one = plan_run(base, layout={"schedule": "1f1b"})
    none = plan_run(base, comm=CommConfig(ep_overlap="none"))
    assert dual.mode == "efficiency" and 0.2 < dual.mfu < 1.0
    assert one.bubble_fraction > dual.bubble_fraction
    assert none.comm_exposed_seconds_per_step > dual.comm_exposed_seconds_per_step
    assert none.gpu_hours > dual.gpu_hours and one.gpu_hours > dual.gpu_hours
    assert dual.step_seconds == pytest.approx(
        dual.compute_seconds_per_step + dual.bubble_seconds_per_step + dual.comm_exposed_seconds_per_step)


def test_unreachable_mfu_is_flagged():
    # 99% of the BF16 peak is out of reach in BF16 (bubble, recompute) but not with FP8 GEMMs (2x the peak)
    bf16 = plan_run(PlanConfig(**V3_RUN, mfu=0.99, layout="published"), layout={"precision": "bf16", "recompute": "full"})
    assert bf16.busy_efficiency > 1 and any("not reachable" in w for w in bf16.warnings)
    fp8 = plan_run(PlanConfig(**V3_RUN, mfu=0.99, layout="published"))
    assert fp8.busy_efficiency < 1 and not any("not reachable" in w for w in fp8.warnings)


def test_auto_layout_search_fits_and_honours_fixed_keys():
    auto = plan_run(PlanConfig(**V3_RUN, mfu=0.35))
    assert auto.fits and auto.layout_mode == "auto"
    fixed = plan_run(PlanConfig(**V3_RUN, mfu=0.35), layout={"pp": 8, "schedule": "dualpipe"})
    assert fixed.layout["pp"] == 8 and fixed.layout["schedule"] == "dualpipe" and fixed.layout_mode == "partial"


def test_memory_formulas_for_model_states():
    cfg = DenseModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4)
    shape = shape_of(cfg)
    P = cfg.param_counts()["total"]
    one = LayoutConfig(dp=1, zero=0)
    m = memory_per_gpu(shape, one, 128, 1, reserved_gib=0.0)
    # mixed-precision Adam: 2 + 2 + (4 + 4 + 4) = 16 bytes per parameter (ZeRO paper)
    assert (m.weights_gib + m.grads_gib + m.optimizer_gib) * GIB == pytest.approx(16 * P)
    z1 = memory_per_gpu(shape, LayoutConfig(dp=4, zero=1), 128, 1, reserved_gib=0.0)
    assert (z1.weights_gib + z1.grads_gib + z1.optimizer_gib) * GIB == pytest.approx((4 + 12 / 4) * P)
    z3 = memory_per_gpu(shape, LayoutConfig(dp=4, zero=3), 128, 1, reserved_gib=0.0)
    assert (z3.weights_gib + z3.grads_gib + z3.optimizer_gib) * GIB == pytest.approx(16 / 4 * P)
    sel = memory_per_gpu(shape, LayoutConfig(dp=1, recompute="selective"), 128, 1, 0.0)
    full = memory_per_gpu(shape, LayoutConfig(dp=1, recompute="full"), 128, 1, 0.0)
    assert full.activations_gib < sel.activations_gib < m.activations_gib
    fp8 = memory_per_gpu(shape, LayoutConfig(dp=1, precision="fp8"), 128, 1, 0.0)
    assert fp8.activations_gib < m.activations_gib
    assert m.logits_gib * GIB == pytest.approx(128 * 1000 * 4)


def test_pipeline_memory_dualpipe_holds_two_stages():
    shape = shape_of(ModelConfig(num_nextn_predict_layers=1))
    lay, micro = resolve_layout(LayoutConfig(pp=16, ep=64, schedule="dualpipe"), shape, 2048, 8, 15360)
    one, _ = resolve_layout(LayoutConfig(pp=16, ep=64, schedule="1f1b"), shape, 2048, 8, 15360)
    dual = memory_per_gpu(shape, lay, 4096, micro)
    single = memory_per_gpu(shape, one, 4096, micro)
    # DualPipe: PP+1 chunks on every rank; 1F1B: rank r holds pp − r micro-batches' activations
    assert dual.in_flight_chunks == 17 and single.in_flight_chunks == 16 - single.rank
    assert dual.params_local > 1.5 * single.params_local  # two stages' parameters per rank


def test_expert_parallel_traffic():
    shape = shape_of(ModelConfig())
    assert expected_nodes_hit(8, 32, 1) == pytest.approx(1.0)
    assert expected_nodes_hit(8, 32, 200) == pytest.approx(8.0)
    inside = ep_traffic(shape, LayoutConfig(ep=8), 8, CommConfig())
    assert inside.scale_out_bytes == 0 and inside.scale_up_bytes > 0
    limited = ep_traffic(shape, LayoutConfig(ep=64), 8, CommConfig())
    free = ep_traffic(shape, LayoutConfig(ep=64), 8, CommConfig(max_nodes_per_token=8))
    assert limited.nodes_reached < 4.0 < free.nodes_reached < 8.0  # node-limited routing: at most 4 of 8
    assert limited.scale_out_bytes < free.scale_out_bytes
    fp8 = ep_traffic(shape, LayoutConfig(ep=64, precision="fp8"), 8, CommConfig())
    assert fp8.bytes_per_element == pytest.approx(1 + 4 / 128 + 6)  # FP8 dispatch, BF16 combine and backward
    h800 = load_catalogue().get("h800")
    assert h800.scale_up_gbs_per_direction(0.8) / h800.scale_out_gbs_per_direction(1.0) == pytest.approx(3.2)


@pytest.mark.parametrize("layout,msg", [
    ({"dp": 100, "pp": 16, "tp": 1, "ep": 1, "schedule": "1f1b", "zero": 1, "recompute": "full"}, "!= count 2048"),
    ({"dp": 2048, "pp": 1, "tp": 1, "ep": 3, "schedule": "1f1b", "zero": 1, "recompute": "full"}, "does not divide the 256 routed experts"),
    ({"dp": 16, "pp": 128, "tp": 1, "ep": 1, "schedule": "1f1b", "zero": 1, "recompute": "full"}, "128 pipeline stages for 61 layers"),
    ({"dp": 128, "pp": 16, "tp": 1, "ep": 64, "schedule": "dualpipe", "zero": 1, "recompute": "none"}, "does not fit"),
    ({"dp": 256, "pp": 8, "tp": 1, "ep": 1, "schedule": "zb1p", "zero": 1, "recompute": "full", "micro_batch": 64}, "at least pp micro-batches"),
])
def test_impossible_or_oversized_layouts_are_plan_errors(layout, msg):
    with pytest.raises(PlanError, match=msg):
        plan_run(PlanConfig(**V3_RUN), layout=LayoutConfig(**layout))


def test_nothing_fits_and_bad_inputs():
    with pytest.raises(PlanError, match="does not fit on 8 x h100"):
        plan_run(PlanConfig(model="deepseek-v3", tokens="1T", gpu="h100", count=8))
    with pytest.raises(PlanError, match="unknown chip"):
        plan_run(PlanConfig(**{**V3_RUN, "gpu": "h900"}))
    with pytest.raises(PlanError, match="unknown model"):
        plan_run(PlanConfig(**{**V3_RUN, "model": "gpt-9"}))
    with pytest.raises(PlanError, match="GPU count"):
        plan_run(PlanConfig(**{**V3_RUN, "count": 0}))
    with pytest.raises(PlanError, match="has no FP8"):
        plan_run(PlanConfig(**{**V3_RUN, "gpu": "a100"}), layout={"precision": "fp8"})
    with pytest.raises(PlanError, match="cannot read tokens"):
        PlanConfig(tokens="lots")
    assert parse_amount("14.8T") == 14.8e12 and parse_amount("300B") == 3e11 and parse_amount("2_000") == 2000


def test_compare_marks_fleets_that_cannot_run(tmp_path):
    from frugalm.plan.report import compare_chart

    cfg = PlanConfig(model="moonlight-16b-a3b", tokens="1T", count=8, mfu=0.3)
    results = compare(cfg, ["h100", "ascend-910b", "h20"], layout={"pp": 1, "ep": 8, "zero": 1, "recompute": "none"})
    assert isinstance(results[0], type(results[2])) and not isinstance(results[0], PlanError)
    assert isinstance(results[1], PlanError) and "does not fit" in str(results[1])  # ~70 GiB > 64
    assert results[2].gpu_hours / results[0].gpu_hours == pytest.approx(989.5 / 148)
    png = compare_chart(results, ["h100", "ascend-910b", "h20"], tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PlanError, match="unknown chip"):
        compare(cfg, ["h100", "nope"])
