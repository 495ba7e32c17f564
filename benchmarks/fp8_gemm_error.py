"""GEMM-level error of the FP8 linear vs FP32, per backend, and the memory FP8 saves vs BF16.

For one Linear ``y = x W^T`` on synthetic tensors with transformer-like statistics (outlier channels,
heavy tails, per-token magnitude spread; tiny, wide-range gradients -- `frugalm.fp8.synthetic`) it
reports, for Fprop, Dgrad and Wgrad:

* the relative error ``||C - C_ref|| / ||C_ref||`` against an FP64 product of the unquantized inputs,
  for every FP8 backend this machine can run (the real autograd path, `fp8_linear`);
* the largest fraction of the worst-case bound (`frugalm.fp8.error_bounds.gemm_error_bound`) used;
* reference points computed with the same emulated GEMM: BF16 operands, E4M3 with one scale per
  tensor, and E4M3 with 128x128 blocks for activations/gradients too (what DeepSeek found diverges for
  activation gradients).

Memory is measured, not computed: bytes saved for backward by one layer (autograd saved-tensor hooks)
and bytes of the weight operand the GEMMs read, FP8 vs BF16, plus AdamW's FP32 state per parameter.
With ``--time`` it also times forward+backward per backend against an FP32 ``nn.Linear``.

    python benchmarks/fp8_gemm_error.py [--tokens 2048] [--in-features 1024] [--out-features 1024]
        [--seed 0] [--time] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable

import torch
from torch import Tensor, nn

from frugalm.fp8.backends import BACKEND_NAMES, EmulatedGemm, unavailable_reason
from frugalm.fp8.error_bounds import gemm_error_bound
from frugalm.fp8.linear import FP8Linear, fp8_linear
from frugalm.fp8.quantize import (
    FP8Tensor,
    quantize_activation,
    quantize_for_wgrad,
    quantize_tiles,
    quantize_weight,
)
from frugalm.fp8.synthetic import activations_with_outliers, gradients_like, weights_like

GEMMS = ("fprop", "dgrad", "wgrad")


def _rel(got: Tensor, ref: Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def _worst_row(got: Tensor, ref: Tensor) -> float:
    """Largest per-row relative error: rows are tokens for Fprop/Dgrad, so this is the worst-served
    token, which a Frobenius norm dominated by large tokens hides."""
    rows = (got.double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    return rows.max().item()


def _errors(got: dict[str, Tensor], refs: dict[str, Tensor]) -> dict[str, float]:
    out = {f"{g}_rel": _rel(got[g], refs[g]) for g in GEMMS}
    out.update({f"{g}_worst_row": _worst_row(got[g], refs[g]) for g in GEMMS})
    return out


def references(x: Tensor, w: Tensor, dy: Tensor) -> dict[str, Tensor]:
    xd, wd, dyd = x.double(), w.double(), dy.double()
    return {"fprop": xd @ wd.t(), "dgrad": dyd @ wd, "wgrad": dyd.t() @ xd}


def fp8_backend_errors(backend: str, x: Tensor, w: Tensor, dy: Tensor, refs: dict[str, Tensor],
                       with_bound: bool) -> dict[str, float]:
    """Run the real FP8 autograd path and compare its three outputs with FP64."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr, backend=backend)
    y.backward(dy)
    got = {"fprop": y.detach(), "dgrad": xr.grad, "wgrad": wr.grad}
    out = _errors(got, refs)
    if with_bound:
        operands = {
            "fprop": (x, quantize_activation(x), w, quantize_weight(w)),
            "dgrad": (dy, quantize_activation(dy), w.t(), quantize_weight(w).t()),
            "wgrad": (dy.t(), quantize_for_wgrad(dy).t(), x.t(), quantize_for_wgrad(x).t()),
        }
        for g, (a, a_q, b, b_q) in operands.items():
            bound = gemm_error_bound(a, a_q, b, b_q)
            out[f"{g}_bound_used"] = ((got[g].double() - refs[g]).abs() / bound).max().item()
    return out


