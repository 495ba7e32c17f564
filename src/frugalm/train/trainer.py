"""The pre-training loop: data -> DeepSeek-V3 (+ MTP, balancing) -> AdamW, with exact, crash-safe resume.

`train(run_cfg, out_dir, resume=False)` is the whole job; `Trainer` exposes its parts (`train_step`,
`evaluate`, `save_checkpoint`, `load_checkpoint`, `export`) for code that builds on them (post-training,
FP8, distributed). One optimizer step:

1. for each of `grad_accum` micro-batches ``[B, T+1]``: forward with MTP under autocast; loss =
   CE(main) + λ·mean_k CE(depth k) + α·Σ sequence-balance losses; backward of loss / grad_accum;
   per-expert token counts summed;
2. a NaN/Inf loss or gradient norm skips the update (counted; too many in a row stop the run);
3. clip, AdamW step (LR from a pure function of the step), then the aux-loss-free bias update
   ``b += γ·sign(mean_load − load)`` of every MoE router with that step's counts.

Everything that influences the next step (weights, moments, router biases, step, data position, RNG
states) is in the checkpoint, so on CPU a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import frugalm
from frugalm.config import ConfigError
from frugalm.train import checkpoint as ckpt
from frugalm.train.balance import ExpertLoadTracker, load_imbalance, moe_modules, update_expert_bias
from frugalm.train.config import RunConfig, run_config_from_dict
from frugalm.train.losses import cross_entropy, eval_cross_entropy_sum, next_token_losses
from frugalm.train.metrics import MetricsLogger, plot_run, write_above_progress
from frugalm.train.optim import AdamW, clip_gradients_
from frugalm.train.schedule import lr_at


CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a NaN/Inf loss or gradient; the run was stopped."""


@dataclass
class StepResult:
    """What one optimizer step did (losses are means over its micro-batches)."""

    step: int  # optimizer steps completed, this one included
    loss: float  # main next-token cross-entropy
    mtp_loss: float  # mean over MTP depths (nan without MTP)
    balance_loss: float  # α-weighted sequence-wise balance loss (0 when α = 0)
    total_loss: float  # what was differentiated
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # label tokens in this step
    skipped: bool
    counts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class TrainSummary:
    out_dir: str
    steps: int
    tokens: int
    wall_s: float  # this invocation, setup included
    train_s: float  # time inside optimizer steps, all invocations of the run
    tokens_per_s: float  # tokens / train_s
    final_loss: Optional[float]
    final_val_loss: Optional[float]
    first_val_loss: Optional[float]
    skipped_steps: int
    losses: dict[int, float]  # step -> main loss, for the steps run in this invocation
    val_losses: dict[int, float]  # step -> val loss, this invocation
    checkpoint: Optional[str]
    final_model: Optional[str]
    plot: Optional[str]
    sample: Optional[str]
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        d["val_losses"] = {str(k): v for k, v in self.val_losses.items()}
        return d


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda, mps, xpu or cpu (first available); anything else must name an available device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"train.device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but this torch has no usable CUDA device; use 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device = {name!r} but MPS is not available; use 'auto' or 'cpu'")
    return device


