"""FP8 grouped GEMM for MoE experts (`linear_fn(x, w[E, out, in], offs)`): per-expert recipe, grads, FP8 saves."""

from __future__ import annotations

import pytest
import torch

from frugalm.fp8.backends import agreement_bound
from frugalm.fp8.error_bounds import gemm_error_bound
from frugalm.fp8.linear import FP8GroupedLinear, fp8_grouped_linear, fp8_linear
from frugalm.fp8.quantize import quantize_activation, quantize_for_wgrad, quantize_weight
from frugalm.fp8.synthetic import activations_with_outliers, gradients_like, weights_like

E, D, OUT = 4, 160, 96
COUNTS = [150, 0, 7, 140]  # an empty expert, a tiny one, and groups that are not multiples of 128


def _inputs(extra_rows: int = 0):
    n = sum(COUNTS) + extra_rows
    x = activations_with_outliers(n, D, seed=31)
    w = torch.stack([weights_like(OUT, D, seed=40 + e) for e in range(E)])
    offs = torch.tensor(COUNTS, dtype=torch.int32).cumsum(0).to(torch.int32)
    dy = gradients_like(n, OUT, seed=32)
    return x, w, offs, dy


def _bounds(offs: torch.Tensor):
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


@pytest.mark.parametrize("backend", ["sliced", "emulated"])
def test_grouped_equals_per_expert_fp8_linear(backend):
    """Token tiles are per row and Wgrad tiles are cut per expert, so each expert's slice is exactly a
    dense FP8 linear of its own tokens."""
    x, w, offs, dy = _inputs()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_grouped_linear(xg, wg, offs, backend=backend)
    y.backward(dy)
    for e, (s, t) in enumerate(_bounds(offs)):
        if t == s:
            assert (wg.grad[e] == 0).all()
            continue
        xe, we = x[s:t].clone().requires_grad_(), w[e].clone().requires_grad_()
        ye = fp8_linear(xe, we, backend=backend)
        ye.backward(dy[s:t])
        x_q, w_q = quantize_activation(x[s:t]), quantize_weight(w[e])
        tol = agreement_bound(x_q, w_q)
        assert ((y[s:t] - ye).abs() <= tol).all()
        assert ((xg.grad[s:t] - xe.grad).abs() <= agreement_bound(quantize_activation(dy[s:t]), w_q.t())).all()
        dyw, xw = quantize_for_wgrad(dy[s:t]).t(), quantize_for_wgrad(x[s:t]).t()
        assert ((wg.grad[e] - we.grad).abs() <= agreement_bound(dyw, xw)).all()


def test_grouped_gradients_within_stated_bound_of_fp32_reference():
    x, w, offs, dy = _inputs()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    fp8_grouped_linear(xg, wg, offs).backward(dy)
    for e, (s, t) in enumerate(_bounds(offs)):
        if t == s:
            continue
        xe, dye = x[s:t], dy[s:t]
        cases = [
            (xg.grad[s:t], dye, quantize_activation(dye), w[e].t(), quantize_weight(w[e]).t()),
            (wg.grad[e], dye.t(), quantize_for_wgrad(dye).t(), xe.t(), quantize_for_wgrad(xe).t()),
        ]
        for got, a, a_q, b, b_q in cases:
            err = (got.double() - a.double() @ b.double().t()).abs()
            assert (err <= gemm_error_bound(a, a_q, b, b_q)).all()


def test_rows_after_the_last_offset_get_zero_output_and_gradient():
    x, w, offs, dy = _inputs(extra_rows=5)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_grouped_linear(xg, wg, offs, backend="emulated")
    assert (y[-5:] == 0).all()
    y.backward(dy)
    assert (xg.grad[-5:] == 0).all()


def test_offs_are_validated():
    x, w, offs, _ = _inputs()
    with pytest.raises(ValueError, match="entries for 4 experts"):
        fp8_grouped_linear(x, w, offs[:3])
    with pytest.raises(ValueError, match="non-decreasing"):
        fp8_grouped_linear(x, w, offs.flip(0))
    with pytest.raises(ValueError, match="expected x"):
        fp8_grouped_linear(x, w[0], offs)


def test_grouped_saves_only_fp8_and_scales_and_keeps_dtypes():
    x, w, offs, _ = _inputs()
    xb = x.to(torch.bfloat16).requires_grad_()
    wg = w.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8_grouped_linear(xb, wg, offs)
    assert {t.dtype for t in saved} <= {torch.float8_e4m3fn, torch.float32}
    fp8_shapes = sorted(tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn)
    assert fp8_shapes == sorted([(sum(COUNTS), D), (E, OUT, D)])
    # 128x1 Wgrad tiles are cut per expert: ceil(150/128) + ceil(7/128) + ceil(140/128) = 5 token tiles
    assert any(tuple(t.shape) == (5, D) and t.dtype == torch.float32 for t in saved)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and wg.grad.dtype == torch.float32


def test_fp8_grouped_linear_drops_into_an_experts_linear_fn():
    """The same call shape as the model's default grouped GEMM (torch._grouped_mm semantics)."""
    x, w, offs, _ = _inputs()
    ref = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    got = FP8GroupedLinear(backend="sliced")(x, w, offs)
    assert got.shape == ref.shape
    assert ((got - ref).norm() / ref.norm()).item() < 0.06


@pytest.mark.parametrize("transpose_b", [False, True])
def test_emulated_grouped_gemm_is_the_per_expert_gemm(transpose_b):
    """`EmulatedGemm.grouped_gemm` dequantizes once for all experts; the products must not change beyond
    the FP32 GEMM kernel's summation order (operands differ only in memory layout)."""
    from frugalm.fp8.backends import EmulatedGemm

    x, w, offs, _ = _inputs()
    a, b = quantize_activation(x), quantize_weight(w.transpose(1, 2).contiguous() if transpose_b else w)
    gemm = EmulatedGemm()
    got = gemm.grouped_gemm(a, b, _bounds(offs), torch.zeros(x.shape[0], OUT), transpose_b)
    for e, (s, t) in enumerate(_bounds(offs)):
        if t > s:
            ref = gemm.gemm(a.rows(s, t), b[e].t() if transpose_b else b[e], torch.float32)
            torch.testing.assert_close(got[s:t], ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
