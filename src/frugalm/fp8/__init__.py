"""DeepSeek-V3's FP8 training recipe: tile-scaled E4M3 quantization, FP8 GEMM backends, FP8 linear layers.

Module map: `quantize` (E4M3 tiles and the checkpoint's block form), `backends` (three GEMMs, one
numerics contract, run-time choice), `linear` (autograd Functions, `FP8Linear`, grouped expert GEMM),
`config` (`FP8Config`, the ``[fp8]`` section), `apply` (`apply_fp8`), `error_bounds` and `synthetic`
(what tests and benchmarks measure against).
"""

from frugalm.fp8.apply import FP8Plan, apply_fp8, plan_fp8
from frugalm.fp8.backends import BACKEND_NAMES, BackendUnavailable, select_backend
from frugalm.fp8.config import FP8Config
from frugalm.fp8.linear import FP8GroupedLinear, FP8Linear, fp8_grouped_linear, fp8_linear
from frugalm.fp8.quantize import (
    FP8Tensor,
    dequantize_weight_blockwise,
    quantize_activation,
    quantize_for_wgrad,
    quantize_tiles,
    quantize_weight,
    quantize_weight_blockwise,
)

__all__ = [
    "BACKEND_NAMES", "BackendUnavailable", "FP8Config", "FP8GroupedLinear", "FP8Linear", "FP8Plan",
    "FP8Tensor", "apply_fp8", "dequantize_weight_blockwise", "fp8_grouped_linear", "fp8_linear",
    "plan_fp8", "quantize_activation", "quantize_for_wgrad", "quantize_tiles", "quantize_weight",
    "quantize_weight_blockwise", "select_backend",
]
