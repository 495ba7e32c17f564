"""Forward+backward tokens/s and peak memory: frugalm's DeepSeekV3 vs transformers' DeepseekV3, same weights.

Both models are built from one config and share weights (ours is saved, transformers loads it); each
timing round runs both on the same batch, alternating, so machine noise hits both alike. MFU is
measured against this machine's own dense fp32 `torch.matmul` rate, taken in the same run.
Peak memory is measured per implementation in a fresh child process, on a steady-state fwd+bwd: the
peak of tensor bytes alive at once (profiler allocator events; the figure to compare) and the peak RSS
growth over a malloc_trim'ed baseline (what the process really took, allocator caching included).

    python benchmarks/model_vs_transformers.py [--rounds 5] [--batch 4] [--seq 256] [--clock cpu] [--compile]

On an accelerator (``--device cuda --dtype bfloat16``) both models hold weights in that dtype, MFU is taken
against a dense matmul in that dtype on that device, and peak memory is the device allocator's peak over
one fwd+bwd minus what was allocated before it (``torch.cuda.max_memory_allocated``), in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from frugalm.model.config import ModelConfig
from frugalm.model.transformer import DeepSeekV3

COMMON = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
    intermediate_size=1024, first_k_dense_replace=1, max_position_embeddings=1024, num_nextn_predict_layers=0,
)
CONFIGS = {
    # DeepSeek-shaped: many small routed experts, top-8, 2 shared, group-limited (8 groups, keep 4).
    "fine": dict(n_routed_experts=256, moe_intermediate_size=64, num_experts_per_tok=8, n_shared_experts=2,
                 n_group=8, topk_group=4),
    # Coarse: few large experts.
    "coarse": dict(n_routed_experts=32, moe_intermediate_size=256, num_experts_per_tok=4, n_shared_experts=1,
                   n_group=1, topk_group=1),
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**COMMON, **CONFIGS[name])


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs/token by the planner's op-by-op counter (GEMMs + causal attention core), MTP excluded."""
    from frugalm.plan.flops import flops_per_token as planner_flops

    return float(planner_flops(cfg, seq, training=True, include_mtp=False))


DEVICE = torch.device("cpu")
DTYPE = torch.float32


def _sync() -> None:
    from frugalm.train.perf import _synchronize

    _synchronize(DEVICE)


def matmul_rate(n: int = 2048, reps: int = 5, clock=time.perf_counter) -> float:
    if DEVICE.type != "cpu":
        from frugalm.train.perf import measure_matmul_flops

        return measure_matmul_flops(DEVICE, DTYPE, seconds=0.3)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = clock()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (clock() - t)


