"""SFT for students that are not frugalm models (any transformers causal LM), with SFT's objective.

frugalm's `Trainer` builds its own DeepSeek-V3, so it cannot host a foreign architecture; this loop
reuses its parts instead (AdamW, the LR schedule, gradient clipping, atomic safetensors checkpoints,
metrics.jsonl) and the same masked batches and validation loss as `frugalm.reason.sft`. Checkpoints hold
the model, optimizer and data position, so `resume=True` continues an interrupted run; the run folder
is set up as the trainer's (`checkpoint.prepare_run_dir` / `resume_checkpoint`: refuse an existing run,
clear it on overwrite, and on resume delete half-written checkpoint writes and quarantine invalid ones).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from frugalm.reason.config import SFTConfig
from frugalm.reason.policy import Policy
from frugalm.reason.sft import masked_cross_entropy, masked_val_loss, train_config_for
from frugalm.reason.sft_data import SFTData, split_masked
from frugalm.reason.signals import graceful_stop
from frugalm.train import checkpoint as ckpt
from frugalm.train.metrics import MetricsLogger, plot_run, write_above_progress
from frugalm.train.optim import AdamW, clip_gradients_
from frugalm.train.schedule import lr_at
from frugalm.train.trainer import CHECKPOINT_DIR, FINAL_DIR, load_model_tensors, model_tensors


def run_hf_sft(policy: Policy, data: SFTData, sft: SFTConfig, out_dir: str | Path, *, resume: bool = False,
               overwrite: bool = False, progress: Optional[bool] = None, handle_signals: bool = False,
               stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train `policy` in place; writes OUT/metrics.jsonl, OUT/checkpoints, OUT/final (HF folder) and a PNG.

    SIGINT/SIGTERM (with `handle_signals`) or reaching `stop_after` steps ends the run after the current
    step with a checkpoint and no final model, as frugalm's trainer does; the summary says ``interrupted``."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    root = out / CHECKPOINT_DIR
    ckpt.prepare_run_dir(out, root, resume=resume, overwrite=overwrite, what="an SFT run", clear=(FINAL_DIR,))
    out.mkdir(parents=True, exist_ok=True)
    tc = train_config_for(sft)
    if sft.num_threads:
        torch.set_num_threads(sft.num_threads)
    torch.manual_seed(sft.seed)
    model = policy.model.train()
    optimizer = AdamW(model.named_parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                      weight_decay=tc.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = data.train_sampler(tc.batch_size, tc.seq_len, tc.seed)
    step = 0
    if resume and (path := ckpt.resume_checkpoint(root, write_above_progress)) is not None:
        loaded = ckpt.load_checkpoint(path, device=policy.device)
        state = loaded.json["state"]
        load_model_tensors(model, loaded.tensors["model"], state["model_aliases"])
        optimizer.load_tensor_state(loaded.tensors["optimizer"], state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
        write_above_progress(f"resume: continuing from {path} (step {step})")
    metrics = MetricsLogger(out, resume_step=step if step else None, tensorboard=False)
    t0 = time.perf_counter()
    losses: dict[int, float] = {}
    val: dict[int, float] = {}
    bar = tqdm(total=tc.max_steps, initial=step, desc="sft", unit="step",
               disable=None if progress is None else not progress)

    def save() -> None:
        sd, aliases = model_tensors(model)
        ckpt.save_checkpoint(root, step, {"model": sd, "optimizer": optimizer.tensor_state()},
                             {"state": {"step": step, "model_aliases": aliases, "optimizer": optimizer.scalar_state(),
                                        "sampler": sampler.state_dict()}}, keep=tc.keep_checkpoints)
        metrics.sync()

    interrupted = False
    try:
        with graceful_stop(handle_signals, write_above_progress) as stop:
            while step < tc.max_steps:
                lr = lr_at(step, tc)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                total = 0.0
                for _ in range(tc.grad_accum):
                    inputs, labels = split_masked(next(sampler).to(policy.device))
                    loss = masked_cross_entropy(policy.logits(inputs), labels)
                    (loss / tc.grad_accum).backward()
                    total += float(loss.detach()) / tc.grad_accum
                norm = float(clip_gradients_(params, tc.grad_clip))
                if math.isfinite(total) and math.isfinite(norm):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses[step] = total
                record: dict[str, Any] = {"step": step, "loss": total, "lr": lr, "grad_norm": norm}
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.max_steps):
                    val[step] = record["val_loss"] = masked_val_loss(model, policy.logits, data, tc, policy.device)
                if step % tc.log_every == 0 or "val_loss" in record or step == tc.max_steps:
                    metrics.log(record)
                bar.update(1)
                bar.set_postfix_str(f"loss {total:.3f}", refresh=False)
                stop_now = bool(stop) or (stop_after is not None and step >= stop_after)
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.max_steps or stop_now:
                    save()
                if stop_now and step < tc.max_steps:
                    interrupted = True
                    break
    finally:
        bar.close()
        metrics.close()
    final = None if interrupted else policy.save(out / FINAL_DIR)
    plot = plot_run(out)
    summary = {"steps": step, "final_loss": losses.get(step), "val_losses": val, "wall_s": time.perf_counter() - t0,
               "final_model": str(final) if final else None, "plot": str(plot) if plot else None,
               "interrupted": interrupted}
    if interrupted:
        write_above_progress(f"stopped at step {step}; continue with the same command plus --resume")
    else:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
