"""Published runs: DeepSeek-V3's 2.664M H800 GPU-hours and $5.576M, Llama 3.1 405B's 30.84M H100 GPU-hours."""

import pytest

from frugalm.plan.claims import check_claim, claim_presets
from frugalm.plan.errors import PlanError
from frugalm.plan.planner import PlanConfig, plan_run


@pytest.fixture(scope="module")
def v3():
    return check_claim("deepseek-v3")


@pytest.fixture(scope="module")
def llama():
    return check_claim("llama-3.1-405b")


def test_deepseek_v3_implied_mfu(v3):
    assert v3.mfu_6nd == pytest.approx(0.346, abs=0.001)  # 6·37e9·14.8e12 over 2.664M H800-hours at 989.5 TF
    assert v3.mfu_with_attention == pytest.approx(0.394, abs=0.002)  # "≈ 39%": + the causal MLA attention term
    pre = v3.stages[0]
    assert pre.mfu_6nd_of_fp8_peak == pytest.approx(0.173, abs=0.001)
    assert pre.achieved_tflops_per_gpu_6nd == pytest.approx(343, abs=1)
    assert pre.gpu_hours_per_trillion_tokens == pytest.approx(180e3, rel=1e-9)
    assert pre.tokens_per_s_per_gpu == pytest.approx(1543, abs=1)
    assert pre.days_on_cluster == pytest.approx(54.2, abs=0.1)


def test_deepseek_v3_cost_and_replan(v3):
    assert v3.stages[0].cost_usd == pytest.approx(5.328e6)
    assert v3.total_gpu_hours == pytest.approx(2.788e6)
    assert v3.cost_usd == pytest.approx(5.576e6)
    # the planner at the implied MFU reproduces the published hours and the total cost
    assert v3.stages[0].replanned_gpu_hours == pytest.approx(2.664e6, rel=1e-6)
    assert v3.replanned_cost_usd == pytest.approx(5.576e6, rel=1e-6)


def test_planner_reproduces_v3_by_6nd_with_its_published_layout(v3):
    result = plan_run(PlanConfig(
        model="deepseek-v3", tokens="14.8T", gpu="h800", count=2048, mfu=v3.mfu_6nd, flops_method="6nd",
        n_active=37e9, layout="published",
    ))
    assert result.gpu_hours == pytest.approx(2.664e6, rel=1e-6)
    assert result.cost_usd == pytest.approx(5.328e6, rel=1e-6)  # the H800's catalogued price is DeepSeek's $2
    assert result.cost_usd + sum(s.cost_usd for s in v3.stages[1:]) == pytest.approx(5.576e6, rel=1e-6)
    assert result.days == pytest.approx(54.2, abs=0.1)
    assert result.fits and result.memory_per_gpu_gb <= 80


def test_llama_405b_implied_mfu(llama):
    assert llama.mfu_6nd == pytest.approx(0.345, abs=0.001)
    assert llama.stages[0].achieved_tflops_per_gpu_6nd == pytest.approx(341, abs=1)
    assert llama.stages[0].replanned_gpu_hours == pytest.approx(30.84e6, rel=1e-6)
    assert any("rental price" in n for n in llama.notes)


def test_v3_and_llama_utilise_the_hardware_alike(v3, llama):
    # the ~11x gap in GPU-hours per trillion tokens comes from 37B vs 405B active parameters
    ratio = llama.stages[0].gpu_hours_per_trillion_tokens / v3.stages[0].gpu_hours_per_trillion_tokens
    assert ratio == pytest.approx(11, abs=0.1)
    assert v3.stages[0].achieved_tflops_per_gpu_6nd / llama.stages[0].achieved_tflops_per_gpu_6nd == pytest.approx(1.0, abs=0.01)


def test_presets_and_unknown_preset():
    presets = claim_presets()
    assert {"deepseek-v3", "llama-3.1-405b", "llama-3.1-70b", "llama-3.1-8b"} <= set(presets)
    small = check_claim("llama-3.1-8b")
    assert small.mfu_6nd == pytest.approx(0.138, abs=0.002) and small.replanned_total_gpu_hours is None
    with pytest.raises(PlanError, match="unknown claim preset"):
        check_claim("gpt-5")
