"""FP8 linear: the three GEMMs use the recipe's tilings, stay within the FP8 bound of FP32, save only FP8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frugalm.fp8.backends import agreement_bound
from frugalm.fp8.error_bounds import gemm_error_bound
from frugalm.fp8.linear import FP8Linear, fp8_linear
from frugalm.fp8.quantize import quantize_activation, quantize_for_wgrad, quantize_weight
from frugalm.fp8.synthetic import activations_with_outliers, gradients_like, weights_like

M, K, N = 200, 300, 136  # tokens, in, out: none a multiple of 128, so every tiling has edge tiles


def _run(backend: str, power_of_two: bool = False, dtype: torch.dtype = torch.float32):
    x = activations_with_outliers(M, K, seed=21).to(dtype).requires_grad_()
    w = weights_like(N, K, seed=22).requires_grad_()
    b = (0.1 * torch.randn(N)).requires_grad_()
    dy = gradients_like(M, N, seed=23).to(dtype)
    y = fp8_linear(x, w, b, backend=backend, power_of_two_scales=power_of_two)
    y.backward(dy)
    return x.detach(), w.detach(), b.detach(), dy, y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", ["sliced", "emulated"])
def test_three_gemms_equal_dequantize_then_matmul_with_recipe_tilings(backend):
    """Fprop: x 1x128, W 128x128. Dgrad: dy 1x128, same W blocks. Wgrad: dy and x in 128x1 tiles."""
    x, w, b, dy, y, dx, dw, db = _run(backend)
    x_q, w_q, dy_q = quantize_activation(x), quantize_weight(w), quantize_activation(dy)
    dy_w, x_w = quantize_for_wgrad(dy).t(), quantize_for_wgrad(x).t()
    checks = [
        (y - b, x_q.dequantize() @ w_q.dequantize().t(), agreement_bound(x_q, w_q)),
        (dx, dy_q.dequantize() @ w_q.dequantize(), agreement_bound(dy_q, w_q.t())),
        (dw, dy_w.dequantize() @ x_w.dequantize().t(), agreement_bound(dy_w, x_w)),
    ]
    for got, want, bound in checks:
        # + the fp32 rounding of adding/removing the bias on y
        assert ((got.double() - want.double()).abs() <= bound + 2.0 ** -23 * (want.abs() + 0.5)).all()
    assert torch.allclose(db, dy.sum(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,power_of_two", [("sliced", False), ("emulated", True)])
def test_three_gemms_within_stated_bound_of_fp32_reference(backend, power_of_two):
    """Bound: |fp8 - fp32| <= sum |da||b| + |a||db| + |da||db| (+ fp32 summation), |da| <= 2^-4|a| + 2^-10 s."""
    x, w, b, dy, y, dx, dw, _ = _run(backend, power_of_two)
    cases = {
        "fprop": (y - b, x, quantize_activation(x, power_of_two=power_of_two),
                  w, quantize_weight(w, power_of_two=power_of_two)),
        "dgrad": (dx, dy, quantize_activation(dy, power_of_two=power_of_two),
                  w.t(), quantize_weight(w, power_of_two=power_of_two).t()),
        "wgrad": (dw, dy.t(), quantize_for_wgrad(dy, power_of_two=power_of_two).t(),
                  x.t(), quantize_for_wgrad(x, power_of_two=power_of_two).t()),
    }
    for name, (got, a, a_q, bb, b_q) in cases.items():
        ref = a.double() @ bb.double().t()
        err = (got.double() - ref).abs()
        slack = 2.0 ** -23 * (ref.abs() + 0.5) if name == "fprop" else 0.0  # bias add/subtract
        assert (err <= gemm_error_bound(a, a_q, bb, b_q) + slack).all(), name
        # typical error on these heavy-tailed inputs: a few percent (E4M3 RMS rounding ~2.5% per operand)
        rel = (err.norm() / ref.norm()).item()
        assert 0.005 < rel < 0.06, (name, rel)


def test_saved_for_backward_is_fp8_plus_tile_scales_only():
    x = activations_with_outliers(256, 384, seed=1).to(torch.bfloat16).requires_grad_()
    layer = FP8Linear(384, 256)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    fp8 = [s for s in saved if s[0] == torch.float8_e4m3fn]
    assert sorted(s[1] for s in fp8) == [(256, 384), (256, 384)]  # x (128x1 tiles) and W (128x128)
    assert all(s[0] in (torch.float8_e4m3fn, torch.float32) for s in saved)
    scale_bytes = sum(s[2] for s in saved if s[0] == torch.float32)
    assert scale_bytes == 4 * (2 * 384 + 2 * 3)  # x: 2 token-tiles x 384 channels; W: 2 x 3 blocks
    assert not any(s[0] == torch.bfloat16 for s in saved)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32


def test_nothing_is_saved_for_a_gradient_nobody_needs():
    layer = FP8Linear(128, 128, bias=False)
    x = torch.randn(16, 128)  # first layer: input needs no grad -> W's FP8 copy is not kept
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        layer(x)
    assert [tuple(s) for s in shapes] == [(16, 128), (1, 128)]
    layer.weight.requires_grad_(False)  # frozen weight, input needs grad -> x is not kept
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        layer(x.requires_grad_())
    assert [tuple(s) for s in shapes] == [(128, 128), (1, 1)]


def test_bf16_activations_keep_their_dtype_and_3d_shape():
    layer = FP8Linear(256, 64, dtype=torch.float32)
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 64)
    ref = x.detach().float() @ layer.weight.detach().t() + layer.bias.detach()
    assert ((y.float() - ref).norm() / ref.norm()) < 0.06
    y.float().pow(2).sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


def test_fp8_linear_trains_inside_a_sequential_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 32))
    x = torch.randn(256, 128)
    with torch.no_grad():
        target = teacher(x)

    def train(model: nn.Module) -> list[float]:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for step in range(50):
            batch = slice((step % 4) * 64, (step % 4 + 1) * 64)
            loss = nn.functional.mse_loss(model(x[batch]), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    torch.manual_seed(1)
    fp32 = nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 32))
    fp8 = nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 32))
    fp8.load_state_dict(fp32.state_dict())
    keys = list(fp8.state_dict())
    fp8[0] = FP8Linear.from_linear(fp8[0])
    fp8[2] = FP8Linear.from_linear(fp8[2])
    assert list(fp8.state_dict()) == keys
    ref_losses, fp8_losses = train(fp32), train(fp8)
    assert fp8_losses[-1] < 0.05 * fp8_losses[0]
    # FP8 adds a noise floor of about (3% output error)^2 * var(target) ~ 7e-5 against a final ~1e-3.
    assert fp8_losses[-1] < 1.25 * ref_losses[-1]


def test_from_linear_shares_parameters_and_matches_within_fp8_error():
    lin = nn.Linear(256, 130)
    fp8 = FP8Linear.from_linear(lin, backend="emulated")
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert "fp8_backend='emulated'" in repr(fp8)
    x = activations_with_outliers(64, 256, seed=2)
    with torch.no_grad():
        ref, got = lin(x), fp8(x)
    assert ((got - ref).norm() / ref.norm()) < 0.06
    no_bias = FP8Linear.from_linear(nn.Linear(8, 4, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(3, 8)).shape == (3, 4)