def variant_errors(quant: Callable[[Tensor, str], FP8Tensor], x: Tensor, w: Tensor, dy: Tensor,
                   refs: dict[str, Tensor]) -> dict[str, float]:
    """Errors of an alternative quantization scheme; ``quant(t, role)`` with role act|weight|wgrad."""
    gemm = EmulatedGemm()
    wq = quant(w, "weight")
    got = {
        "fprop": gemm.gemm(quant(x, "act"), wq, torch.float32),
        "dgrad": gemm.gemm(quant(dy, "act"), wq.t(), torch.float32),
        "wgrad": gemm.gemm(quant(dy, "wgrad").t(), quant(x, "wgrad").t(), torch.float32),
    }
    return _errors(got, refs)


def bf16_errors(x: Tensor, w: Tensor, dy: Tensor, refs: dict[str, Tensor]) -> dict[str, float]:
    """BF16 operands with FP32 accumulation (what a BF16 mixed-precision Linear computes)."""
    xb, wb, dyb = (t.to(torch.bfloat16).float() for t in (x, w, dy))
    got = {"fprop": xb @ wb.t(), "dgrad": dyb @ wb, "wgrad": dyb.t() @ xb}
    return _errors(got, refs)


def _per_tensor(t: Tensor, role: str) -> FP8Tensor:
    return quantize_tiles(t, tuple(t.shape))


def _blocks_everywhere(t: Tensor, role: str) -> FP8Tensor:
    return quantize_tiles(t, (128, 128))


def _recipe_pow2(t: Tensor, role: str) -> FP8Tensor:
    tile = {"act": (1, 128), "weight": (128, 128), "wgrad": (128, 1)}[role]
    return quantize_tiles(t, tile, power_of_two=True)


def saved_bytes(layer: nn.Module, x: Tensor, weight_shapes: set[tuple[int, ...]]) -> dict[str, int]:
    """Bytes autograd saves for backward in one forward, split into weight-derived and activation tensors."""
    split = {"activation": 0, "weight": 0}

    def pack(t: Tensor) -> Tensor:
        split["weight" if tuple(t.shape) in weight_shapes else "activation"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return split


def memory_report(tokens: int, d_in: int, d_out: int) -> dict[str, object]:
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    bf16_layer = nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16)
    fp8_layer = FP8Linear(d_in, d_out, bias=False)
    w = fp8_layer.weight.detach()
    wq = quantize_weight(w)
    weight_shapes = {tuple(w.shape), tuple(w.t().shape), tuple(wq.scale.shape)}  # aten saves W or W^T
    xq = quantize_for_wgrad(x.detach())
    params = nn.Linear(d_in, d_out, bias=False)
    opt = torch.optim.AdamW(params.parameters())
    params(torch.randn(4, d_in)).sum().backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    n = w.numel()
    return {
        # nn.Linear saves a reference to its BF16 parameter (no new memory); FP8Linear saves a new FP8 copy.
        "saved_bf16_linear": saved_bytes(bf16_layer, x, weight_shapes),
        "saved_fp8_linear": saved_bytes(fp8_layer, x, weight_shapes),
        "activation_bytes_per_element_fp8": xq.nbytes / x.numel(),
        "activation_bytes_per_element_bf16": 2.0,
        "weight_operand_bytes_per_param_fp8": wq.nbytes / n,
        "weight_operand_bytes_per_param_bf16": 2.0,
        "adamw_fp32_state_bytes_per_param": state_bytes / n,
    }


