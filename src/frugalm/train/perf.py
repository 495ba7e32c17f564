"""Throughput accounting: this device's measured matmul peak and MFU (FLOPs/token: `frugalm.plan.flops`).

MFU here is "model FLOPs utilisation against what this device actually reaches on a large dense
matmul" rather than against a datasheet number: a laptop CPU or an unknown accelerator has no
reliable datasheet peak, and a measured one keeps the figure comparable across machines. It is
measured once per device/dtype and cached in the run folder (``peak_flops.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


PEAK_FILE = "peak_flops.json"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, *, seconds: float = 0.5) -> float:
    """Best FLOP/s of repeated square matmuls (size by device kind) over about `seconds`."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocation
    _synchronize(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    reps = 1 if device.type == "cpu" else 10
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _synchronize(device)
        dt = time.perf_counter() - t0
        best = max(best, reps * 2 * n ** 3 / dt)
        if time.perf_counter() > deadline:
            return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"
    return str(device)


def peak_flops(device: torch.device, dtype: torch.dtype, cache_dir: str | Path) -> float:
    """Measured matmul peak of `device` in `dtype`, cached in ``cache_dir/peak_flops.json``."""
    path = Path(cache_dir) / PEAK_FILE
    key = f"{device_name(device)}|{str(dtype).removeprefix('torch.')}"
    cache: dict = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key not in cache:
        cache[key] = measure_matmul_flops(device, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return float(cache[key])
