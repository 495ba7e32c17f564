"""Supervised fine-tuning = frugalm's pre-training `Trainer` with another batch source and a masked loss.

Everything else (AdamW, LR schedule, MTP loss, expert-bias balancing, atomic checkpoints, exact resume,
progress bar, metrics.jsonl + PNG, SIGINT handling, HF export) is the trainer's own code. `SFTTrainer`
overrides only how a batch splits into inputs and labels, the cross-entropy and `evaluate` (loss on
assistant tokens), and starts from a pre-trained checkpoint instead of random weights.

Students that are not frugalm models (any transformers causal LM) cannot be hosted by the trainer,
which builds its own DeepSeek-V3; `frugalm.reason.hf_sft` trains those with the same objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.reason.config import SFTConfig
from frugalm.reason.response_format import render_response
from frugalm.reason.sft_data import IGNORE_INDEX, SFTData, split_masked, tokenize_pair
from frugalm.reason.tasks.base import Task
from frugalm.train.config import RunConfig, TrainConfig
from frugalm.train.trainer import Trainer, TrainSummary

log = logging.getLogger(__name__)


def train_config_for(sft: SFTConfig) -> TrainConfig:
    """The trainer's `[train]` section for an SFT run (no sample continuation at the end)."""
    return TrainConfig(
        max_steps=sft.max_steps, seed=sft.seed, batch_size=sft.batch_size, seq_len=sft.seq_len,
        grad_accum=sft.grad_accum, lr=sft.lr, min_lr=sft.min_lr, warmup_steps=sft.warmup_steps,
        schedule=sft.schedule, decay_fraction=sft.decay_fraction, weight_decay=sft.weight_decay, grad_clip=sft.grad_clip, precision=sft.precision,
        device=sft.device, num_threads=sft.num_threads, eval_every=sft.eval_every, eval_batches=sft.eval_batches,
        checkpoint_every=sft.checkpoint_every, keep_checkpoints=sft.keep_checkpoints, log_every=sft.log_every,
        bias_update_gamma=sft.bias_update_gamma, mtp_weight=sft.mtp_weight, sample_tokens=0,
    )


def task_pairs(task: Task, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    """(question, reference response) pairs: the task's reasoning (empty if it has none) and answer."""
    return [(ex.prompt, render_response(ex.reasoning or "", ex.answer)) for ex in task.examples(split, n, seed)]


def build_sft_data(tokenizer: Any, train_pairs: Sequence[tuple[str, str]], val_pairs: Sequence[tuple[str, str]],
                   sft: SFTConfig, instruction: str, source: str = "sft", response_prefix: str = "") -> SFTData:
    tok = lambda pairs: [tokenize_pair(tokenizer, q, r, instruction, response_prefix) for q, r in pairs]  # noqa: E731
    return SFTData(tokenizer, tok(train_pairs), tok(val_pairs), sft.seq_len, packing=sft.packing,
                   completion_only=sft.completion_only_loss, source=source)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE over the labelled positions; a batch with none gives a zero that still has a graph.

    Sum, then divide by the clamped count: no host sync to test for an all-ignored batch (a plain
    ``reduction="mean"`` would give NaN there)."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def masked_val_loss(model: nn.Module, logits_fn: Callable[[torch.Tensor], torch.Tensor], data: SFTData,
                    tc: TrainConfig, device: torch.device, *, max_batches: Optional[int] = None,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean CE over the assistant tokens of the first `eval_batches` validation batches (NaN if none).

    `model` is switched to eval mode for the pass; `logits_fn` maps input ids to logits (the model
    itself, or `Policy.logits` for a transformers model)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in data.val_batches(tc.eval_batch_size or tc.batch_size, tc.seq_len,
                                      max_batches=max_batches or tc.eval_batches):
            inputs, labels = split_masked(batch.to(device))
            n = int((labels != IGNORE_INDEX).sum())
            if not n:
                continue
            with autocast():
                logits = logits_fn(inputs)
            total += float(masked_cross_entropy(logits, labels, reduction="sum"))
            count += n
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


class SFTTrainer(Trainer):
    """The trainer, initialised from `init_from` (an HF-format frugalm checkpoint), on masked SFT batches."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, init_from: str | Path, data: SFTData,
                 resume: bool | str | Path = False, overwrite: bool = False, progress: Optional[bool] = None,
                 log_fn=None):
        super().__init__(cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress, data=data, log_fn=log_fn)
        self.init_from = Path(init_from)
        if self.resumed_from is None:
            self._load_initial_weights()

    def _load_initial_weights(self) -> None:
        from frugalm.model.checkpoint import from_pretrained

        with_mtp = len(self.model.mtp) > 0
        source = from_pretrained(self.init_from, device=self.device, dtype=torch.float32, with_mtp=with_mtp)
        missing, unexpected = self.model.load_state_dict(source.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.startswith("mtp.")]:
            raise ValueError(f"{self.init_from} does not match the SFT model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if missing:
            self.say(f"{self.init_from} has no MTP weights; the MTP module starts from random weights")
        del source

    # The trainer's loss with assistant-only labels: split off the mask, CE over labelled positions.
    split_batch = staticmethod(split_masked)
    cross_entropy = staticmethod(masked_cross_entropy)

    def evaluate(self, max_batches: Optional[int] = None) -> float:
        """Mean CE over the assistant tokens of the validation examples."""
        return masked_val_loss(self.model, self.model, self.data, self.cfg.train, self.device,
                               max_batches=max_batches, autocast=self.autocast)


def sft_run_config(init_from: str | Path, sft: SFTConfig) -> RunConfig:
    from frugalm.model.config import ModelConfig

    model_cfg = ModelConfig.from_json(Path(init_from) / "config.json")
    return RunConfig(model=model_cfg, train=train_config_for(sft))


def run_sft(init_from: str | Path, out_dir: str | Path, data: SFTData, sft: SFTConfig, *, resume: bool = False,
            overwrite: bool = False, progress: Optional[bool] = None, handle_signals: bool = False,
            stop_after: Optional[int] = None, export_to: Optional[str | Path] = None) -> TrainSummary:
    """SFT a frugalm checkpoint; the model lands in ``OUT/final`` (or `export_to`) with its tokenizer.

    `stop_after` pauses after that step with a checkpoint (resume continues the same schedule): the R1
    pipeline uses it to check held-out accuracy between chunks.
    """
    cfg = sft_run_config(init_from, sft)
    trainer = SFTTrainer(cfg, out_dir, init_from=init_from, data=data, resume=resume, overwrite=overwrite,
                         progress=progress)
    summary = trainer.fit(stop_after=stop_after, handle_signals=handle_signals)
    if export_to is not None and summary.final_model is not None:
        import shutil

        target = Path(export_to)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(summary.final_model, target)
        summary = dataclasses.replace(summary, final_model=str(target))
    return summary


def export_current(init_from: str | Path, out_dir: str | Path, data: SFTData, sft: SFTConfig, target: str | Path) -> Path:
    """Export the newest checkpoint of a (paused) SFT run as an HF folder."""
    cfg = sft_run_config(init_from, sft)
    trainer = SFTTrainer(cfg, out_dir, init_from=init_from, data=data, resume=True, progress=False)
    path = trainer.export(target)
    if trainer.metrics is not None:
        trainer.metrics.close()
    return path
