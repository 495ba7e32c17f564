"""Tile-scaled E4M3 quantization: scale shapes, edge and zero tiles, saturation, error bound, checkpoint form."""

from __future__ import annotations

import pytest
import torch

from frugalm.fp8.error_bounds import quantization_error_bound
from frugalm.fp8.quantize import (
    ABS_ERR,
    ACTIVATION_TILE,
    FP8_DTYPE,
    FP8_MAX,
    REL_ERR,
    WEIGHT_TILE,
    WGRAD_TILE,
    FP8Tensor,
    dequantize_weight_blockwise,
    expand_scale,
    quantize_activation,
    quantize_for_wgrad,
    quantize_tiles,
    quantize_weight,
    quantize_weight_blockwise,
)
from frugalm.fp8.synthetic import activations_with_outliers, gradients_like

TILINGS = {"activation 1x128": quantize_activation, "weight 128x128": quantize_weight, "wgrad 128x1": quantize_for_wgrad}


def test_scale_shapes_follow_the_recipe_tilings_with_partial_edge_tiles():
    x = torch.randn(300, 200)
    assert quantize_activation(x).scale.shape == (300, 2)  # per token, ceil(200/128)
    assert quantize_weight(x).scale.shape == (3, 2)  # ceil(300/128) x ceil(200/128)
    assert quantize_for_wgrad(x).scale.shape == (3, 200)  # ceil(300 tokens/128) x channels
    stacked = quantize_weight(torch.randn(4, 300, 200))  # MoE experts [E, out, in]
    assert stacked.data.shape == (4, 300, 200) and stacked.scale.shape == (4, 3, 2)
    for q in (quantize_activation(x), quantize_weight(x), quantize_for_wgrad(x)):
        assert q.data.dtype == FP8_DTYPE and q.scale.dtype == torch.float32 and q.data.shape == x.shape


def test_edge_tile_scale_comes_from_the_elements_that_exist():
    x = torch.zeros(130, 135)
    x[129, 134] = 7.0  # alone in the bottom-right 2x7 edge block
    x[0, 0] = 1.0
    q = quantize_weight(x)
    f32 = torch.float32
    assert q.scale[1, 1] == torch.tensor(7.0, dtype=f32) / FP8_MAX  # not diluted by the 126 padded rows
    assert q.scale[0, 0] == torch.tensor(1.0, dtype=f32) / FP8_MAX
    assert q.scale[0, 1] == 1.0 and q.scale[1, 0] == 1.0  # all-zero blocks
    assert q.data[129, 134].float().item() == FP8_MAX and q.data[0, 0].float().item() == FP8_MAX


def test_zero_tiles_get_scale_one_and_no_nan():
    x = torch.randn(4, 384)
    x[:, 128:256] = 0.0
    x[2] = 0.0
    for quantize in TILINGS.values():
        q = quantize(x)
        deq = q.dequantize()
        assert torch.isfinite(q.scale).all() and not torch.isnan(q.data.float()).any()
        assert (deq[:, 128:256] == 0).all() and (deq[2] == 0).all()
    q = quantize_activation(x)
    assert (q.scale[:, 1] == 1.0).all() and (q.scale[2] == 1.0).all()
    assert torch.equal(quantize_activation(torch.zeros(3, 7)).scale, torch.ones(3, 1))


def test_tile_maximum_maps_to_448_and_nothing_saturates_past_it():
    x = activations_with_outliers(64, 300, seed=3) * 1e3
    for quantize in TILINGS.values():
        q = quantize(x)
        vals = q.data.float()
        assert vals.abs().max().item() == FP8_MAX
        assert torch.isfinite(vals).all() and vals.abs().max() <= FP8_MAX


