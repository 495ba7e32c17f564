"""Cut a plain `DeepSeekV3` into pipeline stages from outside (torchtitan style) and keep the copies in step.

`split_model(model, schedule, ...)` returns one `DecoderStage` per pipeline stage of ``schedule``. The
stages do not copy weights: each one registers the full model's own submodules it runs, so parameter
objects (and names in the full model) are shared, the optimizer, checkpoint and HF export keep working
on ``model``, and a checkpoint written under any pipeline layout is the single-process one.

Layout (DeepSeek-V3 §3.2.1 / the DualPipe spec): stage 0 = embedding + the first decoder layers; the
last stage = the last decoder layers (possibly none) + final norm + LM head + the MTP modules, which
also need the token embedding (so ``embed_tokens`` is a parameter of both the first and the last
stage). Work is balanced by counting each decoder layer and each MTP module as one unit. Under
DualPipeV stage 0 and stage 2·PP-1 are both on rank 0, so the embedding lives on one rank; under
DualPipe rank r holds stage r and its mirror; under 1F1B the embedding is on the first and the last
rank and its gradient is summed between them (`PipelineReplicas.reduce_shared_grads`).

Losses, exactly as `Trainer.compute_loss` computes them per micro-batch: the last stage's `loss` is
``CE(main) + λ·mean_k CE(MTP depth k) + α·Σ balance(MoE blocks of this stage)``; every other stage
adds ``α·Σ balance`` of its own MoE blocks through `_AttachLoss` (forward: identity on the hidden
state; backward: also feeds the scaled balance loss its gradient), so the gradient of every stage is
that of the whole per-micro-batch loss. Expert token counts of every MoE block are summed per stage
over the micro-batches, for the global aux-loss-free bias update.

Every rank builds the whole model (same seed, so equal weights) and all stage objects, then
`PipelineReplicas.release_unheld` swaps every parameter of the stages it does not run for a
meta-device tensor of the same shape (`torch.utils.swap_tensors`: the parameter objects and names stay,
their storage is freed), so after setup a rank holds only its stages' weights, gradients and optimizer
state. Nothing is broadcast: evaluation runs forward-only through the pipeline (`pipeline_eval_loss`,
the loss on the last stage's rank, summed over the pipeline), and checkpoints/exports gather each
parameter from the first rank holding it onto the pipeline's first rank (`PipelineReplicas.gather_to_first`,
one rank after the other). Router-bias buffers stay on every rank (tiny; every rank applies the same
global update to all of them).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from frugalm.config import ConfigError
from frugalm.model.moe import MoE
from frugalm.parallel.mesh import collective_error
from frugalm.parallel.schedules import PipelineSchedule
from frugalm.train.balance import ExpertLoadTracker
from frugalm.train.losses import eval_cross_entropy_sum, next_token_losses


def _balanced(n: int, parts: int) -> list[int]:
    """``n`` units in ``parts`` near-equal contiguous parts, the larger ones first."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def layer_split(num_layers: int, num_mtp: int, num_stages: int) -> list[list[int]]:
    """Main decoder layer indices per stage; the last stage also runs the MTP modules (one unit each)."""
    if num_stages == 1:
        return [list(range(num_layers))]
    sizes = _balanced(num_layers + num_mtp, num_stages)
    last = max(0, min(num_layers, sizes[-1] - num_mtp))
    front = num_layers - last
    if front < num_stages - 1 or (last == 0 and num_mtp == 0):
        raise ConfigError(
            f"[pipeline] {num_stages} pipeline stages need at least {num_stages - 1 + (0 if num_mtp else 1)} "
            f"decoder layers (the last stage may hold only the MTP modules); the model has {num_layers}"
        )
    out, start = [], 0
    for size in _balanced(front, num_stages - 1):
        out.append(list(range(start, start + size)))
        start += size
    out.append(list(range(start, num_layers)))
    return out


