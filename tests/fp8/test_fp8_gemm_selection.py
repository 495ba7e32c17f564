"""`fp8.gemms`: which of Fprop/Dgrad/Wgrad take FP8 operands (the ablation knob); the rest run as nn.Linear."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from frugalm.config import ConfigError, apply_overrides, from_dict
from frugalm.fp8.apply import apply_fp8
from frugalm.fp8.config import GEMM_NAMES, FP8Config
from frugalm.fp8.linear import FP8GroupedLinear, FP8Linear, fp8_grouped_linear, fp8_linear
from frugalm.fp8.synthetic import activations_with_outliers, gradients_like, weights_like

M, K, N = 200, 300, 136
SUBSETS = [list(c) for r in range(4) for c in itertools.combinations(GEMM_NAMES, r)]


def _grads(fn, x, w, dy, **kw):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xg, wg, **kw)
    y.backward(dy)
    return {"fprop": y.detach(), "dgrad": xg.grad, "wgrad": wg.grad}


@pytest.mark.parametrize("gemms", SUBSETS, ids=lambda g: "+".join(g) or "none")
def test_each_gemm_is_fp8_exactly_when_selected(gemms):
    """A selected GEMM gives the all-FP8 result, an unselected one the FP32 result -- independently of the
    other two (no GEMM reuses another's operands in the wrong precision)."""
    x, w, dy = activations_with_outliers(M, K, seed=5), weights_like(N, K, seed=6), gradients_like(M, N, seed=7)
    fp8 = _grads(fp8_linear, x, w, dy, backend="emulated")
    hp = _grads(lambda a, b: a @ b.t(), x, w, dy)
    got = _grads(fp8_linear, x, w, dy, backend="emulated", gemms=gemms)
    for name in GEMM_NAMES:
        want = fp8[name] if name in gemms else hp[name]
        other = hp[name] if name in gemms else fp8[name]
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), name
        assert not torch.allclose(got[name], other, rtol=1e-3, atol=0), name  # FP8 error is ~3%


@pytest.mark.parametrize("gemms", [["fprop"], ["dgrad", "wgrad"], []], ids=lambda g: "+".join(g) or "none")
def test_grouped_experts_follow_the_same_selection(gemms):
    counts = [150, 0, 7, 140]
    n = sum(counts)
    x, dy = activations_with_outliers(n, K, seed=8), gradients_like(n, N, seed=9)
    w = torch.stack([weights_like(N, K, seed=10 + e) for e in range(len(counts))])
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = _grads(lambda a, b: fp8_grouped_linear(a, b, offs, backend="emulated", gemms=gemms), x, w, dy)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end == start:
            assert got["wgrad"][e].abs().max() == 0
            continue
        ref = _grads(fp8_linear, x[start:end], w[e], dy[start:end], backend="emulated", gemms=gemms)
        for name, part in (("fprop", got["fprop"][start:end]), ("dgrad", got["dgrad"][start:end]),
                           ("wgrad", got["wgrad"][e])):
            assert torch.allclose(part, ref[name], rtol=1e-5, atol=1e-5 * ref[name].abs().max().item()), (e, name)
        start = end


def test_high_precision_gemms_under_autocast_match_nn_linear_in_bf16():
    """With no FP8 GEMM the layer computes what nn.Linear does under BF16 autocast (BF16 operands)."""
    lin = nn.Linear(K, N)
    fp8 = FP8Linear.from_linear(lin, backend="emulated", gemms=[])
    x = activations_with_outliers(M, K, seed=11)
    outs = []
    for mod in (lin, fp8):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mod(xg)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append((y.detach().float(), xg.grad.clone(), lin.weight.grad.clone()))
        lin.weight.grad = lin.bias.grad = None
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_saved_for_backward_is_fp8_only_for_fp8_gemms():
    x = activations_with_outliers(M, K, seed=12).requires_grad_()
    w = weights_like(N, K, seed=13).requires_grad_()
    for gemms, want in ((["fprop", "dgrad", "wgrad"], {torch.float8_e4m3fn, torch.float32}),
                        (["fprop"], {torch.float32})):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fp8_linear(x, w, backend="emulated", gemms=gemms)
        dtypes = {t.dtype for t in saved}
        assert dtypes == want, (gemms, dtypes)
        if gemms == ["fprop"]:  # high-precision Wgrad/Dgrad keep x and the weight itself, no FP8 copies
            assert any(t.data_ptr() == w.data_ptr() for t in saved)
            assert any(t.shape == x.shape for t in saved)


def test_gemms_config_is_validated_loaded_and_applied(caplog):
    raw = apply_overrides({}, ['fp8.enabled=true', 'fp8.gemms=["fprop", "dgrad"]'])
    cfg = from_dict(FP8Config, raw["fp8"], "fp8")
    assert cfg.gemms == ["fprop", "dgrad"]
    assert FP8Config().gemms == ["fprop", "dgrad", "wgrad"]
    for bad, match in ((["fprop", "bprop"], "unknown GEMM"), (["wgrad", "wgrad"], "twice"), ("fprop", "string")):
        with pytest.raises(ValueError, match=match):
            FP8Config(gemms=bad)
    with pytest.raises(ConfigError):
        from_dict(FP8Config, {"gemms": ["Fprop"]}, "fp8")
    with pytest.raises(ValueError, match="unknown GEMM"):
        fp8_linear(torch.randn(4, 8), torch.randn(3, 8), gemms=["forward"])

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 8, 8))
            self.linear_fn = None

    model = nn.Sequential(nn.Linear(8, 8), Experts())
    with caplog.at_level(logging.INFO, logger="frugalm.fp8.apply"):
        apply_fp8(model, cfg)
    assert isinstance(model[0], FP8Linear) and model[0].gemms == ("fprop", "dgrad")
    assert "fp8_gemms=['fprop', 'dgrad']" in repr(model[0])
    assert model[1].linear_fn == FP8GroupedLinear(backend="auto", gemms=("fprop", "dgrad"))
    assert "FP8 GEMMs only ['fprop', 'dgrad']" in caplog.text
