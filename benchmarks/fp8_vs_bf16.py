"""FP8 vs BF16 training (DeepSeek-V3 §3.3): the same config, seed and data trained with FP8 GEMMs and with
plain BF16 autocast; the relative gap of the final validation loss, and both curves in one PNG.

Runs (each with the trainer's Python API, `frugalm.train.trainer.Trainer`, into ``OUT/<name>``; curves are
read back from ``OUT/<name>/metrics.jsonl``):

* ``bf16``: ``train.precision = "bf16"`` (autocast; FP32 master weights and FP32 AdamW moments);
* ``fp8``: the same plus ``[fp8] enabled = true``: every linear except embedding, head, router and norms
  runs DeepSeek's block-scaled E4M3 GEMMs (backend ``emulated`` by default on CPU: the same numbers as the
  K-sliced real FP8 GEMMs, faster here, see `frugalm.fp8.backends`); the rest runs under BF16 autocast,
  as in DeepSeek's recipe;
* ``bf16_seed2``: BF16 with the weights initialised from another seed (``--init-seed-b``) but the same
  data order (the trainer's seed also drives the sampler, so only ``model.init_weights`` is re-run): the
  seed-noise yardstick the FP8 gap has to be read against;
* optional ``fp8_seed2`` (FP8 from the other initial weights: is the FP8 gap the same at another seed?),
  ``fp32``, ``fp8_fp32`` (FP8 GEMMs, everything else FP32), ``fp32_seed2`` and ``fp8_fp32_seed2``;
* ablations with FP32 elsewhere, keeping some GEMMs out of FP8 (``fp8.gemms``): ``fp8_fp32_fprop``,
  ``fp8_fp32_fprop_dgrad``, ``fp8_fp32_dgrad``, ``fp8_fp32_wgrad`` (+ ``_seed2`` of fprop and wgrad), and the
  control ``fp8_fp32_none`` (FP8 layers with no FP8 GEMM). Each FP8 run is compared with its own base
  (``fp32``/``bf16`` at the same init seed).

For each run it reports the final val loss and whether the loss flattened: the least-squares slope of the
val loss over the last 20% of steps, as the change it implies over that window relative to the final loss.

``--activation-memory`` measures the bytes of tensors saved for backward in one forward of the model
(autograd saved-tensor hooks, unique storages, parameters themselves not counted) with FP8 vs BF16;
``--memory`` the optimizer's bytes per parameter (FP32 master + FP32 vs BF16 moments). ``--grad-error CKPT``
measures, without training, how far the FP8 loss, full gradient and MoE routing land from FP32's on a
trained checkpoint, per selection of FP8 GEMMs and per part of the model (`gradient_error`).

    python benchmarks/fp8_vs_bf16.py [--config tiny] [--set train.max_steps=400] [--runs fp8,bf16,bf16_seed2]
        [--out runs/fp8_vs_bf16] [--figure benchmarks/figures/fp8_vs_bf16.png] [--memory]
        [--activation-memory] [--check-resume STEPS] [--grad-error runs/.../fp32/final]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The embedded tiny config shrunk so that each BF16 run flattens in ~15-20 minutes on one shared CPU thread
# (BF16 GEMMs on an AVX2-only CPU run ~50-100x slower than FP32 ones, so the lm_head/vocab is cut to 512):
# d=64, 3 layers (1 dense + 2 MoE with 8 routed experts, top-2, 1 shared), no MTP, 400 steps x 8 x 128
# tokens (~0.41M, ~0.4 epoch of the 1.06M-token python-docs train split), cosine to 0.1x. Any of these can
# be overridden with --set.
DEFAULT_OVERRIDES = [
    "data.vocab_size=512", "model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=3",
    "model.intermediate_size=192", "model.moe_intermediate_size=32", "model.n_routed_experts=8",
    "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.num_nextn_predict_layers=0",
    "train.max_steps=400", "train.batch_size=8", "train.seq_len=128", "train.warmup_steps=20",
    "train.eval_every=20", "train.eval_batches=8", "train.log_every=10", "train.checkpoint_every=0",
    "train.sample_tokens=0", "train.num_threads=1",
]

# name -> (overrides, re-initialise weights with --init-seed-b)
VARIANTS = {
    "bf16": (["train.precision=bf16"], False),
    "fp8": (["train.precision=bf16", "fp8.enabled=true"], False),
    "bf16_seed2": (["train.precision=bf16"], True),
    "fp8_seed2": (["train.precision=bf16", "fp8.enabled=true"], True),
    "fp32": (["train.precision=fp32"], False),
    "fp8_fp32": (["train.precision=fp32", "fp8.enabled=true"], False),
    "fp32_seed2": (["train.precision=fp32"], True),
    "fp8_fp32_seed2": (["train.precision=fp32", "fp8.enabled=true"], True),
    # Ablations of which GEMMs take FP8 operands (`fp8.gemms`; the others run in FP32), FP32 elsewhere.
    "fp8_fp32_fprop": (["train.precision=fp32", "fp8.enabled=true", 'fp8.gemms=["fprop"]'], False),
    "fp8_fp32_fprop_dgrad": (["train.precision=fp32", "fp8.enabled=true", 'fp8.gemms=["fprop","dgrad"]'], False),
    "fp8_fp32_dgrad": (["train.precision=fp32", "fp8.enabled=true", 'fp8.gemms=["dgrad"]'], False),
    "fp8_fp32_wgrad": (["train.precision=fp32", "fp8.enabled=true", 'fp8.gemms=["wgrad"]'], False),
    "fp8_fp32_fprop_seed2": (["train.precision=fp32", "fp8.enabled=true", 'fp8.gemms=["fprop"]'], True),
    "fp8_fp32_wgrad_seed2": (["train.precision=fp32", "fp8.enabled=true", 'fp8.gemms=["wgrad"]'], True),
    # Control: the FP8 layers' code path with no FP8 GEMM; must track fp32 up to summation order.
    "fp8_fp32_none": (["train.precision=fp32", "fp8.enabled=true", "fp8.gemms=[]"], False),
}


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> train loss, step -> val loss) from a run's metrics.jsonl."""
    from frugalm.plan.calibrate import read_metrics as read_jsonl

    train, val = {}, {}
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if "loss" in rec:
            train[int(rec["step"])] = float(rec["loss"])
        if "val_loss" in rec:
            val[int(rec["step"])] = float(rec["val_loss"])
    return train, val