def time_backends(backends: list[str], x: Tensor, w: Tensor, dy: Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one forward+backward, FP8 backends and an FP32 reference."""
    def run(fn: Callable[[Tensor, Tensor], Tensor]) -> float:
        times = []
        for _ in range(repeats + 1):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(xr, wr).backward(dy)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2]

    out = {"fp32 nn.functional.linear": run(lambda a, b: nn.functional.linear(a, b))}
    for name in backends:
        out[f"fp8 {name}"] = run(lambda a, b, n=name: fp8_linear(a, b, backend=n))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--in-features", type=int, default=1024)
    p.add_argument("--out-features", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", action="store_true", help="also time forward+backward per backend")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=str, default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)

    m, k, n = args.tokens, args.in_features, args.out_features
    x = activations_with_outliers(m, k, seed=args.seed)
    w = weights_like(n, k, seed=args.seed + 1)
    dy = gradients_like(m, n, seed=args.seed + 2)
    refs = references(x, w, dy)
    device = torch.device("cpu")
    runnable = [b for b in BACKEND_NAMES if b != "auto" and unavailable_reason(b, device) is None]
    skipped = {b: unavailable_reason(b, device) for b in BACKEND_NAMES if b not in ("auto", *runnable)}

    rows: dict[str, dict[str, float]] = {}
    for i, b in enumerate(runnable):
        rows[f"FP8 recipe, backend={b}"] = fp8_backend_errors(b, x, w, dy, refs, with_bound=(i == 0))
    rows["FP8 recipe, power-of-two scales (emulated)"] = variant_errors(_recipe_pow2, x, w, dy, refs)
    rows["FP8, 128x128 blocks for activations and gradients too"] = variant_errors(_blocks_everywhere, x, w, dy, refs)
    rows["FP8, one scale per tensor"] = variant_errors(_per_tensor, x, w, dy, refs)
    rows["BF16 operands, FP32 accumulation"] = bf16_errors(x, w, dy, refs)

    result: dict[str, object] = {
        "shape": {"tokens": m, "in": k, "out": n},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "unavailable_backends": skipped,
        "errors": rows,
        "memory": memory_report(m, k, n),
    }
    if args.time:
        result["seconds_fwd_bwd"] = time_backends(runnable, x, w, dy, args.repeats)

    print(f"# FP8 GEMM error, x[{m}x{k}] W[{n}x{k}] ({result['machine']})\n")
    print("Relative error ||C - C_fp64|| / ||C_fp64|| (and, in brackets, of the worst row)\n")
    print("| scheme | Fprop | Dgrad | Wgrad |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        cells = " | ".join(f"{r[f'{g}_rel']:.4f} ({r[f'{g}_worst_row']:.3f})" for g in GEMMS)
        print(f"| {name} | {cells} |")
    first = rows[f"FP8 recipe, backend={runnable[0]}"]
    print(f"\nLargest fraction of the worst-case elementwise bound used ({runnable[0]}): "
          + ", ".join(f"{g} {first[f'{g}_bound_used']:.3f}" for g in GEMMS))
    for b, why in skipped.items():
        print(f"backend {b}: not run ({why})")
    mem = result["memory"]
    print("\n| memory | FP8 | BF16 |\n|---|---|---|")
    print(f"| saved for backward, input activation (bytes) | {mem['saved_fp8_linear']['activation']} "
          f"| {mem['saved_bf16_linear']['activation']} |")
    print(f"| saved for backward, weight (bytes) | {mem['saved_fp8_linear']['weight']} (new FP8 copy) "
          f"| {mem['saved_bf16_linear']['weight']} (the BF16 parameter itself) |")
    print(f"| saved activation, bytes/element | {mem['activation_bytes_per_element_fp8']:.4f} "
          f"| {mem['activation_bytes_per_element_bf16']:.1f} |")
    print(f"| GEMM weight operand, bytes/param | {mem['weight_operand_bytes_per_param_fp8']:.5f} "
          f"| {mem['weight_operand_bytes_per_param_bf16']:.1f} |")
    print(f"\ntorch.optim.AdamW state on FP32 parameters: {mem['adamw_fp32_state_bytes_per_param']:.1f} bytes/param")
    if args.time:
        print("\n| fwd+bwd | seconds |\n|---|---|")
        for name, s in result["seconds_fwd_bwd"].items():
            print(f"| {name} | {s:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
