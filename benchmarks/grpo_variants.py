"""GRPO vs Dr. GRPO vs DAPO from one SFT checkpoint, same budget, several seeds; held-out pass@1/pass@k/maj@k.

Variants (everything else equal: G, completions per step, steps, LR, lengths, rewards):

- ``grpo``    – loss_type grpo (per-completion mean), scale_rewards group, ε = 0.2 both sides;
- ``dr_grpo`` – loss_type dr_grpo (constant normaliser), scale_rewards none (Dr. GRPO's two fixes);
- ``dapo``    – loss_type dapo (token-level), clip-higher ε_high = 0.28 (dynamic sampling stays off so the
  generation budget is the same).

Writes ``OUT/results.json`` (per run and mean ± std over seeds, plus the starting checkpoint's numbers)
and ``OUT/variants.png`` (reward, completion length and held-out pass@1 per step, seed 0 of each).

    python benchmarks/grpo_variants.py --model runs/r1/sft --out runs/grpo-variants --steps 40 --seeds 0 1 2 \
        --set grpo.lr=2e-5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

VARIANTS = {
    "grpo": ["grpo.loss_type=grpo", "grpo.scale_rewards=group", "grpo.epsilon_high=0.2"],
    "dr_grpo": ["grpo.loss_type=dr_grpo", "grpo.scale_rewards=none", "grpo.epsilon_high=0.2"],
    "dapo": ["grpo.loss_type=dapo", "grpo.scale_rewards=group", "grpo.epsilon_high=0.28"],
}
KEYS = ("pass_at_1", "pass_at_1_sampled", "pass_at_k", "maj_at_k", "format_rate", "mean_length")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for k in KEYS + ("last_reward",):
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                      "values": vals}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the SFT checkpoint every run starts from")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="reason TOML ([task] [grpo] [eval])")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from frugalm.reason.config import load_reason_config
    from frugalm.reason.plots import plot_comparison
    from frugalm.reason.stages import eval_stage, grpo_stage
    from frugalm.reason.tasks import load_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    base_cfg = load_reason_config(args.config, args.overrides + [f"grpo.max_steps={args.steps}"])
    task = load_task(base_cfg.task)
    settings = {"model": args.model, "steps": args.steps, "seeds": args.seeds, "overrides": args.overrides,
                "task": task.describe(), "grpo": base_cfg.to_dict()["grpo"], "eval": base_cfg.to_dict()["eval"],
                "threads": args.threads, "torch": torch.__version__}
    comparable = lambda d: {k: v for k, v in json.loads(json.dumps(d)).items() if k != "seeds"}  # noqa: E731
    if results["runs"] and comparable(results.get("settings", {})) != comparable(settings):
        raise SystemExit(f"{results_path} holds runs made with other settings; use another --out")
    results["settings"] = settings
    if "start" not in results:
        results["start"] = eval_stage(args.model, task, base_cfg).to_dict(with_samples=False)
        results_path.write_text(json.dumps(results, indent=2))
    print("start:", json.dumps({k: results["start"][k] for k in KEYS}), flush=True)
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant}-seed{seed}"
            if name in results["runs"]:
                continue
            cfg = load_reason_config(args.config, args.overrides + [f"grpo.max_steps={args.steps}", f"grpo.seed={seed}"]
                                     + VARIANTS[variant])
            t0 = time.perf_counter()
            summary = grpo_stage(args.model, task, cfg, out / name, overwrite=True, progress=False,
                                 log_fn=lambda m: None)
            train_s = time.perf_counter() - t0
            ev = eval_stage(summary.final_model, task, cfg).to_dict(with_samples=False)
            results["runs"][name] = {"variant": variant, "seed": seed, "train_s": train_s,
                                     "last_reward": summary.last_reward, "first_reward": summary.first_reward,
                                     **{k: ev[k] for k in KEYS}}
            results_path.write_text(json.dumps(results, indent=2))
            print(name, json.dumps(results["runs"][name]), flush=True)
    results["summary"] = {v: summarize([r for r in results["runs"].values() if r["variant"] == v])
                          for v in args.variants}
    results_path.write_text(json.dumps(results, indent=2))
    plot_comparison({v: out / f"{v}-seed{args.seeds[0]}" for v in args.variants}, out / "variants.png")
    for v, s in results["summary"].items():
        print(v, {k: f"{s[k]['mean']:.3f}±{s[k]['std']:.3f}" for k in s})


if __name__ == "__main__":
    main()
