"""FP8 GEMM and FP8 linear speed vs BF16 on one device: square 4096^3 and MoE expert shapes.

Issue 4 asks for FP8 GEMM TFLOP/s against BF16 ``torch.matmul`` at 4096^3 and on MoE expert shapes, with
the goal FP8 >= 1.6x BF16 (an H100/H200 figure; the block-wise backend exists only there). For each shape
``[M, K] x [N, K]^T`` this times, with the same inputs:

* ``bf16``: ``a @ w.T`` in BF16 (cuBLAS on GPU);
* ``fp8 tensorwise``: ``torch._scaled_mm`` with one scale per tensor -- the hardware's plain FP8 rate, the
  ceiling a block-scaled GEMM can approach (no fine-grained scaling, so not DeepSeek's recipe);
* ``fp8 gemm``: our backend's block-scaled GEMM (1x128 activations x 128x128 weights) on operands quantized
  beforehand -- the GEMM alone;
* quantization alone (the default path -- one fused compiled kernel on CUDA -- and the eager one): what
  every FP8 GEMM in training pays on top, since DeepSeek's scaling is online (activations every call, weights
  every step);
* ``fp8_linear`` forward+backward (three FP8 GEMMs + their quantizations, as the trainer runs them) vs a
  BF16 ``F.linear`` forward+backward.

Grouped MoE shapes time our FP8 grouped expert linear against BF16 ``torch._grouped_mm`` (when present).
Times are medians over ``--iters`` calls after a warm-up, on device (CUDA events through
``triton.testing.do_bench`` where Triton is installed; it flushes L2 between calls), else wall clock after a
synchronize. Ratios are taken in one process on one device. Prints a table and writes ``--json``.

    python benchmarks/fp8_gemm_speed.py --device cuda --json runs/fp8_gemm_speed.json
    python benchmarks/fp8_gemm_speed.py --device cpu --shapes 256x512x512 --grouped 4x64x256x512  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from frugalm.fp8.backends import select_backend
from frugalm.fp8.linear import fp8_grouped_linear, fp8_linear
from frugalm.fp8.quantize import quantize_activation, quantize_for_wgrad, quantize_tiles, quantize_weight
from frugalm.train.perf import _synchronize, device_name

# 4096^3 as the issue names it; DeepSeek-V3's expert shapes (hidden 7168, expert width 2048): gate/up
# (K = 7168 -> N = 2048) and down (K = 2048 -> N = 7168) at 4096 and 1024 tokens per expert.
DEFAULT_SHAPES = "4096x4096x4096,4096x7168x2048,4096x2048x7168,1024x7168x2048,1024x2048x7168,8192x8192x8192"
# Grouped: experts x tokens-per-expert x K x N.
DEFAULT_GROUPED = "8x512x7168x2048,8x512x2048x7168,32x256x2048x1024"


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of ``fn`` on ``device``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn, iters: do_bench(fn, warmup=25, rep=max(50, iters), return_mode="median") / 1e3
        except ImportError:
            pass

    def wall(fn: Callable[[], object], iters: int) -> float:
        fn()
        _synchronize(device)
        times = []
        for _ in range(max(3, min(iters, 20))):
            t0 = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return wall


def _parse(spec: str, n: int) -> list[tuple[int, ...]]:
    out = []
    for item in filter(None, spec.split(",")):
        dims = tuple(int(d) for d in item.lower().split("x"))
        if len(dims) != n:
            raise SystemExit(f"shape {item!r} needs {n} numbers separated by 'x'")
        out.append(dims)
    return out


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_dense(m: int, k: int, n: int, device: torch.device, backend, time_fn, iters: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(m + 7 * k + 13 * n)
    a32 = torch.randn(m, k, generator=g).to(device)
    w32 = (torch.randn(n, k, generator=g) / k ** 0.5).to(device)
    a, w = a32.bfloat16(), w32.bfloat16()
    flops = 2 * m * n * k
    row: dict = {"shape": f"{m}x{k}x{n}", "M": m, "K": k, "N": n}

    row["bf16_s"] = time_fn(lambda: torch.matmul(a, w.t()), iters)
    if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        row["fp8_tensorwise_s"] = time_fn(
            lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), iters)
    aq, wq = quantize_activation(a), quantize_weight(w)
    row["fp8_gemm_s"] = time_fn(lambda: backend.gemm(aq, wq, torch.bfloat16), iters)
    row["fp8_gemm_rel_err_vs_fp32"] = _rel(backend.gemm(aq, wq, torch.float32), a32 @ w32.t())
    row["bf16_rel_err_vs_fp32"] = _rel((a @ w.t()).float(), a32 @ w32.t())
    # Default path (fused into one compiled kernel on CUDA; compiled outside the timing) and the eager one.
    quantizers = (("act", quantize_activation, a), ("weight", quantize_weight, w), ("wgrad", quantize_for_wgrad, a))
    for name, fn, x in quantizers:
        fn(x)
        row[f"quantize_{name}_s"] = time_fn(lambda: fn(x), iters)
    row["quantize_act_eager_s"] = time_fn(lambda: quantize_tiles(a, (1, 128), fused=False), iters)
    row["quantize_weight_eager_s"] = time_fn(lambda: quantize_tiles(w, (128, 128), fused=False), iters)

    # Training-shaped: forward + backward with fresh gradients each call (BF16 autocast-like dtypes).
    xa = a.clone().requires_grad_(True)
    wa = w32.clone().requires_grad_(True)  # FP32 master weight, as the trainer holds it
    dy = torch.randn(m, n, generator=g).to(device).bfloat16()

    def bf16_fb() -> None:
        y = F.linear(xa, wa.bfloat16())
        xa.grad = wa.grad = None
        y.backward(dy)

    def fp8_fb() -> None:
        y = fp8_linear(xa, wa, backend=backend)
        xa.grad = wa.grad = None
        y.backward(dy)

    row["bf16_linear_fwd_bwd_s"] = time_fn(bf16_fb, iters)
    row["fp8_linear_fwd_bwd_s"] = time_fn(fp8_fb, iters)
    row["bf16_tflops"] = flops / row["bf16_s"] / 1e12
    row["fp8_gemm_tflops"] = flops / row["fp8_gemm_s"] / 1e12
    row["fp8_gemm_vs_bf16"] = row["bf16_s"] / row["fp8_gemm_s"]
    if "fp8_tensorwise_s" in row:
        row["fp8_tensorwise_tflops"] = flops / row["fp8_tensorwise_s"] / 1e12
        row["fp8_tensorwise_vs_bf16"] = row["bf16_s"] / row["fp8_tensorwise_s"]
    row["fp8_quant_plus_gemm_vs_bf16"] = row["bf16_s"] / (row["fp8_gemm_s"] + row["quantize_act_s"])
    row["fp8_linear_fwd_bwd_vs_bf16"] = row["bf16_linear_fwd_bwd_s"] / row["fp8_linear_fwd_bwd_s"]
    return row


def bench_grouped(e: int, rows: int, k: int, n: int, device: torch.device, backend, time_fn, iters: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(e + rows + k + n)
    x = torch.randn(e * rows, k, generator=g).to(device).bfloat16()
    w32 = (torch.randn(e, n, k, generator=g) / k ** 0.5).to(device)
    w = w32.bfloat16()
    offs = torch.arange(1, e + 1, device=device, dtype=torch.int32) * rows
    flops = 2 * e * rows * n * k
    row: dict = {"shape": f"{e}x{rows}x{k}x{n}", "experts": e, "rows_per_expert": rows, "K": k, "N": n}
    if hasattr(torch, "_grouped_mm"):
        try:
            row["bf16_grouped_s"] = time_fn(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs), iters)
        except RuntimeError as exc:  # e.g. a build without the grouped kernel for this device/dtype
            row["bf16_grouped_error"] = str(exc).splitlines()[0]
    row["bf16_loop_s"] = time_fn(lambda: [x[i * rows:(i + 1) * rows] @ w[i].t() for i in range(e)], iters)
    row["fp8_grouped_fwd_s"] = time_fn(lambda: fp8_grouped_linear(x, w32, offs, backend=backend), iters)
    xa = x.clone().requires_grad_(True)
    wa = w32.clone().requires_grad_(True)
    dy = torch.randn(e * rows, n, generator=g).to(device).bfloat16()

    def fp8_fb() -> None:
        y = fp8_grouped_linear(xa, wa, offs, backend=backend)
        xa.grad = wa.grad = None
        y.backward(dy)

    row["fp8_grouped_fwd_bwd_s"] = time_fn(fp8_fb, iters)
    if "bf16_grouped_s" in row:
        def bf16_fb() -> None:
            y = torch._grouped_mm(xa, wa.bfloat16().transpose(1, 2), offs=offs)
            xa.grad = wa.grad = None
            y.backward(dy)

        row["bf16_grouped_fwd_bwd_s"] = time_fn(bf16_fb, iters)
        row["fp8_fwd_bwd_vs_bf16_grouped"] = row["bf16_grouped_fwd_bwd_s"] / row["fp8_grouped_fwd_bwd_s"]
        row["fp8_fwd_vs_bf16_grouped"] = row["bf16_grouped_s"] / row["fp8_grouped_fwd_s"]
        row["bf16_grouped_tflops"] = flops / row["bf16_grouped_s"] / 1e12
    row["fp8_grouped_fwd_tflops"] = flops / row["fp8_grouped_fwd_s"] / 1e12
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", help="FP8 GEMM backend (auto: block-wise on H100/H200)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of MxKxN")
    ap.add_argument("--grouped", default=DEFAULT_GROUPED, help="comma list of ExRxKxN (experts x rows x K x N)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    backend = select_backend(args.backend, device)
    time_fn = _timer(device)
    report = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "backend": backend.name, "dense": [], "grouped": []}
    print(f"device {report['device']}  torch {torch.__version__}  cuda {torch.version.cuda}  backend {backend.name}",
          flush=True)
    for m, k, n in _parse(args.shapes, 3):
        row = bench_dense(m, k, n, device, backend, time_fn, args.iters)
        report["dense"].append(row)
        print(json.dumps(row), flush=True)
    for e, r, k, n in _parse(args.grouped, 4):
        row = bench_grouped(e, r, k, n, device, backend, time_fn, args.iters)
        report["grouped"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    print(f"\n{'shape MxKxN':>18} {'bf16 TF/s':>9} {'fp8 TF/s':>9} {'x bf16':>7} {'tensorwise':>10} "
          f"{'q+gemm':>7} {'q_act ms':>8} {'eager ms':>8} {'lin f+b':>8}")
    for r in report["dense"]:
        tw = f"{r['fp8_tensorwise_vs_bf16']:.2f}x" if "fp8_tensorwise_vs_bf16" in r else "-"
        print(f"{r['shape']:>18} {r['bf16_tflops']:9.1f} {r['fp8_gemm_tflops']:9.1f} {r['fp8_gemm_vs_bf16']:6.2f}x "
              f"{tw:>10} {r['fp8_quant_plus_gemm_vs_bf16']:6.2f}x {1e3 * r['quantize_act_s']:8.3f} "
              f"{1e3 * r['quantize_act_eager_s']:8.3f} "
              f"{r['fp8_linear_fwd_bwd_vs_bf16']:7.2f}x")
    for r in report["grouped"]:
        ratio = f"{r['fp8_fwd_bwd_vs_bf16_grouped']:.2f}x" if "fp8_fwd_bwd_vs_bf16_grouped" in r else "-"
        print(f"grouped {r['shape']:>18}: fp8 fwd {r['fp8_grouped_fwd_tflops']:.1f} TF/s, fwd+bwd vs bf16 "
              f"_grouped_mm {ratio}")


if __name__ == "__main__":
    main()
