"""E4M3 quantization with online max-abs scales over tiles, in DeepSeek-V3's granularities.

DeepSeek-V3 trains with E4M3 for every tensor and makes the narrow range workable by giving each small
tile its own scale: activations and activation-gradients get one scale per 1x128 tile (one token, 128
channels), weights one per 128x128 block, and the weight-gradient GEMM, which contracts over tokens,
regroups its operands into 128x1 tiles (128 tokens, one channel). All of these are one operation with a
different tile shape, so this module implements it once (`quantize_tiles`) and names the recipe's uses.

Conventions (the same as DeepSeek's checkpoints and ``torch._scaled_mm``):

* ``scale`` is the *dequantization* multiplier, ``amax / 448`` (the checkpoint calls it ``scale_inv``):
  ``x ~= float(q) * scale``. Keeping this direction everywhere means a scale can be handed to a GEMM
  or written to a checkpoint without inverting it.
* Edge tiles (a dimension not divisible by the tile) are treated as zero-padded: their scale comes from
  the elements that exist.
* A tile that is all zeros gets scale 1.0, so nothing divides 0 by 0 and dequantization is exact.
* Values are clamped to +-448 before the cast, because the cast's behaviour past the range is not a
  contract (this CPU build saturates; c10's scalar float->e4m3fn conversion returns NaN). With online
  scales only fp32 rounding of ``x/scale`` can push a value past 448, by a few parts in 2^24.
* A non-finite input makes its tile's scale non-finite and the tile's values NaN, on purpose: a trainer
  must see overflow rather than a silently clipped tensor.

Error bound (what the tests pin): E4M3 keeps 3 mantissa bits, so for a value whose scaled magnitude
``|x|/scale`` is in the normal range (>= 2^-6) round-to-nearest-even errs by at most 2^-4 relative; below
that (subnormals, spacing 2^-9) the error is at most 2^-10 * scale absolute. Power-of-two scales (the
``ue8m0`` format) are ``2^ceil(log2(amax/448))``: multiplying by them is exact, at the cost of using as
little as half of the E4M3 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 (fn variant: no infinities, one NaN pattern)
TILE = 128  # DeepSeek-V3's tile edge, also the K-slice width of FP32 accumulation promotion

# The recipe's tile shapes, (rows, columns) of a row-major [rows, columns] tensor.
ACTIVATION_TILE = (1, TILE)  # per token, 128 channels: Fprop/Dgrad left operand
WEIGHT_TILE = (TILE, TILE)  # 128x128 weight blocks; square, so the transposed weight reuses them
WGRAD_TILE = (TILE, 1)  # 128 tokens, one channel: both Wgrad operands (contraction over tokens)

# Worst-case rounding error of one quantized element: |x - dq(q(x))| <= REL_ERR*|x| + ABS_ERR*scale.
REL_ERR = 2.0 ** -4
ABS_ERR = 2.0 ** -10


@dataclass(frozen=True)
class FP8Tensor:
    """An E4M3 tensor with one fp32 dequantization scale per tile of its last two dimensions.

    ``data`` is ``[..., R, C]`` in float8_e4m3fn; ``scale`` is ``[..., ceil(R/tr), ceil(C/tc)]`` in float32
    where ``tile = (tr, tc)``. Carrying the tile shape with the data lets a GEMM backend check that its
    operands were quantized the way the recipe says instead of trusting the caller.
    """

    data: Tensor
    scale: Tensor
    tile: tuple[int, int]

    def __post_init__(self) -> None:
        if self.data.dim() < 2:
            raise ValueError(f"FP8Tensor needs at least 2 dimensions, got shape {tuple(self.data.shape)}")
        expected = _scale_shape(self.data.shape, self.tile)
        if tuple(self.scale.shape) != expected:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} does not match data {tuple(self.data.shape)} "
                f"with tile {self.tile}: expected {expected}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        """Bytes held: one per element plus four per tile."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """float(q) * scale of its tile, computed in fp32, returned in ``dtype``."""
        return dequantize_tiles(self.data, self.scale, self.tile, dtype)

    def t(self) -> "FP8Tensor":
        """The transpose of the last two dimensions as views; tiles transpose with it (1x128 -> 128x1)."""
        return FP8Tensor(self.data.transpose(-2, -1), self.scale.transpose(-2, -1), (self.tile[1], self.tile[0]))

    def rows(self, start: int, end: int) -> "FP8Tensor":
        """Rows ``start:end`` of the last-but-one dimension; the cut must not split a tile."""
        tr = self.tile[0]
        if start % tr or (end % tr and end != self.data.shape[-2]):
            raise ValueError(f"rows {start}:{end} cut through tiles of {tr} rows")
        return FP8Tensor(
            self.data[..., start:end, :], self.scale[..., start // tr: math.ceil(end / tr), :], self.tile
        )

    def __getitem__(self, index: int) -> "FP8Tensor":
        """One matrix of a stacked ``[E, R, C]`` tensor (an expert's weight)."""
        if self.data.dim() < 3:
            raise IndexError("only a stacked FP8Tensor (3+ dimensions) can be indexed")
        return FP8Tensor(self.data[index], self.scale[index], self.tile)


def _scale_shape(shape: torch.Size | tuple[int, ...], tile: tuple[int, int]) -> tuple[int, ...]:
    tr, tc = tile
    return (*shape[:-2], math.ceil(shape[-2] / tr), math.ceil(shape[-1] / tc))


def scale_from_amax(amax: Tensor, power_of_two: bool = False) -> Tensor:
    """Dequantization scale ``amax/448`` per tile (1.0 for all-zero tiles), optionally rounded up to 2^k.

    Rounding *up* keeps ``|x|/scale <= 448`` so a power-of-two scale never saturates. ``frexp`` is used
    rather than ``log2`` because it is exact: an amax/448 that already is a power of two stays put.
    """
    amax = amax.float()
    scale = amax / FP8_MAX
    # A positive amax below 448 * (smallest normal fp32) would give a subnormal or zero scale.
    # (NaN/inf amax stays non-finite on purpose: see the module docstring.)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale.clamp_min(torch.finfo(torch.float32).tiny))
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
        exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
        pow2 = torch.ldexp(torch.ones_like(scale), exponent)
        scale = torch.where(torch.isfinite(scale), pow2, scale)
    return scale


def quantize_tiles(
    x: Tensor, tile: tuple[int, int], *, power_of_two: bool = False, fused: bool | None = None
) -> FP8Tensor:
    """Quantize the last two dimensions of ``x`` to E4M3 with one online max-abs scale per tile.

    Leading dimensions are independent matrices (stacked expert weights). Works in fp32 whatever the
    input dtype, so a bf16 activation is scaled without a second rounding. Rounding has no useful
    derivative, so the input is detached: gradients flow through the FP8 autograd Functions instead.

    ``fused`` runs the same arithmetic as one Triton kernel (`frugalm.fp8.quantize_triton`, identical codes
    and scales) instead of ~8 eager passes over the tensor; None (default) fuses on CUDA where Triton is
    installed, since there the eager passes cost more than the FP8 GEMM they feed (H100: 0.30 ms eager for
    a 4096x4096 BF16 activation vs 0.16 ms for the 4096^3 GEMM; BENCHMARKS.md, "GPU figures").
    """
    if x.dim() < 2:
        raise ValueError(f"quantize_tiles needs at least 2 dimensions, got shape {tuple(x.shape)}")
    tr, tc = tile
    if tr < 1 or tc < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    if fused is None:
        fused = _fusable_tile((tr, tc)) and _fusion_pays(x)
    if fused:
        if not _fusable_tile((tr, tc)):
            raise ValueError(f"the fused quantizer handles power-of-two tiles up to 128x128, not {tile}")
        from frugalm.fp8.quantize_triton import quantize_tiles_triton

        q, scale = quantize_tiles_triton(x.detach(), (tr, tc), power_of_two)
    else:
        q, scale = _quantize_tiles_eager(x.detach(), (tr, tc), power_of_two)
    return FP8Tensor(q, scale, (tr, tc))


def _quantize_tiles_eager(x: Tensor, tile: tuple[int, int], power_of_two: bool) -> tuple[Tensor, Tensor]:
    tr, tc = tile
    *lead, rows, cols = x.shape
    pad_r, pad_c = (-rows) % tr, (-cols) % tc
    xf = x.float()
    if pad_r or pad_c:
        xf = F.pad(xf, (0, pad_c, 0, pad_r))  # zeros do not change a tile's max-abs
    rb, cb = (rows + pad_r) // tr, (cols + pad_c) // tc
    blocks = xf.reshape(*lead, rb, tr, cb, tc)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = scale_from_amax(amax, power_of_two)
    scaled = (blocks / scale.unsqueeze(-1).unsqueeze(-3)).clamp_(-FP8_MAX, FP8_MAX)
    q = scaled.to(FP8_DTYPE).reshape(*lead, rows + pad_r, cols + pad_c)
    if pad_r or pad_c:
        q = q[..., :rows, :cols].contiguous()
    return q, scale


def _fusable_tile(tile: tuple[int, int]) -> bool:
    """Tiles the Triton kernel handles: power-of-two sides up to 128x128 (the recipe's three all are)."""
    return all(t & (t - 1) == 0 for t in tile) and tile[0] * tile[1] <= TILE * TILE


def _fusion_pays(x: Tensor) -> bool:
    if x.device.type != "cuda" or torch.compiler.is_compiling():  # inside a compiled model: inductor fuses it
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def expand_scale(scale: Tensor, tile: tuple[int, int], rows: int, cols: int) -> Tensor:
    """Per-element fp32 scale ``[..., rows, cols]`` from per-tile scales (edge tiles cut to size)."""
    tr, tc = tile
    full = scale.float()
    if tr > 1:
        full = full.repeat_interleave(tr, dim=-2)
    if tc > 1:
        full = full.repeat_interleave(tc, dim=-1)
    return full[..., :rows, :cols]


_E4M3_TABLES: dict[torch.device, Tensor] = {}


def e4m3_to_float(data: Tensor) -> Tensor:
    """``data.float()`` for a float8_e4m3fn tensor, by table look-up of its 256 bit patterns.

    Bit-identical to the cast (NaN patterns included) and several times faster on CPU, where the cast
    converts element by element; on other devices the cast is used.
    """
    if data.device.type != "cpu":
        return data.float()
    table = _E4M3_TABLES.get(data.device)
    if table is None:
        table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
        _E4M3_TABLES[data.device] = table
    codes = data.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return torch.index_select(table, 0, codes).view(data.shape)


def dequantize_tiles(data: Tensor, scale: Tensor, tile: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """``float(data) * scale`` of each element's tile (one fp32 multiply per element, whatever the path)."""
    *lead, rows, cols = data.shape
    values = e4m3_to_float(data)
    # A tile wider than its dimension is that dimension (one tile); otherwise the tiles must divide it
    # for the broadcast below, and an edge tile falls back to the expanded per-element scale.
    tr, tc = min(tile[0], rows), min(tile[1], cols)
    if rows and cols and rows % tr == 0 and cols % tc == 0:
        blocks = values.view(*lead, rows // tr, tr, cols // tc, tc)
        out = (blocks * scale.float().unsqueeze(-1).unsqueeze(-3)).view(*lead, rows, cols)
    else:
        out = values * expand_scale(scale, tile, rows, cols)
    return out.to(dtype)


def quantize_activation(x: Tensor, *, power_of_two: bool = False) -> FP8Tensor:
    """1x128 tiles along the last dimension (per token, per 128 channels): Fprop input, Dgrad dy."""
    return quantize_tiles(x, ACTIVATION_TILE, power_of_two=power_of_two)


def quantize_weight(w: Tensor, *, power_of_two: bool = False) -> FP8Tensor:
    """128x128 blocks of ``[out, in]`` (or stacked ``[E, out, in]``) weights."""
    return quantize_tiles(w, WEIGHT_TILE, power_of_two=power_of_two)


def quantize_for_wgrad(x: Tensor, *, power_of_two: bool = False) -> FP8Tensor:
    """128x1 tiles of a ``[tokens, channels]`` tensor: Wgrad contracts over tokens, so scales run along them.

    Quantizing the high-precision tensor directly in this tiling, rather than re-tiling the 1x128 copy,
    avoids a second rounding; both copies take one byte per element.
    """
    return quantize_tiles(x, WGRAD_TILE, power_of_two=power_of_two)


# ----------------------------------------------------------------------------- checkpoint convention
def quantize_weight_blockwise(w: Tensor, block_size: int = TILE) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3's FP8 checkpoint form of a ``[out, in]`` weight: ``(weight_fp8, weight_scale_inv)``.

    ``weight_scale_inv`` is fp32 ``[ceil(out/128), ceil(in/128)]`` and
    ``W[i, j] = float(weight_fp8[i, j]) * weight_scale_inv[i // 128, j // 128]``; edge blocks are partial.
    Scales are plain amax/448 (not powers of two), as in the released V3 weights.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    q = quantize_tiles(w, (block_size, block_size))
    return q.data, q.scale


def dequantize_weight_blockwise(
    w_fp8: Tensor, scale_inv: Tensor, dtype: torch.dtype = torch.bfloat16, block_size: int = TILE
) -> Tensor:
    """Inverse of `quantize_weight_blockwise`, and the reader for DeepSeek's ``*.weight_scale_inv`` pairs."""
    if w_fp8.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w_fp8.shape)}")
    expected = _scale_shape(w_fp8.shape, (block_size, block_size))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(w_fp8.shape)} weight with "
            f"{block_size}x{block_size} blocks needs {expected}"
        )
    return dequantize_tiles(w_fp8, scale_inv, (block_size, block_size), dtype)
