"""DeepSeek's central claim at small scale: at equal activated parameters and equal training tokens, a
fine-grained MoE reaches a lower validation loss than a dense model.

Both models share everything but the FFNs: the MoE is the given config (default: the embedded tiny run);
the dense twin has no routed experts and one SwiGLU width in every layer (MTP block included), chosen so
that its activated parameter count matches the MoE's as closely as possible. Same data, seed, batches,
schedule and step count; the val loss of each is printed side by side at every evaluation.

    python benchmarks/moe_vs_dense.py [--config tiny] [--set train.max_steps=600] [--out runs/moe_vs_dense]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def dense_twin(moe_cfg):
    """The all-dense ModelConfig whose activated parameter count is closest to `moe_cfg`'s."""
    from frugalm.model.config import ModelConfig

    target = moe_cfg.param_counts()["activated"]
    base = dataclasses.asdict(moe_cfg)
    base.update(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=moe_cfg.num_hidden_layers)

    def activated(width: int) -> int:
        return ModelConfig(**{**base, "intermediate_size": width}).param_counts()["activated"]

    lo, hi = 1, 64 * moe_cfg.hidden_size
    while lo < hi:  # smallest width whose activated count reaches the target
        mid = (lo + hi) // 2
        if activated(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    width = min((lo - 1, lo), key=lambda w: abs(activated(w) - target)) if lo > 1 else lo
    return ModelConfig(**{**base, "intermediate_size": width})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/moe_vs_dense")
    args = ap.parse_args()

    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import Trainer

    # Half the default run's steps keeps the pair to a few minutes on a 2-core CPU; --set overrides it.
    overrides = ["train.max_steps=300", "train.eval_every=50", "train.checkpoint_every=0", "train.sample_tokens=0",
                 *args.overrides]
    moe = load_run_config(args.config, overrides)
    dense = dataclasses.replace(moe, model=dense_twin(moe.model))
    out = Path(args.out)
    results = {}
    for name, cfg in (("moe", moe), ("dense", dense)):
        counts = cfg.model.param_counts()
        print(f"== {name}: {counts['total'] / 1e6:.3f}M total, {counts['activated'] / 1e6:.3f}M activated/token "
              f"(FFN width {cfg.model.intermediate_size if name == 'dense' else 'experts'})", flush=True)
        summary = Trainer(cfg, out / name, overwrite=True, progress=None).fit()
        results[name] = {
            "total_params": counts["total"], "activated_params": counts["activated"],
            "val_losses": summary.val_losses, "final_val_loss": summary.final_val_loss,
            "final_train_loss": summary.final_loss, "tokens": summary.tokens,
            "tokens_per_s": summary.tokens_per_s, "train_s": summary.train_s,
        }
    steps = sorted(set(results["moe"]["val_losses"]) & set(results["dense"]["val_losses"]))
    print(f"\n{'step':>6s} {'tokens':>10s} {'MoE val':>9s} {'dense val':>10s}")
    per_step = moe.train.tokens_per_step
    for s in steps:
        print(f"{s:6d} {s * per_step:10,d} {results['moe']['val_losses'][s]:9.4f} {results['dense']['val_losses'][s]:10.4f}")
    m, d = results["moe"], results["dense"]
    print(f"\nfinal val loss: MoE {m['final_val_loss']:.4f} vs dense {d['final_val_loss']:.4f} "
          f"(difference {d['final_val_loss'] - m['final_val_loss']:+.4f} nats/token in favour of "
          f"{'MoE' if m['final_val_loss'] < d['final_val_loss'] else 'dense'}); "
          f"activated {m['activated_params'] / 1e6:.3f}M vs {d['activated_params'] / 1e6:.3f}M; "
          f"training tokens/s {m['tokens_per_s']:,.0f} vs {d['tokens_per_s']:,.0f}")
    (out / "results.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides, **results},
                                                 indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