def optimizer_bytes_per_param(cfg) -> dict[str, float]:
    """Bytes per trainable parameter of weights + AdamW state after one optimizer step of `cfg` (FP32
    parameters are their own master copy, so ``master`` is 0 unless the model holds low-precision weights)."""
    import tempfile

    from frugalm.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp, progress=False, log_fn=lambda m: None)
        _seed_peak_flops(tr)
        tr.train_step()
        n = sum(p.numel() for p in tr.params)
        weights = sum(p.numel() * p.element_size() for p in tr.params)
        state = {"exp_avg": 0, "exp_avg_sq": 0, "master": 0}
        for st in tr.optimizer.state.values():
            for k in state:
                if k in st:
                    state[k] += st[k].numel() * st[k].element_size()
    out = {"params": n, "weights": weights / n, "master": state["master"] / n,
           "moments": (state["exp_avg"] + state["exp_avg_sq"]) / n}
    # Gradients (4 B/param while they live) are not counted: the trainer frees them after the step.
    out["total"] = out["weights"] + out["master"] + out["moments"]
    return out


def check_resume(cfg, out: Path, steps: int) -> dict:
    """An FP8 run stopped at steps//2 and resumed must match the uninterrupted run bit for bit."""
    import dataclasses

    from frugalm.train.trainer import Trainer

    tc = dataclasses.replace(cfg.train, max_steps=steps, eval_every=steps, log_every=1)
    cfg = dataclasses.replace(cfg, train=tc)

    def trainer(name: str, **kw):
        tr = Trainer(cfg, out / name, progress=False, **kw)
        _seed_peak_flops(tr)
        return tr

    a = trainer("resume_ref", overwrite=True).fit()
    trainer("resume_cut", overwrite=True).fit(stop_after=steps // 2)
    b = trainer("resume_cut", resume=True).fit()
    la, _ = read_metrics(out / "resume_ref")
    lb, _ = read_metrics(out / "resume_cut")
    same = [s for s in la if s > steps // 2 and s in lb]
    return {"steps": steps, "stop_at": steps // 2, "compared_steps": len(same),
            "max_abs_train_loss_diff": max(abs(la[s] - lb[s]) for s in same) if same else None,
            "val_ref": a.final_val_loss, "val_resumed": b.final_val_loss,
            "bit_exact": all(la[s] == lb[s] for s in same) and a.final_val_loss == b.final_val_loss}


def check_from_pretrained(run_dir: Path, cfg) -> dict:
    """Load OUT/final with frugalm.from_pretrained and score the first val batches in FP32."""
    import torch
    import torch.nn.functional as F

    import frugalm
    from frugalm.data.prepare import prepare_data

    model = frugalm.from_pretrained(run_dir / "final")
    model.eval()
    data = prepare_data(cfg.data, None, progress=False)
    tot, n = 0.0, 0
    with torch.no_grad():
        for batch in data.val_batches(cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches):
            out = model(batch[:, :-1])
            logits = out if torch.is_tensor(out) else (out.logits if hasattr(out, "logits") else out[0])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            tot += float(loss)
            n += batch[:, 1:].numel()
    return {"params": sum(p.numel() for p in model.parameters()), "val_loss_fp32_reload": tot / n}


def gradient_error(ckpt: Path, cfg) -> dict:
    """Per-GEMM ablation without training: on a trained checkpoint, how far the FP8 model's loss and full
    gradient land from FP32's, keeping some of Fprop/Dgrad/Wgrad out of FP8 (``fp8.gemms``).

    For each variant and each of the ``train.eval_batches`` val batches (batch_size x seq_len tokens) it takes the
    gradient of the main next-token CE of every parameter and reports, against the FP32 gradient of the same
    batch: ``rel_err`` = mean over batches of ||g - g32|| / ||g32||; ``cos`` = mean cosine similarity;
    ``coherence`` = ||mean over batches of (g - g32)|| * sqrt(n) / rms over batches of ||g - g32|| (n =
    ``train.eval_batches``): about 1 if the error is independent from batch to batch (it averages out
    over steps like gradient noise), up to sqrt(n) if it points the same way every batch (a bias); ``loss_rel`` = mean (loss - loss32) / loss32. BF16 autocast is measured the same way
    as the yardstick of what a BF16 run already tolerates.
    """
    import dataclasses

    import torch
    import torch.nn.functional as F

    import frugalm
    from frugalm.data.prepare import prepare_data
    from frugalm.fp8 import apply_fp8

    data = prepare_data(cfg.data, None, progress=False)
    batches = list(data.val_batches(cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches))

    def grads(gemms, autocast: bool = False, include=("*",)):
        model = frugalm.from_pretrained(ckpt)
        model.train()
        if gemms is not None:
            model = apply_fp8(model, dataclasses.replace(cfg.fp8, enabled=True, gemms=list(gemms),
                                                          include=list(include)))
        routes: list = []
        for name, mod in model.named_modules():  # the MoE routers' top-k choices, to count flips
            if name.endswith("mlp.gate"):
                mod.register_forward_hook(lambda m, i, o: routes.append(o.indices.sort(-1).values))
        out = []
        for batch in batches:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                res = model(batch[:, :-1])
            logits = res if torch.is_tensor(res) else (res.logits if hasattr(res, "logits") else res[0])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            g = torch.cat([p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None])
            out.append((loss.item(), g))
        return out, routes

    ref, ref_routes = grads(None)
    variants = {"fp8 all": ("fprop", "dgrad", "wgrad"), "fp8 fprop": ("fprop",), "fp8 dgrad": ("dgrad",),
                "fp8 wgrad": ("wgrad",), "fp8 fprop+dgrad": ("fprop", "dgrad"), "fp8 none (control)": ()}
    # Fprop in FP8 only in part of the model (fp8.include patterns), the rest FP32.
    parts = {"fp8 fprop, attention only": ("*self_attn*",), "fp8 fprop, MLPs+experts only": ("*mlp*",),
             "fp8 fprop, routed experts only": ("*mlp.experts",)}
    results = {}
    runs = [(n, g, ("*",)) for n, g in variants.items()] + [(n, ("fprop",), inc) for n, inc in parts.items()]
    for name, gemms, include in [*runs, ("bf16 autocast", None, ("*",))]:
        got, routes = grads(gemms, include=include) if gemms is not None else grads(None, autocast=True)
        flips = sum(int((a != b).any(-1).sum()) for a, b in zip(routes, ref_routes))
        n_routed = sum(a.shape[0] for a in ref_routes)
        diffs = [g - r for (_, g), (_, r) in zip(got, ref)]
        rel = [float(d.norm() / r.norm()) for d, (_, r) in zip(diffs, ref)]
        cos = [float(torch.dot(g, r) / (g.norm() * r.norm())) for (_, g), (_, r) in zip(got, ref)]
        rms = (sum(float(d.norm()) ** 2 for d in diffs) / len(diffs)) ** 0.5
        bias = float((sum(diffs) / len(diffs)).norm()) * len(diffs) ** 0.5 / rms if rms > 0 else 0.0
        loss_rel = sum((lg - lr) / lr for (lg, _), (lr, _) in zip(got, ref)) / len(ref)
        results[name] = {"rel_err": sum(rel) / len(rel), "cos": sum(cos) / len(cos), "coherence": bias,
                         "loss_rel": loss_rel, "routing_changed": flips / max(n_routed, 1)}
        print(f"grad error {name:20s} rel {results[name]['rel_err']:.4f}  cos {results[name]['cos']:.6f}  "
              f"coherence {bias:.2f}  loss {100 * loss_rel:+.4f}%  tokens routed differently "
              f"{100 * results[name]['routing_changed']:.2f}%", flush=True)
    gs = [r for _, r in ref]
    rms_g = (sum(float(g.norm()) ** 2 for g in gs) / len(gs)) ** 0.5
    grad_coherence = float((sum(gs) / len(gs)).norm()) * len(gs) ** 0.5 / rms_g
    print(f"coherence of the FP32 gradients themselves over the same batches: {grad_coherence:.2f} "
          f"(sqrt(n) = {len(gs) ** 0.5:.2f})", flush=True)
    return {"checkpoint": str(ckpt), "batches": len(batches), "fp32_loss": sum(l for l, _ in ref) / len(ref),
            "fp32_grad_coherence": grad_coherence, "variants": results}


def tail_slope(points: dict[int, float], max_steps: int, fraction: float = 0.2) -> dict:
    """Least-squares slope of ``points`` (step -> loss) over the last ``fraction`` of ``max_steps``.

    ``window_change`` is the slope times the window length (what the fit says the loss moved over it) and
    ``rel_window_change`` that relative to the last value: ~0 means flattened.
    """
    start = max_steps * (1 - fraction)
    xs = sorted(st for st in points if st >= start)
    if len(xs) < 3:
        return {"points": len(xs)}
    ys = [points[x] for x in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    window = max_steps - start
    return {"points": len(xs), "from_step": xs[0], "slope_per_100_steps": 100 * slope,
            "window_change": slope * window, "rel_window_change": slope * window / ys[-1]}


def saved_activation_bytes(cfg, *, fp8: bool, batch_size: int = 8, seq_len: int = 128, seed: int = 0) -> dict:
    """Bytes of the tensors autograd saves for backward in one forward of ``cfg.model`` under its precision.

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` during the model's forward (the loss
    is not included) is attributed to its storage; each storage is counted once, and storages of the
    parameters themselves are left out (they exist whether or not anything is saved). ``in_fp8_modules`` is
    the part packed inside the modules `apply_fp8` converts (the projections and the expert blocks, the
    latter including their SwiGLU), measured the same way with and without FP8. Returns totals, bytes per
    token and a per-dtype breakdown.
    """
    import dataclasses

    import torch

    from frugalm.fp8 import apply_fp8, plan_fp8
    from frugalm.model.transformer import DeepSeekV3

    model = DeepSeekV3(cfg.model).init_weights(seed)
    fp8_cfg = dataclasses.replace(cfg.fp8, enabled=True)
    plan = plan_fp8(model, fp8_cfg)
    if fp8:
        apply_fp8(model, fp8_cfg)
    model.train()
    depth = [0]
    for name in [*plan.linears, *plan.experts]:
        mod = model.get_submodule(name)
        mod.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1))
        mod.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str, bool]] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_storages and ptr not in seen:
            seen[ptr] = (st.nbytes(), str(t.dtype).removeprefix("torch."), depth[0] > 0)
        return t

    ids = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            model(ids)
    by_dtype: dict[str, int] = {}
    for nbytes, dtype, _ in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    total = sum(by_dtype.values())
    inside = sum(nbytes for nbytes, _, flag in seen.values() if flag)
    tokens = batch_size * seq_len
    return {"tokens": tokens, "bytes": total, "bytes_per_token": total / tokens, "in_fp8_modules": inside,
            "in_fp8_modules_per_token": inside / tokens, "by_dtype": by_dtype}


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"fp8": "tab:red", "bf16": "tab:blue", "fp32": "tab:green", "bf16_seed2": "tab:cyan",
              "fp32_seed2": "tab:olive", "fp8_fp32": "tab:orange", "fp8_seed2": "tab:pink",
              "fp8_fp32_seed2": "tab:brown", "fp8_fp32_none": "tab:gray", "fp8_fp32_fprop": "tab:purple",
              "fp8_fp32_wgrad": "gold", "fp8_fp32_fprop_dgrad": "magenta", "fp8_fp32_dgrad": "black"}
    for name, (tr, va, tps) in curves.items():
        c = colors.get(name)
        s = sorted(tr)
        ax[0].plot([x * tps for x in s], [tr[x] for x in s], label=name, color=c, lw=0.8, alpha=0.8)
        s = sorted(va)
        ax[1].plot([x * tps for x in s], [va[x] for x in s], "o-", label=name, color=c, ms=3)
    for a, t in zip(ax, ("train loss (main CE)", "val loss")):
        a.set_xlabel("training tokens")
        a.set_ylabel("nats/token")
        a.set_title(t)
        a.grid(alpha=0.3)
        a.legend()
    # zoom the val panel on the tail, where the gap is read
    tail = [v for (_, va, _) in curves.values() for s, v in va.items() if s >= max(va) // 2]
    if tail:
        ax[1].set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


_PEAK_CACHE: dict[str, dict] = {}


def _seed_peak_flops(trainer) -> None:
    """Give the run its matmul-peak cache (only used for the MFU column of the logs) up front.

    The trainer measures the peak with 2048^3 matmuls in the autocast dtype; on an AVX2-only CPU a BF16 one
    takes minutes, per run. Here it is measured once per process with 512^3 matmuls (same formula, smaller
    size) and written where the trainer looks for it. None of this benchmark's figures depend on it.
    """
    import time

    import torch

    from frugalm.train.perf import PEAK_FILE, device_name

    dtype = trainer.autocast_dtype or torch.float32
    key = f"{device_name(trainer.device)}|{str(dtype).removeprefix('torch.')}"
    if key not in _PEAK_CACHE:
        n = 512
        a = torch.randn(n, n, dtype=dtype, device=trainer.device)
        a @ a
        t0 = time.perf_counter()
        a @ a
        _PEAK_CACHE[key] = {key: 2 * n ** 3 / (time.perf_counter() - t0)}
    (trainer.out_dir / PEAK_FILE).write_text(json.dumps(_PEAK_CACHE[key], indent=1) + "\n")


def _param_counts(cfg) -> dict[str, int]:
    return cfg.model.param_counts()


def step_speed(configs: dict, steps: int = 3, repeats: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per `Trainer.train_step` of each config, built side by side in one process and timed in turns
    (best of ``repeats`` rounds of ``steps`` steps), so the ratios share one machine state; and, on an
    accelerator, each run's matmul peak (FLOP/s in its compute dtype, measured here) for MFU.

    Trainers are built one at a time and freed before the next on an accelerator (a ~1B model's optimizer
    state twice over may not fit); on the CPU they are kept and interleaved, which load hurts least.
    """
    import gc
    import tempfile
    import time

    import torch

    from frugalm.train.perf import _synchronize, measure_matmul_flops
    from frugalm.train.trainer import Trainer

    best = {name: float("inf") for name in configs}
    peaks: dict[str, float] = {}

    def timed_rounds(name: str, tr, rounds: int) -> None:
        for _ in range(rounds):
            _synchronize(tr.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.train_step()
            _synchronize(tr.device)
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, cfg in configs.items():
            tr = Trainer(cfg, Path(tmp) / name, progress=False, log_fn=lambda m: None)
            _seed_peak_flops(tr)
            if tr.device.type != "cpu":  # on this CPU BF16 matmuls run far below FP32 ones: no MFU there
                dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
                peaks[name] = measure_matmul_flops(tr.device, dtype)
            tr.train_step()  # warm-up
            if tr.device.type == "cpu":
                trainers[name] = tr
            else:
                tr.train_step()
                timed_rounds(name, tr, repeats)
                del tr
                gc.collect()
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
        for _ in range(repeats):
            for name, tr in trainers.items():
                timed_rounds(name, tr, 1)
    return best, peaks


def run_one(name: str, cfg, out: Path, init_seed: int | None, reuse: bool) -> dict:
    """Train one variant (or reuse a finished one); returns its summary dict."""
    from frugalm.train.trainer import Trainer

    done = out / name / "summary.json"
    if reuse and done.exists():
        print(f"   reusing {done}", flush=True)
        return json.loads(done.read_text())
    trainer = Trainer(cfg, out / name, overwrite=True, progress=False)
    _seed_peak_flops(trainer)
    if init_seed is not None:
        # Same data order (the sampler was seeded with train.seed), other initial weights: re-initialise in
        # place, so the optimizer and any FP8 modules keep referring to the same Parameters.
        import torch

        with torch.no_grad():
            trainer.model.init_weights(init_seed)
    s = trainer.fit().to_dict()
    s["init_seed"] = init_seed if init_seed is not None else cfg.train.seed
    done.write_text(json.dumps(s, indent=2, default=str) + "\n")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs", default="fp8,bf16,bf16_seed2", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--backend", default="emulated", help="fp8.backend of the fp8 runs")
    ap.add_argument("--init-seed-b", type=int, default=4321, help="initial-weight seed of the *_seed2 runs")
    ap.add_argument("--out", default="runs/fp8_vs_bf16")
    ap.add_argument("--figure", default="benchmarks/figures/fp8_vs_bf16.png")
    ap.add_argument("--memory", action="store_true", help="measure optimizer bytes/param (BF16 vs FP32 moments)")
    ap.add_argument("--speed", default="",
                    help="comma list of variants whose train-step time to measure side by side in this process "
                         "(fp8 variants with both backends: sliced and emulated)")
    ap.add_argument("--speed-backends", default="emulated,sliced",
                    help="fp8.backend values the --speed fp8 variants are timed with (blockwise on H100/H200)")
    ap.add_argument("--activation-memory", action="store_true",
                    help="measure bytes saved for backward in one forward, FP8 vs BF16")
    ap.add_argument("--check-resume", type=int, default=0, metavar="STEPS",
                    help="also check an FP8 run of STEPS steps resumes bit for bit, and that fp8's OUT/final loads")
    ap.add_argument("--grad-error", default="", metavar="CHECKPOINT",
                    help="per-GEMM gradient/loss error of FP8 vs FP32 on a trained HF checkpoint folder "
                         "(e.g. OUT/fp32/final), with the fp8 run's config; no training")
    ap.add_argument("--reuse", action="store_true",
                    help="skip a run whose OUT/<name>/summary.json exists (finished) and report it from its files")
    args = ap.parse_args()

    import torch

    from frugalm.train import load_run_config

    def config_of(name: str):
        extra = VARIANTS[name][0] + ([f"fp8.backend={args.backend}"] if name.startswith("fp8") else [])
        return load_run_config(args.config, [*DEFAULT_OVERRIDES, *extra, *args.overrides])

    out = Path(args.out)
    names = [n for n in args.runs.split(",") if n]
    results, curves, cfgs = {}, {}, {}
    for name in names:
        cfg = cfgs[name] = config_of(name)
        init_seed = args.init_seed_b if VARIANTS[name][1] else None
        print(f"== {name}: precision={cfg.train.precision} fp8={cfg.fp8.enabled} ({cfg.fp8.backend}) "
              f"seed={cfg.train.seed} init_seed={init_seed or cfg.train.seed} steps={cfg.train.max_steps} x "
              f"{cfg.train.tokens_per_step} tokens", flush=True)
        s = run_one(name, cfg, out, init_seed, args.reuse)
        tr, va = read_metrics(out / name)
        curves[name] = (tr, va, cfg.train.tokens_per_step)
        flat_val = tail_slope(va, cfg.train.max_steps)
        flat_train = tail_slope(tr, cfg.train.max_steps)
        results[name] = {"final_val_loss": s["final_val_loss"], "final_train_loss": s["final_loss"],
                         "steps": s["steps"], "tokens": s["tokens"], "wall_s": s["wall_s"], "train_s": s["train_s"],
                         "tokens_per_s": s["tokens_per_s"], "skipped_steps": s["skipped_steps"],
                         "init_seed": s.get("init_seed"), "tail_val": flat_val, "tail_train": flat_train,
                         "val_losses": va}
        print(f"   final val {s['final_val_loss']:.5f}  train {s['final_loss']:.4f}  {s['steps']} steps  "
              f"{s['tokens']:,} tokens  wall {s['wall_s']:.0f}s ({s['tokens_per_s']:,.0f} tok/s)", flush=True)
        if "rel_window_change" in flat_val:
            print(f"   last 20%: val slope {flat_val['slope_per_100_steps']:+.5f}/100 steps, "
                  f"{100 * flat_val['rel_window_change']:+.3f}% over the window ({flat_val['points']} evals); "
                  f"train {100 * flat_train['rel_window_change']:+.3f}%", flush=True)

    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": results}

    def gap(key: str, a: str, b: str, label: str) -> None:
        if a in results and b in results:
            fa, fb = results[a]["final_val_loss"], results[b]["final_val_loss"]
            report[key] = (fa - fb) / fb
            print(f"{label}: ({a} - {b}) / {b} = {100 * (fa - fb) / fb:+.3f}%  ({fa:.5f} vs {fb:.5f})")

    print()
    gap("rel_gap_fp8_vs_bf16", "fp8", "bf16", "FP8 vs BF16 final val loss")
    gap("rel_gap_bf16_seed_noise", "bf16_seed2", "bf16", "BF16 init-seed noise")
    gap("rel_gap_fp8_vs_bf16_seed2", "fp8_seed2", "bf16_seed2", "FP8 vs BF16 final val loss, init seed B")
    gap("rel_gap_fp8_fp32_vs_fp32", "fp8_fp32", "fp32", "FP8 (FP32 elsewhere) vs FP32")
    gap("rel_gap_fp32_seed_noise", "fp32_seed2", "fp32", "FP32 init-seed noise")
    gap("rel_gap_bf16_vs_fp32", "bf16", "fp32", "BF16 vs FP32")
    gap("rel_gap_fp8_fp32_vs_fp32_seed2", "fp8_fp32_seed2", "fp32_seed2", "FP8 (FP32 elsewhere) vs FP32, init seed B")
    for name in results:  # every other FP8 variant against its own base (same precision, same init seed)
        if not name.startswith("fp8_fp32_") or name == "fp8_fp32_seed2":
            continue
        base = "fp32_seed2" if VARIANTS[name][1] else "fp32"
        gap(f"rel_gap_{name}_vs_{base}", name, base, f"FP8 GEMMs {cfgs[name].fp8.gemms} vs FP32")
    if "fp8" in results and "bf16" in results:
        common = sorted(set(results["fp8"]["val_losses"]) & set(results["bf16"]["val_losses"]))
        others = [n for n in ("bf16_seed2", "fp8_seed2") if n in results]
        print(f"{'step':>6s} {'fp8':>9s} {'bf16':>9s} {'rel gap':>9s}" + "".join(f" {n:>11s}" for n in others))
        for st in common:
            fv, bv = results["fp8"]["val_losses"][st], results["bf16"]["val_losses"][st]
            row = f"{st:6d} {fv:9.5f} {bv:9.5f} {100 * (fv - bv) / bv:+8.3f}%"
            for n in others:
                row += f" {results[n]['val_losses'].get(st, float('nan')):11.5f}"
            print(row)

    if args.memory:
        import dataclasses

        base = cfgs.get("fp8") or config_of("fp8")
        mem = {}
        for label, bf16m in (("fp32_master+fp32_moments", False), ("fp32_master+bf16_moments", True)):
            c = dataclasses.replace(base, train=dataclasses.replace(base.train, bf16_moments=bf16m))
            mem[label] = optimizer_bytes_per_param(c)
            m = mem[label]
            print(f"memory/param {label}: weights {m['weights']:.2f} B + master {m['master']:.2f} B + "
                  f"moments {m['moments']:.2f} B = {m['total']:.2f} B "
                  f"({m['params']:,} params)")
        report["bytes_per_param"] = mem

    if args.speed:
        import dataclasses

        speed_cfgs = {}
        for name in args.speed.split(","):
            cfg = config_of(name)
            if cfg.fp8.enabled:
                for backend in args.speed_backends.split(","):
                    speed_cfgs[f"{name}[{backend}]"] = dataclasses.replace(
                        cfg, fp8=dataclasses.replace(cfg.fp8, backend=backend))
            else:
                speed_cfgs[name] = cfg
        sec, peaks = step_speed(speed_cfgs)
        first = next(iter(speed_cfgs.values()))
        tokens = first.train.tokens_per_step
        from frugalm.plan.flops import training_flops_per_token

        flops_per_token = training_flops_per_token(first.model, first.train.seq_len)
        ref = sec.get("fp32") or sec.get("bf16")
        for name, t in sec.items():
            mfu = f"  MFU {100 * tokens * flops_per_token / t / peaks[name]:5.1f}%" if name in peaks else ""
            print(f"train step {name:20s} {1000 * t:8.1f} ms  {tokens / t:8,.0f} tok/s{mfu}"
                  + (f"  {t / ref:5.2f}x {'fp32' if 'fp32' in sec else 'bf16'}" if ref else ""))
        report["step_seconds"] = sec
        report["step_speed"] = {
            "tokens_per_step": tokens, "flops_per_token": flops_per_token,
            "matmul_peak_flops": peaks, "params": _param_counts(first),
            "mfu": {name: tokens * flops_per_token / t / peaks[name] for name, t in sec.items() if name in peaks},
        }
        print(f"  ({tokens} tokens/step, {flops_per_token / 1e9:.2f} GFLOP/token, MFU (accelerators only) against "
              f"the matmul rate measured in this process in the step's compute dtype; "
              f"params {report['step_speed']['params']})")

    if args.activation_memory:
        act = {}
        for label, name, fp8 in (("bf16", "bf16", False), ("fp8+bf16", "fp8", True),
                                 ("fp32", "fp32", False), ("fp8+fp32", "fp8_fp32", True)):
            c = cfgs.get(name) or config_of(name)
            act[label] = saved_activation_bytes(c, fp8=fp8, batch_size=c.train.batch_size, seq_len=c.train.seq_len)
            a = act[label]
            parts = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(a["by_dtype"].items()))
            print(f"saved for backward, {label}: {a['bytes'] / 2**20:.2f} MiB for {a['tokens']} tokens "
                  f"({a['bytes_per_token']:,.0f} B/token; {parts}); inside the FP8-convertible modules "
                  f"{a['in_fp8_modules'] / 2**20:.2f} MiB ({a['in_fp8_modules_per_token']:,.0f} B/token)")
        for hi, lo in (("bf16", "fp8+bf16"), ("fp32", "fp8+fp32")):
            saved = 1 - act[lo]["bytes"] / act[hi]["bytes"]
            saved_in = 1 - act[lo]["in_fp8_modules"] / act[hi]["in_fp8_modules"]
            print(f"activation memory saved, {lo} vs {hi}: {100 * saved:.1f}% of the model's, "
                  f"{100 * saved_in:.1f}% inside the converted modules")
            act[f"saved_{lo}_vs_{hi}"] = saved
            act[f"saved_in_fp8_modules_{lo}_vs_{hi}"] = saved_in
        report["activation_memory"] = act

    if args.check_resume:
        base = cfgs.get("fp8") or config_of("fp8")
        r = check_resume(base, out, args.check_resume)
        report["resume"] = r
        print(f"FP8 resume: stopped at {r['stop_at']}/{r['steps']}, bit-exact={r['bit_exact']} "
              f"(max |train loss diff| {r['max_abs_train_loss_diff']}, val {r['val_ref']} vs {r['val_resumed']})")
        src = out / ("fp8" if "fp8" in results else "resume_ref")
        fp = check_from_pretrained(src, base)
        report["from_pretrained"] = {"dir": str(src / "final"), **fp}
        print(f"from_pretrained({src / 'final'}): {fp['params']:,} params, FP32 val loss {fp['val_loss_fp32_reload']:.5f}")

    if args.grad_error:
        report["grad_error"] = gradient_error(Path(args.grad_error), cfgs.get("fp8_fp32") or config_of("fp8_fp32"))

    if curves:
        first = next(iter(cfgs.values()))
        m = first.model
        title = (f"{args.config} shrunk (d={m.hidden_size}, {m.num_hidden_layers} layers, "
                 f"{m.n_routed_experts} experts, vocab {m.vocab_size}): "
                 f"{first.train.max_steps} steps x {first.train.tokens_per_step} tokens, "
                 f"seed {first.train.seed}; FP8 backend {args.backend}; torch {torch.__version__}")
        for key, label in (("rel_gap_fp8_vs_bf16", "FP8 vs BF16"), ("rel_gap_fp8_vs_bf16_seed2", "FP8 vs BF16 (seed B)"),
                           ("rel_gap_bf16_seed_noise", "BF16 seed B vs A"), ("rel_gap_fp8_fp32_vs_fp32", "FP8 vs FP32"),
                           ("rel_gap_fp8_fp32_vs_fp32_seed2", "FP8 vs FP32 (seed B)"),
                           ("rel_gap_fp32_seed_noise", "FP32 seed B vs A")):
            if key in report:
                title += f"\nfinal val gap {label} {100 * report[key]:+.3f}%"
        plot(curves, Path(args.figure), title)
        print(f"figure: {args.figure}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