def expert_gemm_rate(cfg: ModelConfig, tokens: int, reps: int = 3, clock=time.perf_counter) -> float:
    """FLOP/s of the routed experts alone (grouped gate_up + down GEMMs, forward and backward) at this
    batch's rows per expert, with a balanced load: the ceiling the MoE layers' GEMMs can reach here."""
    from frugalm.model.moe import GroupedExperts

    E, K, d, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    experts = GroupedExperts(E, d, inter).to(DEVICE, DTYPE)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    counts = torch.full((E,), tokens * K // E)
    counts[: tokens * K - int(counts.sum())] += 1
    offs = counts.cumsum(0, dtype=torch.int32).to(DEVICE)
    x = torch.randn(tokens * K, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(tokens * K, d, device=DEVICE, dtype=DTYPE)
    best = float("inf")
    for i in range(reps + 1):
        _sync()
        t = clock()
        experts(x, offs).backward(dy)
        experts.gate_up_proj.grad = experts.down_proj.grad = x.grad = None
        _sync()
        if i:
            best = min(best, clock() - t)
    return 6 * tokens * K * 3 * d * inter / best


def build(name: str, impl: str, path: str):
    """Our model, or transformers' loaded from the same saved weights."""
    if impl == "frugalm":
        import frugalm

        return frugalm.from_pretrained(path, device=DEVICE, dtype=DTYPE).train()
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).to(DEVICE)
    m.train()
    if impl.startswith("hf-") and impl != "hf-default":
        if not hasattr(m, "set_experts_implementation"):
            raise NotImplementedError(f"transformers {transformers.__version__} cannot choose experts implementations")
        m.set_experts_implementation(impl[3:])
    return m


def step(model, ids: torch.Tensor) -> None:
    out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    logits.float().logsumexp(-1).mean().backward()
    for p in model.parameters():
        p.grad = None


def time_impls(models: dict, ids: torch.Tensor, rounds: int, clock=time.perf_counter) -> tuple[dict[str, float], float]:
    """Best-of-rounds tokens/s per implementation, and the best matmul rate seen between them."""
    for m in models.values():
        step(m, ids)  # warm-up
    best = {k: float("inf") for k in models}
    rate = 0.0
    for _ in range(rounds):
        rate = max(rate, matmul_rate(reps=2, clock=clock))
        for k, m in models.items():
            _sync()
            t = clock()
            step(m, ids)
            _sync()
            best[k] = min(best[k], clock() - t)
    return {k: ids.numel() / v for k, v in best.items()}, rate


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def live_tensor_peak(fn) -> float:
    """Peak bytes of tensors alive at once during fn(), from the profiler's CPU allocator events in time
    order (the CPU analogue of `torch.cuda.max_memory_allocated`; independent of what malloc keeps cached)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def child_memory(name: str, impl: str, path: str, batch: int, seq: int) -> None:
    """Peak memory of one steady-state fwd+bwd (gradients included) of the loaded model, two ways:
    tensors alive at once (profiler), and process RSS growth (Linux VmHWM reset via clear_refs) over a
    baseline taken after `malloc_trim`, so memory that glibc merely kept from the warm-up step is not
    mistaken for headroom (untrimmed, the baseline moved 60-150 MiB between identical runs)."""
    import ctypes
    import gc

    model = build(name, impl, path)
    ids = torch.randint(0, COMMON["vocab_size"], (batch, seq))
    step(model, ids)  # first step allocates lazily-created buffers; measure the steady state
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step(model, ids)
    rss = (_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"tensor_peak_mib": live_tensor_peak(lambda: step(model, ids)) / 2**20, "rss_peak_mib": rss}))


def device_peak_memory(model, ids: torch.Tensor) -> dict[str, float]:
    """Accelerator: the allocator's peak over one steady-state fwd+bwd, above what was allocated before."""
    step(model, ids)
    _sync()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    step(model, ids)
    _sync()
    peak = (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20
    return {"tensor_peak_mib": peak, "rss_peak_mib": float("nan")}


def peak_memory(name: str, impl: str, path: str, batch: int, seq: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, impl, path, str(batch), str(seq)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_impl(model, impl: str):
    """`--compile`: ours through frugalm.model.compile.compile_model, transformers' through torch.compile."""
    if impl == "frugalm":
        from frugalm.model.compile import compile_model

        return compile_model(model)
    return torch.compile(model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--configs", default="fine,coarse")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps and the matmul reference by wall clock, or by this process's CPU time "
                         "(with one thread: the wall time it would take if no other job took the core)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile'd frugalm and transformers (grouped_mm); compile time reported")
    ap.add_argument("--no-eager-hf", action="store_true", help="skip transformers' eager experts (slow on fine)")
    ap.add_argument("--device", default="cpu", help="torch device of both models (e.g. cuda)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE, DTYPE
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    if args.child:
        name, impl, path, b, s = args.child
        child_memory(name, impl, path, int(b), int(s))
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    from frugalm.train.perf import device_name

    print(f"machine: {device_name(DEVICE)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.dtype}, clock: {args.clock}")
    for name in args.configs.split(","):
        cfg = model_config(name)
        with tempfile.TemporaryDirectory() as path:
            DeepSeekV3(cfg).init_weights(0).save_pretrained(path)
            impls = ["frugalm", "hf-grouped_mm"] if args.no_eager_hf else ["frugalm", "hf-eager", "hf-grouped_mm"]
            models = {}
            for k in impls:
                try:
                    models[k] = build(name, k, path)
                except NotImplementedError as exc:  # older transformers: one experts path, its default
                    print(f"  {exc}; timing its default as hf-default")
                    models.setdefault("hf-default", build(name, "hf-default", path))
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq)).to(DEVICE)
            compile_s = {}
            if args.compile:
                for k in ("frugalm", "hf-grouped_mm"):
                    if k not in models:
                        continue
                    compiled = compile_impl(build(name, k, path), k)
                    t = time.perf_counter()
                    try:
                        step(compiled, ids)
                        step(compiled, ids)
                    except Exception as e:  # report, do not hide: the row is then missing
                        print(f"  compile of {k} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                        continue
                    compile_s[k + "+compile"] = time.perf_counter() - t
                    models[k + "+compile"] = compiled
            tps, rate = time_impls(models, ids, args.rounds, clock)
            hf_best = max((k for k in models if k.startswith("hf-") and "compile" not in k), key=lambda k: tps[k])
            if DEVICE.type == "cuda":
                mem = {k: device_peak_memory(models[k], ids) for k in ("frugalm", hf_best)}
            else:
                mem = {k: peak_memory(name, k, path, args.batch, args.seq) for k in ("frugalm", hf_best)}
            gemm = expert_gemm_rate(cfg, args.batch * args.seq, clock=clock)
        fpt = flops_per_token(cfg, args.seq)
        print(f"\n[{name}] {cfg.n_routed_experts} experts x {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}, "
              f"{cfg.n_shared_experts} shared, groups {cfg.n_group}/{cfg.topk_group}; batch {args.batch}x{args.seq}; "
              f"{fpt / 1e6:.1f} MFLOP/token; dense {args.dtype} matmul (best in run): {rate / 1e9:.1f} GFLOP/s")
        for k in models:
            mfu = tps[k] * fpt / rate
            extra = f"   (compile + 2 first steps: {compile_s[k]:.0f} s wall)" if k in compile_s else ""
            print(f"  {k:22s} {tps[k]:9.0f} tokens/s   {100 * mfu:5.1f}% of matmul rate{extra}")
        print(f"  speed-up frugalm / transformers ({hf_best}): {tps['frugalm'] / tps[hf_best]:.2f}x")
        if "frugalm+compile" in tps and "hf-grouped_mm+compile" in tps:
            print(f"  speed-up compiled frugalm / compiled transformers: "
                  f"{tps['frugalm+compile'] / tps['hf-grouped_mm+compile']:.2f}x")
        print(f"  routed-expert grouped GEMMs alone (fwd+bwd, balanced, {args.batch * args.seq * cfg.num_experts_per_tok // cfg.n_routed_experts} rows/expert): "
              f"{gemm / 1e9:.1f} GFLOP/s = {100 * gemm / rate:.0f}% of the matmul rate")
        for key, what in (("tensor_peak_mib", "tensors alive at once"), ("rss_peak_mib", "process RSS growth")):
            print(f"  peak memory fwd+bwd, {what}: frugalm {mem['frugalm'][key]:.0f} MiB, "
                  f"transformers {mem[hf_best][key]:.0f} MiB ({mem[hf_best][key] / max(mem['frugalm'][key], 1e-9):.2f}x)")


if __name__ == "__main__":
    main()