class _AttachLoss(torch.autograd.Function):
    """``h`` unchanged; in backward, ``aux`` also receives gradient ``scale`` (its weight in the step's loss)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return h.view_as(h)  # a new autograd output without copying the activations

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class DecoderStage(nn.Module):
    """One pipeline stage of a `DeepSeekV3`, sharing the model's modules (see the module docstring).

    ``forward(x)``: token ids ``[b, T]`` (first stage) or hidden ``[b, T, d]`` -> hidden ``[b, T, d]``
    (final-norm output on the last stage). ``loss(h, tokens)`` (last stage): the micro-batch's loss
    from the final hidden state and its tokens ``[b, T+1]``.
    """

    def __init__(self, model: nn.Module, index: int, num_stages: int, layers: list[int], *,
                 mtp_weight: float, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        cfg = model.config
        self.index, self.num_stages = index, num_stages
        self.first, self.last = index == 0, index == num_stages - 1
        self.layer_ids = list(layers)
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.embed_tokens = model.model.embed_tokens if (self.first or (self.last and len(model.mtp))) else None
        self.norm = model.model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.mtp = model.mtp if self.last else nn.ModuleList()
        self.__dict__["_rotary"] = model.rotary  # buffers only; not a part of this stage's state
        self.__dict__["_autocast"] = autocast
        self.alpha = cfg.aux_loss_alpha
        self.mtp_weight = mtp_weight
        self.layer_moe = {f"model.layers.{i}.mlp": model.model.layers[i].mlp for i in layers
                          if isinstance(model.model.layers[i].mlp, MoE)}
        self.mtp_moe = {f"mtp.{k}.block.mlp": m.block.mlp for k, m in enumerate(self.mtp) if isinstance(m.block.mlp, MoE)}
        # the last stage's balance loss (taken in `loss`) also covers the MTP blocks
        self.loads = ExpertLoadTracker({**self.layer_moe, **self.mtp_moe} if self.last else self.layer_moe)
        self.grad_scale = 1.0  # weight of one micro-batch's loss in the step (set by the trainer)
        self.reset()

    def reset(self) -> None:
        """Clear the per-step sums (expert counts and loss parts)."""
        self.loads.reset()
        self.sums: dict[str, torch.Tensor] = {}

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """This step's expert counts of the stage's MoE blocks (summed over micro-batches)."""
        return self.loads.counts

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _collect(self) -> Optional[torch.Tensor]:
        """Add this micro-batch's expert counts; the α-weighted balance loss of the stage (None when off)."""
        self.loads.collect()
        return self.loads.balance_loss(self.alpha)

    def _positions(self, T: int, device: torch.device):
        return self._rotary(torch.arange(T, device=device).unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            h = self.embed_tokens(x) if self.first else x
            cos, sin = self._positions(h.shape[1], h.device)
            for layer in self.layers:
                h = layer(h, cos, sin)
            if self.last:
                h = self.norm(h)
        if self.last:
            return h  # the balance loss of this stage's layers is added in `loss`, after the MTP blocks
        balance = self._collect()
        if balance is not None and torch.is_grad_enabled():
            self._add("balance_loss", balance)
            h = _AttachLoss.apply(h, balance, self.grad_scale)
        return h

    def eval_loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed main next-token cross-entropy (float64) from the final hidden state (last stage only);
        what `Trainer.evaluate` adds up for one batch."""
        with self._autocast():
            logits = self.lm_head(h)
        return eval_cross_entropy_sum(logits, labels)

    def loss(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss of `Trainer.compute_loss`, from the final hidden state (last stage only)."""
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with self._autocast():
            logits = self.lm_head(h)
            mtp_logits = []
            T = inputs.shape[1]
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                cos, sin = self._positions(T - k, h.device)
                emb = self.embed_tokens(inputs[:, k:])
                h = module(h[:, :-1], emb, cos, sin)
                mtp_logits.append(self.lm_head(h))
        total, parts = next_token_losses(logits, mtp_logits, labels, self.mtp_weight)
        for key, value in parts.items():
            self._add(key, value)
        balance = self._collect()
        if balance is not None:
            total = total + balance
            self._add("balance_loss", balance)
        return total


def split_model(model: nn.Module, schedule: PipelineSchedule, *, mtp_weight: float,
                autocast: Callable[[], contextlib.AbstractContextManager]) -> list[DecoderStage]:
    """Every stage of ``schedule`` as a `DecoderStage` over ``model`` (a `DeepSeekV3`)."""
    split = layer_split(model.config.num_hidden_layers, len(model.mtp), schedule.num_stages)
    return [DecoderStage(model, s, schedule.num_stages, layers, mtp_weight=mtp_weight, autocast=autocast)
            for s, layers in enumerate(split)]


class PipelineReplicas:
    """Which pipeline ranks hold each parameter, and the cross-stage bookkeeping that follows from it.

    * `reduce_shared_grads`: a parameter used by stages on different ranks that the executor does not
      already sum (1F1B's embedding on the first and last rank) gets the sum of its gradients.
    * `copies`: on how many pipeline ranks each held parameter's (equal) gradient sits, for the norm.
    * `release_unheld`: parameters of stages this rank does not run move to the meta device.
    * `owned_names`/`gather_to_first`: each parameter comes from the first rank holding it, onto pipeline rank 0.
    """

    def __init__(self, model: nn.Module, stages: list[DecoderStage], schedule: PipelineSchedule,
                 pp_rank: int, group: Optional[dist.ProcessGroup]) -> None:
        self.group, self.pp_rank = group, pp_rank
        self.device = next(model.parameters()).device
        names = {}
        for n, p in model.named_parameters():
            names.setdefault(p, n)
        holders: dict[nn.Parameter, set[int]] = {}
        covered: dict[nn.Parameter, bool] = {}
        stage_params = [set(s.parameters()) for s in stages]
        for s, params in enumerate(stage_params):
            ranks = set(schedule.holders(s))
            for p in params:
                holders.setdefault(p, set()).update(ranks)
        for p, ranks in holders.items():
            # the executor sums the copies of a stage (DualPipe); a stage whose holders include every
            # holder of p leaves nothing to do
            covered[p] = any(p in params and set(schedule.holders(s)) >= ranks for s, params in enumerate(stage_params))
        missing = [n for p, n in names.items() if p not in holders and p.requires_grad]
        if missing:
            raise ValueError(f"parameters in no pipeline stage: {missing[:5]}")
        self.names = names
        self.holders = {p: tuple(sorted(r)) for p, r in holders.items()}
        self.held = [p for p in names if pp_rank in self.holders.get(p, ())]
        self.shared = sorted((p for p, r in self.holders.items() if len(r) > 1 and not covered[p]),
                             key=lambda p: names[p])
        self.copies = {p: len(r) for p, r in self.holders.items()}
        # FSDP under pp (`rebind`): (dp*ep, dp_ep rank) -- gradients of held parameters are then local
        # dim-0 shards, and a rank not holding a shared parameter contributes zeros of the shard's shape
        self.shard: Optional[tuple[int, int]] = None

    def rebind(self, model: nn.Module, shard: Optional[tuple[int, int]] = None) -> None:
        """Point every record at ``model``'s current parameter objects, found by name.

        `frugalm.parallel.pipeline_fsdp.shard_pipeline_stages` replaces the held parameters by FSDP's
        sharded DTensor parameters (new objects); ``shard`` = (dp*ep ranks, this rank's index) then says
        how their gradients are cut.
        """
        current = dict(model.named_parameters())
        new = {old: current.get(name, old) for old, name in self.names.items()}
        self.names = {new[p]: n for p, n in self.names.items()}
        self.holders = {new[p]: r for p, r in self.holders.items()}
        self.held = [new[p] for p in self.held]
        self.shared = [new[p] for p in self.shared]
        self.copies = {new[p]: c for p, c in self.copies.items()}
        self.shard = shard

    def _local_grad(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's part of ``p``'s gradient (its FSDP shard), zeros of that shape if it has none."""
        from torch.distributed.tensor import DTensor

        held = self.pp_rank in self.holders[p]
        if held and p.grad is not None:
            g = p.grad
            return g.to_local() if isinstance(g, DTensor) else g
        shape = tuple(p.shape)
        if self.shard is not None:  # FSDP2 keeps chunk ``rank`` of torch.chunk(dim 0), empty past the last
            size, rank = self.shard
            chunks = torch.empty(shape, device="meta").chunk(size, dim=0)
            shape = tuple(chunks[rank].shape) if rank < len(chunks) else (0, *shape[1:])
        return torch.zeros(shape, dtype=p.dtype, device=self.device)

    def held_names(self) -> set[str]:
        return {self.names[p] for p in self.held}

    @torch.no_grad()
    def reduce_shared_grads(self) -> None:
        if self.group is None or not self.shared:
            return
        # a rank not holding p (its storage released to meta) contributes zeros of p's (shard's) shape;
        # under FSDP the pp ranks of one dp x ep index hold the same shard, so shards are summed
        from torch.distributed.tensor import DTensor

        local = [self._local_grad(p) for p in self.shared]
        flat = torch.cat([g.reshape(-1).float() for g in local]).to(self.device)
        try:
            dist.all_reduce(flat, group=self.group)
        except RuntimeError as e:
            raise collective_error("pipeline shared-parameter gradient all-reduce", self.group, e) from e
        start = 0
        for p, g in zip(self.shared, local):
            view = flat[start:start + g.numel()].view_as(g).to(p.dtype)
            start += g.numel()
            if self.pp_rank not in self.holders[p]:
                continue
            if isinstance(p.grad, DTensor):
                p.grad.to_local().copy_(view)
            elif isinstance(p, DTensor):  # held and sharded, but no gradient here: build the sharded grad
                p.grad = DTensor.from_local(view.clone(), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
            else:
                p.grad = view.clone()

    def owned_names(self) -> set[str]:
        """Names of the parameters whose first holder is this rank (each parameter is gathered from there)."""
        return {n for p, n in self.names.items()
                if (self.holders[p][0] if p in self.holders else 0) == self.pp_rank}  # stage-less: rank 0

    @torch.no_grad()
    def release_unheld(self) -> int:
        """Free the storage of every parameter this rank does not hold (moved to meta; returns bytes freed).

        Identity, name, shape and dtype of each parameter are kept, so the model's state dict still lists
        it (as a meta tensor) and stages, optimizer and gradient sync keep referring to the same objects.
        """
        freed = 0
        held = set(self.held)
        for p in self.names:
            if p in held or p not in self.holders or p.device.type == "meta":  # stage-less ones stay
                continue
            freed += p.numel() * p.element_size()
            torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device="meta"),
                                                     requires_grad=p.requires_grad))
        return freed

    def gather_to_first(self, local: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        """Every pipeline rank's ``local`` tensors, merged on pipeline rank 0 (None on the others).

        Ranks send one after the other (rank 1, then 2, ...), one flat message per dtype, so rank 0 holds
        the merged result plus one rank's part in flight. Keys must be disjoint across ranks.
        """
        if self.group is None:
            return dict(local)
        world = dist.get_world_size(self.group)
        meta = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(local.items())]
        metas: Optional[list] = [None] * world if self.pp_rank == 0 else None
        try:
            dist.gather_object(meta, metas, group=self.group, group_dst=0)
            out: dict[str, torch.Tensor] = dict(local) if self.pp_rank == 0 else {}
            for src in range(1, world):
                if self.pp_rank not in (0, src):
                    continue
                entries = metas[src] if self.pp_rank == 0 else meta
                by_dtype: dict[str, list] = {}
                for k, shape, dtype in entries:
                    by_dtype.setdefault(dtype, []).append((k, shape))
                for dtype in sorted(by_dtype):
                    items = by_dtype[dtype]
                    if self.pp_rank == src:
                        # on the comm device: NCCL cannot send the CPU copies callers pass in
                        flat = torch.cat([local[k].detach().reshape(-1) for k, _ in items]).to(self.device)
                        dist.send(flat.contiguous(), group=self.group, group_dst=0)
                        continue
                    n = sum(math.prod(shape) for _, shape in items)
                    flat = torch.empty(n, dtype=getattr(torch, dtype), device=self.device)
                    dist.recv(flat, group=self.group, group_src=src)
                    start = 0
                    for k, shape in items:
                        if k in out:
                            raise ValueError(f"pipeline gather: {k!r} came from two ranks")
                        size = math.prod(shape)
                        out[k] = flat[start:start + size].view(shape).to("cpu", copy=True)
                        start += size
        except RuntimeError as e:
            raise collective_error("pipeline state gather", self.group, e) from e
        return out if self.pp_rank == 0 else None


def _stage_runner(schedule: PipelineSchedule, stage: int) -> int:
    """The rank that runs ``stage`` in a forward-only pass (its first holder)."""
    return schedule.holders(stage)[0]


@torch.no_grad()
def pipeline_eval_loss(stages: dict[int, DecoderStage], schedule: PipelineSchedule, pp_rank: int,
                       group: Optional[dist.ProcessGroup], batch: torch.Tensor, *, hidden_dtype: torch.dtype,
                       hidden_size: int) -> tuple[torch.Tensor, int]:
    """Forward-only pass of one ``[b, T+1]`` batch through the pipeline, stage after stage.

    Returns (sum of next-token cross-entropy over the batch, float64; number of label tokens) on the
    rank that runs the last stage and (0, 0) elsewhere: sum both over the pipeline group. Each stage
    runs on its first holder; hidden states go by blocking send/recv (every rank walks the stages in
    the same order, so the messages pair up). MoE expert counts collected here are reset afterwards.
    """
    S = schedule.num_stages
    inputs, labels = batch[:, :-1], batch[:, 1:]
    shape = (inputs.shape[0], inputs.shape[1], hidden_size)
    device = batch.device
    h: Optional[torch.Tensor] = None
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        for s in range(S):
            runner = _stage_runner(schedule, s)
            if runner != pp_rank:
                continue
            if s == 0:
                x = inputs
            else:
                prev = _stage_runner(schedule, s - 1)
                if prev == pp_rank:
                    x = h
                else:
                    x = torch.empty(shape, dtype=hidden_dtype, device=device)
                    dist.recv(x, group=group, group_src=prev)
            stage = stages[s]
            h = stage(x)
            if s == S - 1:
                total = stage.eval_loss_sum(h, labels)
                count = labels.numel()
            else:
                h = h.to(hidden_dtype)
                nxt = _stage_runner(schedule, s + 1)
                if nxt != pp_rank:
                    dist.send(h.contiguous(), group=group, group_dst=nxt)
    except RuntimeError as e:
        raise collective_error("pipeline evaluation forward", group, e) from e
    finally:
        for stage in stages.values():
            stage.reset()
    return total, count