def test_values_beyond_448_times_scale_saturate_instead_of_becoming_nan(monkeypatch):
    """Saturation is our clamp's doing, not the cast's (whose out-of-range behaviour varies by kernel)."""
    import frugalm.fp8.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "scale_from_amax", lambda amax, power_of_two=False: amax / 1000.0)
    x = torch.tensor([[1000.0, -500.0, 3.0]])
    q = quantize_module.quantize_activation(x)
    assert q.data.float().tolist() == [[448.0, -448.0, 3.0]]


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("power_of_two", [False, True])
def test_worst_case_relative_error_per_tile_is_2_to_minus_4(tiling, power_of_two):
    """E4M3 has 3 mantissa bits: round-to-nearest errs <= 2^-4 relative in the normal range and
    <= 2^-10 * tile scale (half the subnormal spacing) below it. The bound is attained, not loose."""
    x = torch.cat([activations_with_outliers(256, 260, seed=5), gradients_like(256, 260, seed=6)])
    q = TILINGS[tiling](x) if not power_of_two else TILINGS[tiling](x, power_of_two=True)
    deq = q.dequantize().double()
    err = (deq - x.double()).abs()
    assert (err <= quantization_error_bound(x, q)).all()
    scale = expand_scale(q.scale, q.tile, *x.shape).double()
    normal = x.double().abs() / scale >= 2.0 ** -6
    rel = err[normal] / x.double().abs()[normal]
    assert rel.max().item() <= REL_ERR * (1 + 2.0 ** -20)
    assert rel.max().item() > 0.9 * REL_ERR  # really rounded to 3 mantissa bits
    sub = ~normal & (x != 0)
    assert (err[sub] <= ABS_ERR * scale[sub] * (1 + 2.0 ** -20)).all()


def test_power_of_two_scales_are_exact_powers_covering_the_tile():
    x = activations_with_outliers(32, 384, seed=7)
    q = quantize_activation(x, power_of_two=True)
    mantissa, _ = torch.frexp(q.scale)
    assert (mantissa == 0.5).all()
    amax = x.abs().reshape(32, 3, 128).amax(-1)
    assert (q.scale >= amax / FP8_MAX).all() and (q.scale < 2 * amax / FP8_MAX).all()
    top = q.data.float().abs().amax()
    assert 224 <= top <= FP8_MAX
    exact = torch.full((1, 128), 448.0 * 2.0 ** -5)  # amax/448 is already 2^-5: must stay 2^-5
    assert quantize_activation(exact, power_of_two=True).scale.item() == 2.0 ** -5


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_input_poisons_only_its_own_tile(bad):
    x = torch.randn(2, 256)
    x[0, 5] = bad
    q = quantize_activation(x)
    deq = q.dequantize()
    assert not torch.isfinite(q.scale[0, 0]) and torch.isnan(deq[0, :128]).any()
    assert torch.isfinite(deq[0, 128:]).all() and torch.isfinite(deq[1]).all()


def test_bf16_input_is_scaled_from_its_exact_values():
    x = activations_with_outliers(16, 256, seed=8, dtype=torch.bfloat16)
    a, b = quantize_activation(x), quantize_activation(x.float())
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale)


def test_fp8tensor_transpose_rows_and_validation():
    x = torch.randn(300, 200)
    q = quantize_for_wgrad(x)
    qt = q.t()
    assert qt.tile == (1, 128) and qt.shape == (200, 300) and qt.scale.shape == (200, 3)
    assert torch.equal(qt.dequantize(), q.dequantize().t())
    part = q.rows(128, 300)
    assert torch.equal(part.dequantize(), q.dequantize()[128:])
    with pytest.raises(ValueError, match="cut through tiles"):
        q.rows(100, 200)
    with pytest.raises(ValueError, match="scale shape"):
        FP8Tensor(q.data, q.scale[:2], q.tile)


