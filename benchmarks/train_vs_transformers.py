"""Training tokens/s: frugalm's trainer step vs transformers' DeepseekV3ForCausalLM in a plain PyTorch loop.

Same config (default: the embedded tiny run), same initial weights (ours saved, transformers loads them),
same batches from the prepared data, same AdamW hyper-parameters, LR and gradient clipping. Three
contenders take turns on each batch, so machine noise hits all alike:

- ``frugalm``: `Trainer.train_step` as `frugalm train` runs it: MTP (λ), sequence-balance loss (α),
  the bias update and per-expert load accounting included;
- ``frugalm-noMTP``: the same step without the MTP module (the same work transformers does);
- ``transformers``: ``model(ids).logits`` -> cross-entropy -> backward -> clip -> torch.optim.AdamW.

    python benchmarks/train_vs_transformers.py [--config tiny] [--steps 30] [--set train.batch_size=16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class ReplayTrainer:
    """Wraps a frugalm `Trainer` so that it consumes a given batch instead of its own sampler."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.batch = None
        trainer.next_batch = lambda: self.batch

    def step(self, batch: torch.Tensor) -> float:
        self.batch = batch
        return self.trainer.train_step().loss


class TransformersLoop:
    """The plain loop a transformers user writes."""

    def __init__(self, path: Path, cfg):
        import transformers

        from frugalm.train.schedule import lr_at

        transformers.logging.set_verbosity_error()  # the MTP weights it does not use are expected

        self.lr_at, self.tc = lr_at, cfg.train
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        self.experts_impl = getattr(self.model.config, "_experts_implementation", "?")
        tc = cfg.train
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                     weight_decay=tc.weight_decay)
        self.n = 0

    def step(self, batch: torch.Tensor) -> float:
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.n, self.tc)
        logits = self.model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n += 1
        return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from frugalm.data.prepare import prepare_data
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import Trainer

    overrides = ["train.eval_every=0", "train.checkpoint_every=0", "train.device=cpu", *args.overrides]
    cfg = load_run_config(args.config, overrides)
    no_mtp = load_run_config(args.config, overrides + ["model.num_nextn_predict_layers=0"])
    data = prepare_data(cfg.data, None, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = ReplayTrainer(Trainer(cfg, tmp / "a", data=data, progress=False, log_fn=lambda m: None))
        ours_lite = ReplayTrainer(Trainer(no_mtp, tmp / "b", data=data, progress=False, log_fn=lambda m: None))
        ours.trainer.model.save_pretrained(tmp / "hf")
        hf = TransformersLoop(tmp / "hf", cfg)
        contenders = {"frugalm": ours.step, "frugalm-noMTP": ours_lite.step, "transformers": hf.step}
        sampler = data.train_sampler(cfg.train.batch_size, cfg.train.seq_len, cfg.train.seed)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        losses: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(args.warmup + args.steps):
            batch = next(sampler)
            for name, step in contenders.items():
                t0 = time.perf_counter()
                losses[name].append(step(batch))
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    result = {
        "config": args.config, "overrides": args.overrides, "steps": args.steps, "tokens_per_step": tokens,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "transformers_experts_implementation": hf.experts_impl,
        "tokens_per_s_median": tps, "first_loss": {k: v[0] for k, v in losses.items()},
        "last_loss": {k: v[-1] for k, v in losses.items()},
        "ratio_frugalm_vs_transformers": tps["frugalm"] / tps["transformers"],
        "ratio_frugalm_noMTP_vs_transformers": tps["frugalm-noMTP"] / tps["transformers"],
    }
    print(f"config {args.config} {args.overrides}: {tokens} tokens/step, {args.steps} timed steps, "
          f"{torch.get_num_threads()} threads, transformers experts={hf.experts_impl}")
    print(f"{'':16s} {'tokens/s':>10s} {'loss first -> last':>22s}")
    for k in contenders:
        print(f"{k:16s} {tps[k]:10,.0f} {losses[k][0]:10.3f} -> {losses[k][-1]:.3f}")
    print(f"ratio frugalm / transformers: {result['ratio_frugalm_vs_transformers']:.2f}x "
          f"(same work, no MTP: {result['ratio_frugalm_noMTP_vs_transformers']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
