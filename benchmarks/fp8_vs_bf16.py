"""FP8 vs BF16 training (DeepSeek-V3 §3.3): the same config, seed and data trained with FP8 GEMMs and with
plain BF16 autocast; the relative gap of the final validation loss, and both curves in one PNG.

Runs (each with the trainer's Python API, `frugalm.train.train`, into ``OUT/<name>``; curves are read
back from ``OUT/<name>/metrics.jsonl``):

* ``bf16``: ``train.precision = "bf16"`` (autocast; FP32 master weights and FP32 AdamW moments);
* ``fp8``: ``[fp8] enabled = true`` with ``train.precision = "fp32"`` (every linear except embedding, head, router and norms
  runs DeepSeek's block-scaled E4M3 GEMMs; backend ``emulated`` by default on CPU, which computes the same
  numbers as the K-sliced real FP8 GEMMs, see `frugalm.fp8.backends`); the high-precision modules run in
  FP32, not BF16, because BF16 autocast around the FP8 expert GEMM currently fails (see VARIANTS);
* optional ``fp32`` (no autocast) and ``bf16_seed2`` (BF16 with another seed: the seed-noise yardstick the
  FP8 gap has to be read against).

It also measures the optimizer's bytes per parameter (FP32 master + FP32 moments vs BF16 moments) after
one step of each setup, and optionally checks that an FP8 run stopped part-way resumes bit for bit and that
its ``OUT/final`` export loads with `frugalm.from_pretrained`.

    python benchmarks/fp8_vs_bf16.py [--config tiny] [--set train.max_steps=60] [--runs fp8,fp32,fp32_seed2]
        [--out runs/fp8_vs_bf16] [--figure benchmarks/figures/fp8_vs_bf16.png] [--check-resume]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Shrunk from the embedded tiny run so that the FP8 + BF16 pair fits in ~15 minutes on a shared 2-core CPU;
# any of these can be overridden with --set.
DEFAULT_OVERRIDES = [
    "train.max_steps=60", "train.batch_size=4", "train.seq_len=64", "train.warmup_steps=6",
    "train.eval_every=10", "train.eval_batches=4", "train.log_every=2", "train.checkpoint_every=0",
    "train.sample_tokens=0", "train.num_threads=2",
]

VARIANTS = {
    "bf16": ["train.precision=bf16"],
    # FP8 GEMMs with everything else in FP32: under BF16 autocast the FP8 grouped expert GEMM fails in torch
    # 2.13 (torch.cat of float8 tensors -> "Unexpected floating ScalarType in at::autocast::prioritize").
    "fp8": ["train.precision=fp32", "fp8.enabled=true"],
    "fp32": ["train.precision=fp32"],
    "bf16_seed2": ["train.precision=bf16", "train.seed=4321"],
    "fp32_seed2": ["train.precision=fp32", "train.seed=4321"],
}


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> train loss, step -> val loss) from a run's metrics.jsonl."""
    train, val = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
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

    from frugalm.train.trainer import Trainer, train

    tc = dataclasses.replace(cfg.train, max_steps=steps, eval_every=steps, log_every=1)
    cfg = dataclasses.replace(cfg, train=tc)
    a = train(cfg, out / "resume_ref", overwrite=True, progress=False)
    Trainer(cfg, out / "resume_cut", overwrite=True, progress=False).fit(stop_after=steps // 2)
    b = train(cfg, out / "resume_cut", resume=True, progress=False)
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


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"fp8": "tab:red", "bf16": "tab:blue", "fp32": "tab:green", "bf16_seed2": "tab:cyan",
              "fp32_seed2": "tab:olive"}
    for name, (tr, va, tps) in curves.items():
        c = colors.get(name)
        s = sorted(tr)
        ax[0].plot([x * tps for x in s], [tr[x] for x in s], label=name, color=c, lw=1)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    # bf16 is the issue's reference; the default compares against FP32 (with a second FP32 seed as the noise
    # yardstick) because its published figures were taken before the MoE ran under BF16 autocast. Pass
    # --runs fp8,bf16,bf16_seed2 for the BF16 comparison.
    ap.add_argument("--runs", default="fp8,fp32,fp32_seed2", help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--backend", default="emulated", help="fp8.backend of the fp8 run")
    ap.add_argument("--out", default="runs/fp8_vs_bf16")
    ap.add_argument("--figure", default="benchmarks/figures/fp8_vs_bf16.png")
    ap.add_argument("--memory", action="store_true", help="measure optimizer bytes/param (BF16 vs FP32 moments)")
    ap.add_argument("--check-resume", type=int, default=0, metavar="STEPS",
                    help="also check an FP8 run of STEPS steps resumes bit for bit, and that fp8's OUT/final loads")
    ap.add_argument("--reuse", action="store_true",
                    help="skip a run whose OUT/<name>/summary.json exists (finished) and report it from its files")
    args = ap.parse_args()

    import torch

    from frugalm.train import load_run_config, train

    def fp8_config():
        return cfgs.get("fp8") or load_run_config(args.config, [*DEFAULT_OVERRIDES, *VARIANTS["fp8"], *args.overrides])

    out = Path(args.out)
    names = [n for n in args.runs.split(",") if n]
    results, curves, cfgs = {}, {}, {}
    for name in names:
        extra = VARIANTS[name] + ([f"fp8.backend={args.backend}"] if name == "fp8" else [])
        cfg = load_run_config(args.config, [*DEFAULT_OVERRIDES, *extra, *args.overrides])
        cfgs[name] = cfg
        print(f"== {name}: precision={cfg.train.precision} fp8={cfg.fp8.enabled} ({cfg.fp8.backend}) "
              f"seed={cfg.train.seed} steps={cfg.train.max_steps} x {cfg.train.tokens_per_step} tokens", flush=True)
        done = out / name / "summary.json"
        if args.reuse and done.exists():
            s = json.loads(done.read_text())
            print(f"   reusing {done}", flush=True)
        else:
            s = train(cfg, out / name, overwrite=True, progress=False).to_dict()
        tr, va = read_metrics(out / name)
        curves[name] = (tr, va, cfg.train.tokens_per_step)
        results[name] = {"final_val_loss": s["final_val_loss"], "final_train_loss": s["final_loss"],
                         "steps": s["steps"], "tokens": s["tokens"], "wall_s": s["wall_s"], "train_s": s["train_s"],
                         "tokens_per_s": s["tokens_per_s"], "skipped_steps": s["skipped_steps"], "val_losses": va}
        print(f"   final val {s['final_val_loss']:.5f}  train {s['final_loss']:.4f}  {s['steps']} steps  "
              f"{s['tokens']:,} tokens  wall {s['wall_s']:.0f}s ({s['tokens_per_s']:,.0f} tok/s)", flush=True)

    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": results}
    if "fp8" in results and "bf16" in results:
        f, b = results["fp8"]["final_val_loss"], results["bf16"]["final_val_loss"]
        report["rel_gap_fp8_vs_bf16"] = (f - b) / b
        print(f"\nrelative gap of final val loss, (FP8 - BF16) / BF16: {100 * (f - b) / b:+.3f}%  "
              f"(FP8 {f:.5f}, BF16 {b:.5f})")
        common = sorted(set(results["fp8"]["val_losses"]) & set(results["bf16"]["val_losses"]))
        print(f"{'step':>6s} {'fp8':>9s} {'bf16':>9s} {'rel gap':>9s}")
        for st in common:
            fv, bv = results["fp8"]["val_losses"][st], results["bf16"]["val_losses"][st]
            print(f"{st:6d} {fv:9.5f} {bv:9.5f} {100 * (fv - bv) / bv:+8.3f}%")
    if "fp8" in results and "fp32" in results:
        f, b = results["fp8"]["final_val_loss"], results["fp32"]["final_val_loss"]
        report["rel_gap_fp8_vs_fp32"] = (f - b) / b
        print(f"relative gap of final val loss, (FP8 - FP32) / FP32: {100 * (f - b) / b:+.3f}%  "
              f"(FP8 {f:.5f}, FP32 {b:.5f})")
    if "fp32_seed2" in results and "fp32" in results:
        b2, b = results["fp32_seed2"]["final_val_loss"], results["fp32"]["final_val_loss"]
        report["rel_gap_fp32_seed_noise"] = (b2 - b) / b
        print(f"seed noise, FP32 seed {cfgs['fp32_seed2'].train.seed} vs {cfgs['fp32'].train.seed}: "
              f"{100 * (b2 - b) / b:+.3f}%")
    if "bf16_seed2" in results and "bf16" in results:
        b2, b = results["bf16_seed2"]["final_val_loss"], results["bf16"]["final_val_loss"]
        report["rel_gap_bf16_seed_noise"] = (b2 - b) / b
        print(f"seed noise, BF16 seed {cfgs['bf16_seed2'].train.seed} vs {cfgs['bf16'].train.seed}: "
              f"{100 * (b2 - b) / b:+.3f}%")
    if "fp32" in results and "bf16" in results:
        f32, b = results["fp32"]["final_val_loss"], results["bf16"]["final_val_loss"]
        report["rel_gap_bf16_vs_fp32"] = (b - f32) / f32
        print(f"BF16 vs FP32: {100 * (b - f32) / f32:+.3f}% (FP32 {f32:.5f})")

    if args.memory:
        import dataclasses

        base = fp8_config()
        mem = {}
        for label, bf16m in (("fp32_master+fp32_moments", False), ("fp32_master+bf16_moments", True)):
            c = dataclasses.replace(base, train=dataclasses.replace(base.train, bf16_moments=bf16m))
            mem[label] = optimizer_bytes_per_param(c)
            m = mem[label]
            print(f"memory/param {label}: weights {m['weights']:.2f} B + master {m['master']:.2f} B + "
                  f"moments {m['moments']:.2f} B = {m['total']:.2f} B "
                  f"({m['params']:,} params)")
        report["bytes_per_param"] = mem

    if args.check_resume:
        base = fp8_config()
        r = check_resume(base, out, args.check_resume)
        report["resume"] = r
        print(f"FP8 resume: stopped at {r['stop_at']}/{r['steps']}, bit-exact={r['bit_exact']} "
              f"(max |train loss diff| {r['max_abs_train_loss_diff']}, val {r['val_ref']} vs {r['val_resumed']})")
        src = out / ("fp8" if "fp8" in results else "resume_ref")
        fp = check_from_pretrained(src, base)
        report["from_pretrained"] = {"dir": str(src / "final"), **fp}
        print(f"from_pretrained({src / 'final'}): {fp['params']:,} params, FP32 val loss {fp['val_loss_fp32_reload']:.5f}")

    if curves:
        first = next(iter(cfgs.values()))
        title = (f"{args.config} shrunk: {first.train.max_steps} steps x {first.train.tokens_per_step} tokens, "
                 f"seed {first.train.seed}; FP8 backend {args.backend}; torch {torch.__version__}")
        for key, label in (("rel_gap_fp8_vs_bf16", "FP8 vs BF16"), ("rel_gap_fp8_vs_fp32", "FP8 vs FP32")):
            if key in report:
                title += f"\nfinal val gap {label} {100 * report[key]:+.3f}%"
        plot(curves, Path(args.figure), title)
        print(f"figure: {args.figure}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()