def test_checkpoint_blockwise_convention_matches_deepseek_formula():
    """W[i, j] = float(Wq[i, j]) * scale_inv[i // 128, j // 128], scale_inv fp32 [ceil(out/128), ceil(in/128)]."""
    w = torch.randn(300, 200, dtype=torch.bfloat16) * 0.05
    w_fp8, scale_inv = quantize_weight_blockwise(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == (300, 200)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    i = torch.arange(300)[:, None] // 128
    j = torch.arange(200)[None, :] // 128
    by_formula = w_fp8.float() * scale_inv[i, j]
    assert torch.equal(dequantize_weight_blockwise(w_fp8, scale_inv, torch.float32), by_formula)
    deq = dequantize_weight_blockwise(w_fp8, scale_inv)
    assert deq.dtype == torch.bfloat16
    # scale_inv is each block's amax / 448
    blocks = torch.nn.functional.pad(w.float().abs(), (0, 56, 0, 84)).reshape(3, 128, 2, 128).amax((1, 3))
    assert torch.equal(scale_inv, blocks / FP8_MAX)
    q = quantize_weight(w)
    assert ((by_formula.double() - w.double()).abs() <= quantization_error_bound(w, q)).all()


def test_checkpoint_dequantize_rejects_mismatched_scale_shape():
    w_fp8, scale_inv = quantize_weight_blockwise(torch.randn(300, 200))
    with pytest.raises(ValueError, match=r"needs \(3, 2\)"):
        dequantize_weight_blockwise(w_fp8, scale_inv[:2])
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_blockwise(torch.randn(2, 3, 4))


def test_generic_tiles_round_trip_within_bound_for_odd_tiles():
    x = torch.randn(3, 50, 70)
    q = quantize_tiles(x, (16, 32))
    assert q.scale.shape == (3, 4, 3)
    assert ((q.dequantize().double() - x.double()).abs() <= quantization_error_bound(x, q)).all()


def test_table_decode_equals_the_cast_for_every_bit_pattern():
    from frugalm.fp8.quantize import e4m3_to_float

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    got, want = e4m3_to_float(codes), codes.float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 2
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    strided = codes.t()  # non-contiguous input
    assert torch.equal(e4m3_to_float(strided).nan_to_num(), strided.float().nan_to_num())


@pytest.mark.parametrize("tile", [(1, 128), (128, 1), (128, 128), (4, 8)])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (3, 64, 96), (5, 7)])
def test_dequantize_is_elementwise_float_times_tile_scale(tile, shape):
    """The broadcast (whole tiles) and expanded-scale (edge tiles) paths both compute float(q) * scale, bit for bit."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 5
    q = quantize_tiles(x, tile)
    want = q.data.float() * expand_scale(q.scale, tile, *shape[-2:])
    assert torch.equal(q.dequantize(), want)


def test_cast_rounds_to_nearest_even_and_quantization_error_is_unbiased():
    """The E4M3 cast is round-to-nearest(-even), not truncation, and the tile-scaled round trip has no
    systematic error: its mean is ~0 and it is uncorrelated with x (a bias would shift every GEMM the
    same way, step after step, instead of averaging out)."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted representable values, -448..448
    x = (torch.rand(200_000, generator=torch.Generator().manual_seed(3)) * 2 - 1) * FP8_MAX
    got = x.to(FP8_DTYPE).float()
    hi_idx = torch.searchsorted(grid, x).clamp(1, len(grid) - 1)
    lo, hi = grid[hi_idx - 1], grid[hi_idx]
    nearest = torch.where(x - lo < hi - x, lo, hi)
    tie = (x - lo) == (hi - x)
    assert torch.equal(got[~tie], nearest[~tie])
    assert torch.tensor([1.0625, 1.1875]).to(FP8_DTYPE).float().tolist() == [1.0, 1.25]  # ties to even
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 512, generator=g) * torch.rand(512, generator=g).mul(3)  # channel-varying scales
    for tile in (ACTIVATION_TILE, WEIGHT_TILE, WGRAD_TILE):
        err = quantize_tiles(x, tile).dequantize() - x
        assert abs(err.mean().item()) < 1e-3 * x.abs().mean().item(), tile
        assert abs((err * x).sum().item()) < 3e-3 * (x * x).sum().item(), tile
        assert 0.48 < (err > 0).float().mean().item() < 0.52, tile