# ---------------------------------------------------------------------------------------- RNG state
def capture_rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of the torch, numpy and Python RNGs, for the checkpoint (no pickle)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def restore_rng_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if device.type == "cuda":
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states])
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------- model tensors
def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's persistent state without aliases (tied weights stored once), plus alias -> stored name."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, aliases


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameter storage this process holds (meta tensors, e.g. other pipeline stages, are 0;
    an FSDP parameter counts its local shard)."""
    from torch.distributed.tensor import DTensor

    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())  # FSDP: own shard
    return sum(t.numel() * t.element_size() for t in local if t.device.type != "meta")


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    state = dict(tensors)
    for alias, source in aliases.items():
        if source in state:
            state[alias] = state[source]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise ckpt.CheckpointError(
            "checkpoint does not fit this model (was [model] changed?): " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Owns the model, optimizer, data stream and run folder of one training run.

    Subclass hooks: `compute_loss` (another objective on the same loop), `reduce_counts` (sum expert
    loads over data-parallel ranks), `is_main` (which rank writes files and logs).
    """

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool | str | Path = False,
        overwrite: bool = False,
        progress: Optional[bool] = None,
        data: Any = None,
        log_fn: Optional[Callable[[str], None]] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.t_start = time.perf_counter()
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / CHECKPOINT_DIR
        self.progress = progress
        self._log_fn = log_fn
        # Data-parallel position: shards the data stream; only rank 0 writes files and logs.
        self.rank, self.world_size = rank, world_size
        tc = cfg.train
        # Under torchrun (or a [parallel] layout asking for more than one rank): join the process group.
        # A plain single process keeps mesh = None and the exact single-process path below.
        self.mesh = None
        self.pipe = None  # the pipeline part of the run when parallel.pp > 1 (`_setup_pipeline`)
        if cfg.parallel.pp > 1 and cfg.parallel.dp_mode == "fsdp" and cfg.model.tie_word_embeddings:
            raise ConfigError("[parallel] pp > 1 with dp_mode = 'fsdp' does not support model.tie_word_embeddings: "
                              "the embedding and the LM head are separate FSDP units of the pipeline stages "
                              "(see frugalm.parallel.pipeline_fsdp); use dp_mode = 'ddp' or untied weights")
        if cfg.parallel.pp > 1 and cfg.parallel.dp_mode == "fsdp" and cfg.pipeline.overlap:
            raise ConfigError("[pipeline] overlap = true needs [parallel] dp_mode = 'ddp': FSDP2's parameter "
                              "gathering hooks are not safe to run from the forward and the backward thread at once")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel.dp > 1 or cfg.parallel.ep > 1 \
                or cfg.parallel.pp > 1:
            from frugalm.parallel.mesh import init_distributed

            self.mesh = init_distributed(cfg.parallel, resolve_device(tc.device),
                                         pipeline_overlap=cfg.pipeline.overlap)
            self.rank, self.world_size = self.mesh.dp_ep_rank, self.mesh.data_parallel_size
        self._check_out_dir(resume, overwrite)
        self._barrier()  # rank 0 has cleared an --overwrite run before anyone goes on
        self.out_dir.mkdir(parents=True, exist_ok=True)

        self.device = resolve_device(tc.device) if self.mesh is None else self.mesh.device
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        self.autocast_dtype = torch.bfloat16 if tc.precision == "bf16" else None

        # ---- data
        from frugalm.data.prepare import prepare_data

        if data is None and not self.is_main:
            self._barrier()  # rank 0 prepares (trains the tokenizer) first; the others then read its cache
        self.data = data if data is not None else prepare_data(cfg.data, self.out_dir if self.is_main else None,
                                                               progress=progress)
        if data is None and self.is_main:
            self._barrier()
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({self.data.vocab_size}); set model.vocab_size >= {self.data.vocab_size}"
            )
        self.tokenizer = self.data.load_tokenizer()
        self.sampler = self.data.train_sampler(tc.batch_size, tc.seq_len, tc.seed, rank=self.rank,
                                               world_size=self.world_size)

        # ---- model
        from frugalm.model.transformer import DeepSeekV3

        with torch.device(self.device):
            self.model = DeepSeekV3(cfg.model)
        self.model.init_weights(tc.seed)
        self.model = self._apply_fp8(self.model)
        if self.mesh is not None:  # after init on the full model (same seed everywhere), before AdamW
            from frugalm.parallel.parallelize import parallelize

            # pp x FSDP: only the held stages are sharded, after the pipeline split (`_setup_pipeline`)
            self.model = parallelize(self.model, self.mesh, cfg.parallel,
                                     data_parallel=not (self.mesh.pp > 1 and cfg.parallel.dp_mode == "fsdp"))
            self.say(f"parallel: {self.mesh.describe()}")
        self.model.train()
        self.moe = moe_modules(self.model)
        self.loads = ExpertLoadTracker(self.moe)
        if self.mesh is not None and self.mesh.pp > 1:
            self._setup_pipeline()
        named_params = list(self.model.named_parameters())  # after FSDP: its sharded parameters
        if self.pipe is not None:
            held = self.pipe.replicas.held_names()
            named_params = [(n, p) for n, p in named_params if n in held]  # only this rank's stages
        self.optimizer = AdamW(
            named_params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
            weight_decay=tc.weight_decay, bf16_moments=tc.bf16_moments,
        )
        self.params = [p for _, p in named_params if p.requires_grad]
        if tc.compile:
            self._compile_blocks()

        # ---- run state (all of it goes into checkpoints)
        self.step = 0
        self.tokens = 0
        self.train_time = 0.0
        self.consecutive_nonfinite = 0
        self.skipped_steps = 0
        self.last_val_loss: Optional[float] = None
        self.resumed_from: Optional[Path] = None
        if resume:
            self._resume(resume)
        if self.is_main:
            (self.out_dir / CONFIG_FILE).write_text(cfg.to_toml())
        self.metrics = MetricsLogger(self.out_dir, resume_step=self.step if self.resumed_from else None) \
            if self.is_main else None
        self._flops_per_token: Optional[float] = None
        self._peak: Optional[float] = None
        self._stop_signal: Optional[int] = None

    # ------------------------------------------------------------------ hooks
    @property
    def is_main(self) -> bool:
        # under pp, rank (the data shard) is 0 on every pipeline stage: only the first stage's writes
        return self.rank == 0 and (self.mesh is None or self.mesh.pp_rank == 0)

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Sum per-expert counts over data-parallel ranks (identity on one process; under a mesh the step's
        counts are already reduced over ``dp_ep`` in `train_step`)."""
        return counts

    def _group(self, axis: str = "dp_ep"):
        return self.mesh.group(axis) if self.mesh is not None else None

    def _barrier(self) -> None:
        if self.mesh is not None and self.mesh.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def say(self, message: str) -> None:
        if not self.is_main:
            return
        (self._log_fn or write_above_progress)(message)

    # ------------------------------------------------------------------ setup helpers
    def _check_out_dir(self, resume: bool | str | Path, overwrite: bool) -> None:
        ckpt.prepare_run_dir(self.out_dir, self.ckpt_root, resume=resume, overwrite=overwrite, what="a training run",
                             clear=(FINAL_DIR, "tb"), delete=self.is_main)

    def _apply_fp8(self, model: nn.Module) -> nn.Module:
        """FP8 training (DeepSeek-V3 §3.3) is applied from outside the model, when [fp8] enabled."""
        if not self.cfg.fp8.enabled:
            return model
        from frugalm.fp8.apply import apply_fp8, plan_fp8

        self.say(plan_fp8(model, self.cfg.fp8).describe().splitlines()[0])
        return apply_fp8(model, self.cfg.fp8)

    def _compile_blocks(self) -> None:
        """torch.compile attention and dense FFNs block by block (in place: parameter names are unchanged).

        MoE blocks stay eager: dynamo's fake-tensor rule for torch._grouped_mm (torch 2.13) rejects the
        FP32 operands the experts use, and their token dispatch is data-dependent anyway.
        """
        from frugalm.model.moe import MoE

        blocks = list(self.model.model.layers) + [m.block for m in self.model.mtp]
        for block in blocks:
            block.self_attn.compile()
            if not isinstance(block.mlp, MoE):
                block.mlp.compile()

    def _setup_pipeline(self) -> None:
        """Split the model into `[pipeline]` stages over the mesh's ``pp`` axis (see `frugalm.parallel.pipeline_model`)."""
        import torch.distributed as dist

        from frugalm.parallel.data_parallel import restrict_gradient_sync, set_gradient_sync
        from frugalm.parallel.pipeline import PipelineRunner
        from frugalm.parallel.pipeline_model import PipelineReplicas, split_model
        from frugalm.parallel.schedules import ScheduleError

        tc, pc, mesh = self.cfg.train, self.cfg.pipeline, self.mesh
        try:
            schedule = pc.build(mesh.pp)
        except ScheduleError as e:
            raise ConfigError(f"[pipeline] {e}") from None
        if tc.batch_size % pc.micro_batches:
            raise ConfigError(f"[pipeline] train.batch_size ({tc.batch_size}) must be a multiple of "
                              f"pipeline.micro_batches ({pc.micro_batches}): each batch is cut into micro-batches")
        stages = split_model(self.model, schedule, mtp_weight=tc.mtp_weight, autocast=self.autocast)
        mine = {s: stages[s] for s in schedule.stages_on(mesh.pp_rank)}
        embed = self.model.model.embed_tokens.weight
        runner = PipelineRunner(schedule, mine, hidden_shape=(tc.batch_size // pc.micro_batches, tc.seq_len,
                                                              self.cfg.model.hidden_size),
                                hidden_dtype=embed.dtype, device=self.device, group=mesh.group("pp"),
                                timeout_s=pc.timeout_s, overlap=pc.overlap)
        replicas = PipelineReplicas(self.model, stages, schedule, mesh.pp_rank, mesh.group("pp"))
        # This rank keeps only its stages' weights: the others' storage is freed (parameters move to meta).
        replicas.release_unheld()
        fsdp = None
        if self.cfg.parallel.dp_mode == "fsdp":
            # FSDP2 over dp x ep for the held stages only; one reduce-scatter per unit and step
            from frugalm.parallel.pipeline_fsdp import shard_pipeline_stages

            fsdp = shard_pipeline_stages(self.model, mine, mesh, schedule, self.cfg.parallel.reshard_after_forward)
            replicas.rebind(self.model, (mesh.data_parallel_size, mesh.dp_ep_rank))
            self.say(f"pipeline: FSDP2 over dp x ep = {mesh.data_parallel_size} ranks per stage, "
                     f"reshard_after_forward={fsdp.reshard_after_forward}")
        else:
            # Gradients are reduced over dp x ep once per optimizer step, after the pipeline (DDP hooks off),
            # and only for the parameters this rank holds.
            set_gradient_sync(self.model, False)
            restrict_gradient_sync(self.model, set(replicas.held))
        last = next((m for m in mine.values() if m.last), None)
        self.pipe = _Pipeline(schedule, stages, mine, runner, replicas, last, fsdp)
        self.say(f"pipeline: {schedule.name}, {mesh.pp} ranks, {schedule.num_stages} stages, "
                 f"{pc.micro_batches} micro-batches{', F&B overlapped on two threads' if pc.overlap else ''}; "
                 f"decoder layers per stage "
                 f"{[len(s.layer_ids) for s in stages]} (+ MTP/head on the last)")
        held = torch.tensor([parameter_bytes(self.model)], dtype=torch.int64, device=self.device)
        per_rank = [torch.zeros_like(held) for _ in range(mesh.pp)]
        dist.all_gather(per_rank, held, group=mesh.group("pp"))
        whole = sum(p.numel() * p.element_size() for p in replicas.names)
        self.say("pipeline: parameter MB held per pp rank "
                 f"{[round(int(b.item()) / 2**20, 3) for b in per_rank]} (whole model {whole / 2**20:.3f} MB)")

    def _resume(self, resume: bool | str | Path) -> None:
        if resume is True:
            if self.mesh is not None and not self.is_main:
                self._barrier()  # rank 0 cleans up and quarantines first; the others then find the same one
                path = ckpt.resume_checkpoint(self.ckpt_root, self.say, clean=False)
            else:
                path = ckpt.resume_checkpoint(self.ckpt_root, self.say)
                if self.mesh is not None:
                    self._barrier()
            if path is None:
                return
        else:
            path = Path(resume)
        self.load_checkpoint(path)
        self.say(f"resume: continuing from {path} (step {self.step}, {self.tokens:,} tokens)")

    # ------------------------------------------------------------------ one step
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def split_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T+1]`` tokens -> (inputs, labels); SFT overrides it to mask non-assistant labels."""
        return batch[:, :-1], batch[:, 1:]

    cross_entropy = staticmethod(cross_entropy)  # SFT: over labelled positions only

    def compute_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to differentiate for one micro-batch ``[B, T+1]`` and its parts (detached).

        main: next-token CE; mtp: λ-free mean over depths of CE against labels[:, k:]; balance: α·Σ L_bal.
        """
        inputs, labels = self.split_batch(batch)
        with self.autocast():
            logits, mtp_logits = self.model.forward_with_mtp(inputs)
        total, parts = next_token_losses(logits, mtp_logits, labels, self.cfg.train.mtp_weight, self.cross_entropy)
        balance = self.loads.balance_loss(self.cfg.model.aux_loss_alpha)
        if balance is not None:
            total = total + balance
            parts["balance_loss"] = balance.detach()
        return total, parts

    def next_batch(self) -> torch.Tensor:
        return next(self.sampler).to(self.device, non_blocking=True)

    def _pipeline_step(self) -> tuple[list[str], torch.Tensor, float, dict[str, torch.Tensor], int]:
        """Forward+backward of `grad_accum` batches through the pipeline, then the cross-rank reductions.

        Each ``[batch_size, T+1]`` batch is cut into ``pipeline.micro_batches`` micro-batches; the loss
        is their mean, weighted ``1/grad_accum``, which is the single-process step's loss exactly.
        """
        import torch.distributed as dist

        from frugalm.parallel.data_parallel import clip_grad_norm_, sync_gradients
        from frugalm.parallel.expert_parallel import all_reduce_counts

        tc, pipe, mesh = self.cfg.train, self.pipe, self.mesh
        M = pipe.schedule.num_micro
        for stage in pipe.mine.values():
            stage.reset()
            stage.grad_scale = 1.0 / (M * tc.grad_accum)
        criterion = pipe.last.loss if pipe.last is not None else _no_loss
        tokens = 0
        if pipe.fsdp is not None:
            pipe.fsdp.begin_step()
        for _ in range(tc.grad_accum):
            batch = self.next_batch()
            pipe.runner.step(batch[:, :-1], batch, criterion, loss_scale=1.0 / tc.grad_accum)
            tokens += batch.shape[0] * (batch.shape[1] - 1)
        if pipe.fsdp is not None:  # one reduce-scatter per FSDP unit: sharded gradients from here on
            pipe.fsdp.finish_step()
        # losses: each (micro-batch, stage) was computed on exactly one rank -> sum over pp, mean over dp x ep
        keys = ["loss"] + (["mtp_loss"] if len(self.model.mtp) and tc.seq_len > 1 else []) + \
            (["balance_loss"] if self.cfg.model.aux_loss_alpha > 0 and self.moe else [])
        zero = torch.zeros((), device=self.device)
        sums = torch.stack([sum((s.sums.get(k, zero) for s in pipe.mine.values()), zero) for k in keys])
        sums = sums.float() / (M * tc.grad_accum)
        for axis in ("pp", "dp_ep"):
            if self._group(axis) is not None:
                dist.all_reduce(sums, group=self._group(axis))
        if self._group("dp_ep") is not None:
            sums = sums / self.mesh.data_parallel_size
        parts = dict(zip(keys, sums))
        total = parts["loss"] + tc.mtp_weight * parts.get("mtp_loss", zero) + parts.get("balance_loss", zero)
        keys.append("total_loss")
        stacked = torch.cat([sums, total.reshape(1)])
        # gradients: shared stage parameters over pp, then the usual average over dp x ep
        pipe.replicas.reduce_shared_grads()
        sync_gradients(self.model)
        grad_norm = clip_grad_norm_(self.model, tc.grad_clip, mesh, pipe.replicas.copies).item()
        # expert loads of every MoE block: summed over this rank's micro-batches, then over pp and dp x ep
        local: dict[str, torch.Tensor] = {}
        for stage in pipe.mine.values():
            for name, c in stage.counts.items():
                local[name] = local[name] + c if name in local else c
        full = {name: local.get(name, torch.zeros(m.cfg.n_routed_experts, dtype=torch.int64, device=self.device))
                for name, m in self.moe.items()}
        counts = all_reduce_counts(all_reduce_counts(full, self._group("pp")), self._group("dp_ep"))
        return keys, stacked, grad_norm, counts, tokens * self.mesh.data_parallel_size

    def train_step(self) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches (or a skipped one if anything is non-finite)."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.pipe is not None:
            return self._finish_step(lr, *self._pipeline_step())
        self.loads.reset()
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for i in range(tc.grad_accum):
            batch = self.next_batch()
            total, parts = self.compute_loss(batch)
            self.loads.collect()
            if self.mesh is not None and i < tc.grad_accum - 1:
                from frugalm.parallel.data_parallel import no_gradient_sync

                with no_gradient_sync(self.model):  # accumulate locally; the last backward reduces
                    (total / tc.grad_accum).backward()
            else:
                (total / tc.grad_accum).backward()
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            parts["total_loss"] = total.detach()
            for k, v in parts.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
        keys = list(sums)
        stacked = torch.stack([sums[k] for k in keys]) / tc.grad_accum
        if self.mesh is not None:
            from frugalm.parallel.data_parallel import clip_grad_norm_
            from frugalm.parallel.expert_parallel import all_reduce_counts

            # Every rank logs the same (global-batch mean) losses and takes the same skip decision.
            if self._group() is not None:
                import torch.distributed as dist

                dist.all_reduce(stacked, group=self._group())
                stacked = stacked / self.mesh.data_parallel_size
            tokens *= self.mesh.data_parallel_size
            grad_norm = clip_grad_norm_(self.model, tc.grad_clip, self.mesh).item()
            counts = all_reduce_counts(self.loads.counts, self._group())
        else:
            grad_norm = clip_gradients_(self.params, tc.grad_clip).item()
            counts = dict(self.loads.counts)
        return self._finish_step(lr, keys, stacked, grad_norm, counts, tokens)

    def _finish_step(self, lr: float, keys: list[str], stacked: torch.Tensor, grad_norm: float,
                     counts: dict[str, torch.Tensor], tokens: int) -> StepResult:
        """Skip-or-step, bias update and bookkeeping, once the step's gradients and losses are final."""
        tc = self.cfg.train
        # One device sync for all the scalars of the step.
        values = dict(zip(keys, stacked.tolist()))
        finite = math.isfinite(values["total_loss"]) and math.isfinite(grad_norm)
        self.step += 1
        self.tokens += tokens
        if finite:
            self.optimizer.step()
            update_expert_bias(self.moe, counts, tc.bias_update_gamma, reduce=self.reduce_counts)
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        result = StepResult(
            step=self.step, loss=values["loss"], mtp_loss=values.get("mtp_loss", float("nan")),
            balance_loss=values.get("balance_loss", 0.0), total_loss=values["total_loss"], grad_norm=grad_norm,
            lr=lr, tokens=tokens, skipped=not finite, counts=counts,
        )
        if not finite:
            self.say(f"step {self.step}: non-finite loss {values['total_loss']} / grad norm {grad_norm}; "
                     f"update skipped ({self.consecutive_nonfinite} in a row)")
            if self.consecutive_nonfinite >= tc.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_nonfinite} consecutive steps (up to step {self.step}) had a NaN/Inf loss or "
                    f"gradient (train.max_nonfinite_steps = {tc.max_nonfinite_steps}); the last valid checkpoint is "
                    f"in {self.ckpt_root}. Lower train.lr, raise train.warmup_steps, use train.precision = 'fp32' "
                    f"or check the data"
                )
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_batches: Optional[int] = None) -> float:
        """Mean next-token cross-entropy over the first `eval_batches` validation batches."""
        tc = self.cfg.train
        batches = self.data.val_batches(tc.eval_batch_size or tc.batch_size, tc.seq_len,
                                        max_batches=max_batches or tc.eval_batches,
                                        rank=self.rank, world_size=self.world_size)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        n_batches = len(batches)
        if self._group() is not None:
            import torch.distributed as dist

            # Under EP every forward is a collective: all ranks run the same number of batches.
            n = torch.tensor(n_batches, dtype=torch.int64, device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self._group())
            n_batches = int(n.item())
        try:
            for i, batch in enumerate(batches):
                if i >= n_batches:
                    break
                batch = batch.to(self.device)
                if self.pipe is not None:  # forward-only through the stages; the loss on the last one
                    loss_sum, n = self._pipeline_eval(batch)
                    total += loss_sum
                    count += n
                    continue
                with self.autocast():
                    logits = self.model(batch[:, :-1])
                total += eval_cross_entropy_sum(logits, batch[:, 1:])
                count += batch[:, 1:].numel()
        finally:
            self.model.train(was_training)
        if self._group("pp") is not None:  # only the last stage's rank has the loss: sum over the pipeline
            import torch.distributed as dist

            both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
            dist.all_reduce(both, group=self._group("pp"))
            total, count = both[0], int(both[1].item())
        if self._group() is not None:
            import torch.distributed as dist

            both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
            dist.all_reduce(both, group=self._group())
            total, count = both[0], int(both[1].item())
        return float(total.item() / max(1, count))

    def _pipeline_eval(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        from frugalm.parallel.pipeline_model import pipeline_eval_loss

        pipe = self.pipe
        try:
            return pipeline_eval_loss(pipe.mine, pipe.schedule, self.mesh.pp_rank, self._group("pp"), batch,
                                      hidden_dtype=pipe.runner.hidden_dtype, hidden_size=self.cfg.model.hidden_size)
        finally:
            if pipe.fsdp is not None:  # forward-only: free what FSDP gathered
                pipe.fsdp.reshard()

    # ------------------------------------------------------------------ checkpoints
    def _pipeline_full_state(self, optimizer_tensors: Optional[dict[str, torch.Tensor]] = None
                             ) -> tuple[Optional[dict[str, torch.Tensor]], Optional[dict[str, torch.Tensor]]]:
        """Under pp: the full model state dict (tied aliases included) and, if given, the full optimizer
        state, gathered onto the writing rank (`is_main`); (None, None) on every other rank.

        Each parameter comes from the first pipeline rank holding it (unsharded over ep there first),
        buffers from pipeline rank 0; the pipeline ranks of the first dp x ep slice send one after the other.
        """
        from frugalm.parallel.checkpoint import full_optimizer_state, full_tensors

        replicas = self.pipe.replicas
        owned = replicas.owned_names()
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        state = {k: v for k, v in self.model.state_dict().items()
                 if k in owned or (k not in params and self.mesh.pp_rank == 0)}
        model_sd = full_tensors(state, self.model, self.mesh, to_cpu=True)  # collectives over ep
        optim = None
        if optimizer_tensors is not None:
            optim = full_optimizer_state({k: v for k, v in optimizer_tensors.items() if k.rsplit(".", 1)[0] in owned},
                                         self.model, self.mesh)
        if self.mesh.dp_ep_rank != 0:  # the writer's pipeline group gathers; the others are done
            return None, None
        model_sd = replicas.gather_to_first(model_sd)
        if optim is not None:
            optim = replicas.gather_to_first(optim)
        if not self.is_main:
            return None, None
        for alias, name in self._tied_aliases().items():  # tied weights: the alias gets the stored tensor
            if name in model_sd:
                model_sd[alias] = model_sd[name]
        return model_sd, optim

    def _tied_aliases(self) -> dict[str, str]:
        """{alias: first name} of tied parameters, by identity (FSDP's DTensors have no storage to compare)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        return aliases

    def checkpoint_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """(tensor files, JSON files) that fully describe the run at the current step.

        Under a mesh every rank must call it (collectives); under pp only the writing rank (`is_main`)
        gets the model and optimizer tensors, the others get empty dicts for them."""
        optimizer_tensors = self.optimizer.tensor_state()
        if self.mesh is None:
            model_sd, aliases = model_tensors(self.model)
        else:  # collectives: every rank gathers the single-process (full) tensors
            from frugalm.parallel.checkpoint import full_optimizer_state, full_state_dict

            aliases = self._tied_aliases()
            if self.pipe is not None:  # gathered stage by stage onto the writing rank only
                full, optimizer_tensors = self._pipeline_full_state(optimizer_tensors)
                full, optimizer_tensors = full or {}, optimizer_tensors or {}
            else:
                full = full_state_dict(self.model, self.mesh, to_cpu=True)
                optimizer_tensors = full_optimizer_state(optimizer_tensors, self.model, self.mesh)
            model_sd = {k: v for k, v in full.items() if k not in aliases}
        rng_tensors, rng_json = capture_rng_state(self.device)
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "train_time_s": self.train_time,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "skipped_steps": self.skipped_steps,
            "last_val_loss": self.last_val_loss,
            "sampler": self.sampler.state_dict(),
            "optimizer": self.optimizer.scalar_state(),
            "model_aliases": aliases,
            "rng": rng_json,
            "config": self.cfg.to_dict(),
            "frugalm_version": frugalm.__version__,
            "torch_version": torch.__version__,
        }
        tensors = {"model": model_sd, "optimizer": optimizer_tensors, "rng": rng_tensors}
        return tensors, {"state": state}

    def save_checkpoint(self) -> Optional[Path]:
        """Write the run state (rank 0 only: with replicated weights one copy is the whole state; under a
        mesh every rank takes part in gathering the full state, then rank 0 writes it)."""
        if not self.is_main and self.mesh is None:
            return None
        tensors, objects = self.checkpoint_state()
        if not self.is_main:
            return None
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, tensors, objects, keep=self.cfg.train.keep_checkpoints)
        if self.metrics is not None:
            self.metrics.sync()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, router biases, data position, counters and RNGs from `path`."""
        loaded = ckpt.load_checkpoint(path, device=self.device)
        state = loaded.json.get("state")
        if not isinstance(state, dict) or not {"model", "optimizer", "rng"} <= set(loaded.tensors):
            raise ckpt.CheckpointError(f"checkpoint {path} is not a frugalm training checkpoint (files missing)")
        self._check_compatible(state.get("config", {}), path)
        optimizer_tensors = loaded.tensors["optimizer"]
        if self.mesh is None:
            load_model_tensors(self.model, loaded.tensors["model"], state.get("model_aliases", {}))
        else:  # a full (single-process) state: each rank keeps its shard, whatever layout saved it
            from frugalm.parallel.checkpoint import load_full_state_dict, local_optimizer_state

            full = dict(loaded.tensors["model"])
            for alias, source in state.get("model_aliases", {}).items():
                if source in full:
                    full[alias] = full[source]
            try:
                load_full_state_dict(self.model, full, self.mesh)
                if self.pipe is not None:  # this rank's stages only
                    held = self.pipe.replicas.held_names()
                    optimizer_tensors = {k: v for k, v in optimizer_tensors.items()
                                         if k.rsplit(".", 1)[0] in held}
                optimizer_tensors = local_optimizer_state(optimizer_tensors, self.model, self.mesh)
            except ValueError as e:
                raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None
        try:
            self.optimizer.load_tensor_state(optimizer_tensors, state["optimizer"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: {e}") from None
        self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(loaded.tensors["rng"], state["rng"], self.device)
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.train_time = float(state.get("train_time_s", 0.0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_val_loss = state.get("last_val_loss")
        self.resumed_from = Path(path)

    def _check_compatible(self, saved: dict[str, Any], path: str | Path) -> None:
        """Refuse a checkpoint of another architecture; say which [train]/[data] settings changed."""
        if not saved:
            return
        try:
            saved_cfg = run_config_from_dict(saved)
        except ConfigError as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: its saved config is unreadable ({e})") from None
        mine = self.cfg.to_dict()
        theirs = saved_cfg.to_dict()
        model_diff = sorted(k for k in set(mine["model"]) | set(theirs["model"])
                            if mine["model"].get(k) != theirs["model"].get(k))
        if model_diff:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was made with a different [model] ({', '.join(model_diff)}); "
                "resume with the run's own config.toml"
            )
        for section in ("train", "data"):
            changed = sorted(k for k in mine[section] if mine[section].get(k) != theirs[section].get(k))
            if changed:
                self.say(f"resume: [{section}] differs from the checkpoint's run in: {', '.join(changed)}")

    # ------------------------------------------------------------------ final artefacts
    def export(self, path: Optional[str | Path] = None) -> Path:
        """Hugging Face folder (config.json, safetensors incl. MTP, tokenizer), written atomically."""
        final = Path(path) if path else self.out_dir / FINAL_DIR
        tmp = final.with_name(f".tmp-{final.name}")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.mesh is None:
            self.model.save_pretrained(tmp)
        elif self.pipe is not None:  # the stages' weights gathered onto rank 0, which writes the plain model
            from frugalm.parallel.checkpoint import plain_model

            state, _ = self._pipeline_full_state()
            if not self.is_main:
                return final
            plain_model(self.cfg.model, state).save_pretrained(tmp)
        else:  # every rank gathers the full weights; rank 0 writes the plain model's HF folder
            from frugalm.parallel.checkpoint import export_pretrained

            export_pretrained(self.model, self.mesh, tmp)
            if not self.is_main:
                return final
        self.tokenizer.save(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": self.tokenizer.bos_id, "eos_token_id": self.tokenizer.eos_id,
            "pad_token_id": self.tokenizer.pad_id, "do_sample": True,
            "temperature": self.cfg.train.sample_temperature, "top_k": self.cfg.train.sample_top_k,
        }, indent=2) + "\n")
        from frugalm.train.checkpoint import replace_dir

        return replace_dir(tmp, final)

    def sample(self) -> str:
        from frugalm.train.generate import generate_text

        tc = self.cfg.train
        return generate_text(self.model, self.tokenizer, tc.sample_prompt, max_new_tokens=tc.sample_tokens,
                             temperature=tc.sample_temperature, top_k=tc.sample_top_k, seed=tc.seed)

    # ------------------------------------------------------------------ the loop
    def _perf(self, tokens: int, seconds: float) -> tuple[float, float]:
        """(tokens/s, MFU) of a measured interval."""
        if seconds <= 0:
            return float("nan"), float("nan")
        tps = tokens / seconds
        if self._flops_per_token is None:
            from frugalm.plan.flops import training_flops_per_token
            from frugalm.train.perf import peak_flops

            self._flops_per_token = training_flops_per_token(self.cfg.model, self.cfg.train.seq_len)
            self._peak = peak_flops(self.device, self.autocast_dtype or torch.float32, self.out_dir)
        return tps, tps * self._flops_per_token / self._peak

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT/SIGTERM stop the run at the next step boundary with a checkpoint; a second SIGINT aborts."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.say(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                     f"(Ctrl-C again to abort without one)")

        for s in previous:
            signal.signal(s, handler)

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)
        return restore

    def fit(self, *, stop_after: Optional[int] = None, checkpoint_on_stop: bool = True,
            handle_signals: bool = False) -> TrainSummary:
        """Train to `max_steps` (or `stop_after`), evaluating, logging and checkpointing on schedule.

        `stop_after` ends the call after that step; with `checkpoint_on_stop=False` nothing is written
        at the stop, which is how tests simulate a crash. At `max_steps` the run writes its final
        checkpoint, the HF export in ``OUT/final``, the PNG, ``summary.json`` and a sample.
        """
        from tqdm.auto import tqdm

        tc = self.cfg.train
        summary_losses: dict[int, float] = {}
        val_losses: dict[int, float] = {}
        first_val: Optional[float] = None
        restore_signals = self._install_signal_handlers() if handle_signals else (lambda: None)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=(not self.is_main) or (None if self.progress is None else not self.progress))
        n_params = self.model.num_parameters()
        counts_ = self.cfg.model.param_counts()
        self.say(f"model: {n_params['main'] / 1e6:.2f}M parameters ({counts_['activated'] / 1e6:.2f}M activated/token)"
                 f" + {n_params['mtp'] / 1e6:.2f}M MTP on {self.device}; data: {self.data.train_tokens:,} train / "
                 f"{self.data.val_tokens:,} val tokens; {tc.max_steps} steps x {tc.tokens_per_step:,} tokens")
        interval_tokens, interval_time = 0, 0.0
        interval_counts: dict[str, torch.Tensor] = {}
        last_ckpt: Optional[Path] = None
        interrupted = False
        result: Optional[StepResult] = None
        try:
            if self.step == 0 and tc.eval_every and self.resumed_from is None:
                self.last_val_loss = first_val = self.evaluate()
                val_losses[0] = first_val
                self._log({"step": 0, "tokens": 0, "lr": lr_at(0, tc), "val_loss": first_val})
            while self.step < tc.max_steps:
                t0 = time.perf_counter()
                result = self.train_step()
                dt = time.perf_counter() - t0
                self.train_time += dt
                interval_time += dt
                interval_tokens += result.tokens
                for name, c in result.counts.items():
                    interval_counts[name] = interval_counts[name] + c if name in interval_counts else c.clone()
                summary_losses[self.step] = result.loss
                final_step = self.step == tc.max_steps
                record: dict[str, Any] = {}
                if tc.eval_every and (self.step % tc.eval_every == 0 or final_step):
                    self.last_val_loss = self.evaluate()
                    val_losses[self.step] = self.last_val_loss
                    if first_val is None:
                        first_val = self.last_val_loss
                    record["val_loss"] = self.last_val_loss
                if self.step % tc.log_every == 0 or final_step or record:
                    imbalance = max((load_imbalance(c) for c in result.counts.values()), default=float("nan"))
                    tps, mfu = self._perf(interval_tokens, interval_time)
                    record.update(self._step_record(result, tps, mfu, interval_counts))
                    self._log(record)
                    interval_tokens, interval_time, interval_counts = 0, 0.0, {}
                    bar.set_postfix_str(self._postfix(result, tps, mfu, imbalance), refresh=False)
                bar.update(1)
                stop_now = self._stop_signal is not None or (stop_after is not None and self.step >= stop_after)
                if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or final_step or \
                        (stop_now and checkpoint_on_stop and not final_step):
                    last_ckpt = self.save_checkpoint()
                if stop_now and not final_step:
                    interrupted = True
                    break
        finally:
            bar.close()
            restore_signals()
        summary = self._finish(summary_losses, val_losses, first_val, last_ckpt, interrupted)
        if self._stop_signal is not None:
            self.say(f"stopped at step {self.step}; continue with: frugalm train --out {self.out_dir} --resume")
        return summary

    def _step_record(self, r: StepResult, tps: float, mfu: float, counts: dict[str, torch.Tensor]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": r.step, "loss": r.loss, "lr": r.lr, "tokens": self.tokens,
            "tokens_per_s": tps, "mfu": mfu, "grad_norm": r.grad_norm, "total_loss": r.total_loss,
            "skipped_steps": self.skipped_steps,
        }
        if not math.isnan(r.mtp_loss):
            record["mtp_loss"] = r.mtp_loss
        if self.cfg.model.aux_loss_alpha > 0:
            record["balance_loss"] = r.balance_loss
        if r.skipped:
            record["skipped"] = True
        if counts:
            record["load_imbalance"] = max(load_imbalance(c) for c in counts.values())
            record["expert_load"] = {
                name: [round(float(x), 4) for x in (c.double() / max(1e-12, float(c.double().mean()))).tolist()]
                for name, c in counts.items()
            }
            biases = [m.gate.e_score_correction_bias for m in self.moe.values()]
            record["bias_abs_mean"] = float(torch.stack([b.abs().mean() for b in biases]).mean())
        return record

    @staticmethod
    def _postfix(r: StepResult, tps: float, mfu: float, imbalance: float) -> str:
        return (f"loss {r.loss:.3f} | {tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | lr {r.lr:.2e} | "
                f"load max/mean {imbalance:.2f}")

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def _finish(self, losses: dict[int, float], val_losses: dict[int, float], first_val: Optional[float],
                last_ckpt: Optional[Path], interrupted: bool) -> TrainSummary:
        tc = self.cfg.train
        final_model = plot = sample = None
        if (self.is_main or self.mesh is not None) and not interrupted and self.step >= tc.max_steps:
            final_model = str(self.export())
        if self.is_main and not interrupted and self.step >= tc.max_steps:
            if self.metrics is not None:
                self.metrics.sync()
            png = plot_run(self.out_dir)
            plot = str(png) if png else None
            if tc.sample_tokens and self.mesh is not None:
                self.say(f"sample skipped under torch.distributed; try: frugalm generate --model {final_model}")
            elif tc.sample_tokens:
                sample = self.sample()
        if self.metrics is not None:
            self.metrics.close()
        summary = TrainSummary(
            out_dir=str(self.out_dir), steps=self.step, tokens=self.tokens,
            wall_s=time.perf_counter() - self.t_start, train_s=self.train_time,
            tokens_per_s=self.tokens / self.train_time if self.train_time > 0 else float("nan"),
            final_loss=losses[max(losses)] if losses else None, final_val_loss=self.last_val_loss,
            first_val_loss=first_val, skipped_steps=self.skipped_steps, losses=losses, val_losses=val_losses,
            checkpoint=str(last_ckpt) if last_ckpt else None, final_model=final_model, plot=plot, sample=sample,
            interrupted=interrupted,
        )
        if self.is_main and not interrupted:
            (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        return summary


def _no_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this pipeline rank holds no last stage and computes no loss")


@dataclass
class _Pipeline:
    """The pipeline-parallel pieces of a `Trainer` (parallel.pp > 1)."""

    schedule: Any  # frugalm.parallel.schedules.PipelineSchedule
    stages: list  # every stage (DecoderStage); only those in ``mine`` hold weights on this rank
    mine: dict  # stage index -> DecoderStage run on this rank
    runner: Any  # frugalm.parallel.pipeline.PipelineRunner
    replicas: Any  # frugalm.parallel.pipeline_model.PipelineReplicas
    last: Any  # this rank's copy of the last stage, or None
    fsdp: Any = None  # frugalm.parallel.pipeline_fsdp.PipelineFSDP under dp_mode = "fsdp"


def train(
    run_cfg: RunConfig,
    out_dir: str | Path,
    resume: bool | str | Path = False,
    *,
    overwrite: bool = False,
    progress: Optional[bool] = None,
    handle_signals: bool = False,
) -> TrainSummary:
    """Run (or, with `resume`, continue) a training run into `out_dir`; returns its summary."""
    trainer = Trainer(run_cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    try:
        return trainer.fit(handle_signals=handle_signals)
    finally:
        if trainer.mesh is not None:
            import gc

            from frugalm.parallel.mesh import shutdown_distributed

            shutdown_distributed()
            # The model, mesh and pipeline still hold process-group objects; free them now, while the
            # interpreter is whole, rather than at interpreter exit. A rank aborted once in CI with
            # "terminate called without an active exception" (a thread destroyed unjoined); gloo threads
            # torn down during interpreter finalization are the suspected, unconfirmed cause.
            del trainer
            gc.collect()