# ----------------------------------------------------------------------------- fused (Triton) quantization
_FUSED_CASES = [((3, 130, 300), (1, 128), False), ((260, 384), (128, 128), True), ((200, 129), (128, 1), False),
                ((2, 256, 136), (128, 128), False), ((300, 256), (128, 1), True), ((64, 256), (1, 128), True)]


def _fused_inputs(dtype: torch.dtype):
    """Inputs with outliers, an all-zero matrix, a NaN, tiny negatives (-0 codes) and partial edge tiles."""
    for i, (shape, tile, p2) in enumerate(_FUSED_CASES):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 3
        x.view(-1)[::97] *= 1000
        if i == 0:
            x[0, 5, 7] = float("nan")
            x[1] = 0
        yield x.to(dtype), tile, p2


def _same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte-equal E4M3 codes, any NaN equal to any NaN (its sign is not part of the contract)."""
    a8, b8 = a.view(torch.uint8), b.view(torch.uint8)
    nan_a, nan_b = (a8 & 0x7F) == 0x7F, (b8 & 0x7F) == 0x7F
    return bool(torch.equal(nan_a, nan_b) and torch.equal(a8[~nan_a], b8[~nan_b]))


_TRITON_CHECK = """
import torch
from test_fp8_quantize import _fused_inputs, _same_codes
from frugalm.fp8.quantize import quantize_tiles
from frugalm.fp8.quantize_triton import quantize_tiles_triton
n = 0
for dtype in (torch.float32, torch.bfloat16):
    for x, tile, p2 in _fused_inputs(dtype):
        ref = quantize_tiles(x, tile, power_of_two=p2, fused=False)
        q, s = quantize_tiles_triton(x, tile, p2)
        assert q.shape == ref.data.shape and s.shape == ref.scale.shape, (x.shape, tile)
        assert torch.equal(s.nan_to_num(-1.0), ref.scale.nan_to_num(-1.0)), (x.shape, tile, p2, dtype)
        assert _same_codes(q, ref.data), (x.shape, tile, p2, dtype)
        n += 1
xt = torch.randn(256, 200).t()  # a transposed (strided) input
q, s = quantize_tiles_triton(xt, (128, 1), False)
assert _same_codes(q, quantize_tiles(xt, (128, 1), fused=False).data)
print("ok", n)
"""


@pytest.mark.slow  # ~2 minutes: the interpreter runs every program in numpy
def test_triton_quantizer_equals_eager_in_the_interpreter(tmp_path):
    """The Triton kernel, run by Triton's CPU interpreter, gives the eager path's codes and scales exactly
    (every tiling, power-of-two scales, BF16 input, NaN/zero tiles, edge tiles, strided input)."""
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["ok", str(2 * len(_FUSED_CASES))]


def test_fused_is_chosen_only_on_cuda_and_for_power_of_two_tiles():
    from frugalm.fp8.quantize import _fusable_tile, _fusion_pays

    x = torch.randn(4, 256)
    assert not _fusion_pays(x)
    assert _fusable_tile((1, 128)) and _fusable_tile((128, 1)) and _fusable_tile((128, 128))
    assert not _fusable_tile((3, 5)) and not _fusable_tile((256, 256))
    with pytest.raises(ValueError, match="power-of-two tiles"):
        quantize_tiles(x, (3, 5), fused=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused quantizer's default path needs CUDA")
def test_fused_quantizer_on_cuda_equals_eager():
    from frugalm.fp8.quantize import _fusion_pays

    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for x, tile, p2 in _fused_inputs(dtype):
            x = x.to(device)
            assert _fusion_pays(x)
            ref = quantize_tiles(x, tile, power_of_two=p2, fused=False)
            got = quantize_tiles(x, tile, power_of_two=p2)
            assert torch.equal(got.scale.nan_to_num(-1.0), ref.scale.nan_to_num(-1.0)), (x.shape, tile, p2, dtype)
            assert _same_codes(got.data, ref.data), (x.shape, tile, p2, dtype)
