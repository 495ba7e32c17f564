"""Data parallelism over the dp x ep ranks of a stage: which gradients are averaged where, and by how much.

Every rank of a stage (the ``dp_ep`` axis) reads different tokens and computes the mean loss of its own
micro-batch; the run's loss is the mean over ranks. Hence:

* **non-expert parameters** are replicated on all dp*ep ranks, and each rank's backward gives the
  gradient of its own loss: average over ``dp_ep``;
* **expert parameters** (after `apply_expert_parallel`) live on one ep rank per replica, and because the
  all-to-all backward routes every rank's token gradients to the experts' owner, their local gradient is
  already the *sum* over the ep ranks' losses. The global gradient is therefore
  ``(1/(dp*ep)) * sum over dp replicas``: sum over ``dp`` and divide by ``dp*ep``. We scale each backward's
  expert gradient by ``1/ep`` as it arrives (a tensor hook, so accumulation over micro-batches stays
  linear) and then average over ``dp``, or, under FSDP, let FSDP divide by ``dp*ep``.

Two modes, same semantics:

* ``ddp`` -- `GradientSync`: DDP's scheme written for two groups. Gradients are packed into buckets
  (reverse parameter order ~ backward order) and each bucket's all-reduce is launched asynchronously
  as soon as its last gradient is accumulated, in the same bucket order on every rank, so communication
  overlaps the rest of the backward; the end of the backward waits for all of them. Parameter names and
  the model's class are untouched, and any method (``forward_with_mtp``) can drive the forward -- the
  reason we do not wrap the model in `torch.nn.parallel.DistributedDataParallel`, which only sees
  ``forward`` and prefixes every name with ``module.``.
* ``fsdp`` -- torch FSDP2 (`fully_shard`): each decoder layer and MTP module over ``dp_ep``, the root for
  embedding/head/norm; expert blocks over ``dp`` with a gradient divide factor of ``dp*ep``.
  ``forward_with_mtp`` is registered as an FSDP forward method. Works with gloo on CPU in torch 2.13.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from frugalm.parallel.config import ParallelConfig
from frugalm.parallel.expert_parallel import expert_parallel_modules
from frugalm.parallel.mesh import ParallelMesh, collective_error

_SYNC_ATTR = "_frugalm_gradient_sync"


# ---------------------------------------------------------------------------------------- helpers
def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Parameters of EP-sharded expert blocks (replicated over dp only)."""
    return {p for m in expert_parallel_modules(model).values() for p in m.parameters()}


def _scale_grad_hooks(params: list[nn.Parameter], factor: float) -> None:
    """Multiply each backward's gradient of ``params`` by ``factor`` before it is accumulated."""
    for p in params:
        if p.requires_grad:
            p.register_hook(lambda g, f=factor: g * f)


@torch.no_grad()
def broadcast_from_first(tensors: list[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
    """Make ``tensors`` equal to those of ``group``'s first rank (coalesced, one broadcast per dtype).

    DDP does the same at construction: replicas must start identical even if a caller seeded differently.
    Meta tensors (deferred init) are skipped.
    """
    if group is None:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.device.type != "meta":
            by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        ts = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        dist.broadcast(flat, group=group, group_src=0)
        start = 0
        for t in ts:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()


# ---------------------------------------------------------------------------------------- DDP mode
@dataclass
class _Bucket:
    group: dist.ProcessGroup
    world: int
    names: list[str]
    params: list[nn.Parameter]
    ready: int = 0
    flat: Optional[torch.Tensor] = None
    work: Optional[dist.Work] = None
    had_grad: list[bool] = field(default_factory=list)


class GradientSync:
    """Bucketed, asynchronous gradient averaging over one process group per parameter set.

    Correct under gradient accumulation with or without `enabled`: averaging is linear, so reducing an
    accumulated gradient again only re-averages values that are already equal on every rank. Disable
    (`set_gradient_sync(model, False)`) for all but the last micro-batch to save the traffic.

    Each bucket carries one flag per parameter saying whether this rank had a gradient; the reduced
    flags must be 0 or the group size, otherwise ranks disagree about which parameters were used and
    averaging would silently mix in zeros -- that is reported as an error instead.
    """

    def __init__(self, param_sets: list[tuple[dist.ProcessGroup, list[tuple[str, nn.Parameter]]]],
                 bucket_bytes: int):
        self.enabled = True
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        self._next = 0
        self._armed = False
        # Buckets of the last synced backward launched while it was still running vs. at its end.
        self.launched_early = self.launched_at_end = 0
        # Walk all sets together in reverse registration order so buckets fill roughly as backward runs.
        items = [(g, n, p) for g, named in param_sets for n, p in named if p.requires_grad][::-1]
        open_: dict[tuple, _Bucket] = {}
        sizes: dict[tuple, int] = {}
        for group, name, p in items:
            key = (id(group), p.dtype, p.device)
            b = open_.get(key)
            if b is None:
                b = open_[key] = _Bucket(group=group, world=dist.get_world_size(group), names=[], params=[])
                sizes[key] = 0
            b.names.append(name)
            b.params.append(p)
            self._bucket_of[p] = b
            sizes[key] += p.numel() * p.element_size()
            if sizes[key] >= bucket_bytes:
                self.buckets.append(open_.pop(key))
        self.buckets.extend(open_.values())
        for p in self._bucket_of:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    # ------------------------------------------------------------------ hook path (overlapped)
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self.enabled or p not in self._bucket_of:
            return
        if not self._armed:
            self._armed = True
            self.launched_early = self.launched_at_end = 0
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        b = self._bucket_of[p]
        b.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1
            self.launched_early += 1

    def _launch(self, b: _Bucket) -> None:
        b.had_grad = [p.grad is not None for p in b.params]
        ref = b.params[0]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in b.params]
        parts.append(torch.tensor(b.had_grad, dtype=ref.dtype, device=ref.device))
        b.flat = torch.cat(parts)
        b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)

    def _complete(self, b: _Bucket) -> None:
        try:
            b.work.wait()
        except RuntimeError as e:  # DistBackendError and timeouts included
            raise collective_error("data-parallel gradient all-reduce", b.group, e) from e
        n = len(b.params)
        flags = b.flat[-n:].round().to(torch.int64).tolist()
        start = 0
        for name, p, had, flag in zip(b.names, b.params, b.had_grad, flags):
            view = b.flat[start:start + p.numel()].view_as(p)
            start += p.numel()
            if flag == 0:
                continue
            if flag != b.world:
                raise RuntimeError(
                    f"gradient sync: {name} has a gradient on {flag} of {b.world} ranks; every rank must use the "
                    f"same parameters in a backward (SPMD)"
                )
            view.div_(b.world)
            if had:
                p.grad.copy_(view)
            else:
                p.grad = view.clone()
        b.flat = b.work = None
        b.ready = 0

    def _finish(self) -> None:
        """End of a backward: launch what has not been launched (in order), then wait for everything."""
        try:
            for b in self.buckets[self._next:]:
                self._launch(b)
                self.launched_at_end += 1
            for b in self.buckets:
                self._complete(b)
        finally:
            self._next = 0
            self._armed = False
            for b in self.buckets:
                b.ready = 0

    def restrict(self, keep: set[nn.Parameter]) -> None:
        """Reduce only ``keep`` from now on (e.g. a pipeline rank's own stages): other parameters leave
        their buckets, empty buckets go. Bucket order is kept, so it stays the same on every rank that
        keeps the same parameters (all ranks of one dp x ep group under pipeline parallelism)."""
        if self._armed:
            raise RuntimeError("restrict() called during a backward pass")
        buckets = []
        for b in self.buckets:
            pairs = [(n, p) for n, p in zip(b.names, b.params) if p in keep]
            if pairs:
                b.names, b.params = [n for n, _ in pairs], [p for _, p in pairs]
                b.ready = 0
                buckets.append(b)
        self.buckets = buckets
        self._bucket_of = {p: b for b in buckets for p in b.params}

    # ------------------------------------------------------------------ explicit path
    def sync_now(self) -> None:
        """Average every gradient now (blocking). For backward passes that bypass autograd's
        accumulation (e.g. a pipeline's deferred weight gradients) or after accumulating with sync off."""
        if self._armed:
            raise RuntimeError("sync_now() called during a backward pass")
        self._next = 0
        for b in self.buckets:
            self._launch(b)
        for b in self.buckets:
            self._complete(b)


def apply_ddp(model: nn.Module, mesh: ParallelMesh, bucket_mb: float = 25.0) -> nn.Module:
    """Replicated data parallelism with `GradientSync` (see the module docstring for the groups)."""
    experts = expert_parameters(model)
    dense = [(n, p) for n, p in model.named_parameters() if p not in experts]
    expert_named = [(n, p) for n, p in model.named_parameters() if p in experts]
    broadcast_from_first([p for _, p in dense] + list(model.buffers()), mesh.group("dp_ep"))
    broadcast_from_first([p for _, p in expert_named], mesh.group("dp"))
    if mesh.ep > 1:
        _scale_grad_hooks([p for _, p in expert_named], 1.0 / mesh.ep)
    sets = []
    if mesh.group("dp_ep") is not None and dense:
        sets.append((mesh.group("dp_ep"), dense))
    if mesh.group("dp") is not None and expert_named:
        sets.append((mesh.group("dp"), expert_named))
    if sets:
        model.__dict__[_SYNC_ATTR] = GradientSync(sets, int(bucket_mb * (1 << 20)))
    return model


def gradient_sync(model: nn.Module) -> Optional[GradientSync]:
    """The `GradientSync` `apply_ddp` attached to ``model`` (None if not DDP-parallelized)."""
    return model.__dict__.get(_SYNC_ATTR)


# ---------------------------------------------------------------------------------------- FSDP mode
def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Decoder layers and MTP modules (an MTP module's inner block belongs to the MTP unit)."""
    from frugalm.model.transformer import DecoderLayer, MTPModule

    mtp = [m for m in model.modules() if isinstance(m, MTPModule)]
    inner = {id(m.block) for m in mtp}
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer) and id(m) not in inner]
    return layers + mtp


def shard_expert_blocks(blocks: list[nn.Module], mesh: ParallelMesh,
                        reshard_after_forward: bool) -> set[nn.Parameter]:
    """FSDP2 over ``dp`` for EP expert blocks (gradient divide factor ``dp*ep``); with ``dp == 1`` the
    experts are unique to this rank and only get the ``1/ep`` scale hook. Returns those unsharded
    expert parameters: enclosing FSDP units must ignore them (``ignored_params``)."""
    from torch.distributed.fsdp import fully_shard

    unsharded: set[nn.Parameter] = set()
    for block in blocks:
        if mesh.dp > 1:
            fully_shard(block, mesh=mesh.device_mesh("dp"), reshard_after_forward=reshard_after_forward)
            block.set_gradient_divide_factor(float(mesh.dp * mesh.ep))
            if mesh.backend == "gloo":  # a custom factor means NCCL's PREMUL_SUM, which gloo lacks
                block.set_force_sum_reduction_for_comms(True)
        else:  # experts are unique to this rank: nothing to reduce, only the 1/ep of the mean loss
            _scale_grad_hooks(list(block.parameters()), 1.0 / mesh.ep)
            unsharded.update(block.parameters())
    return unsharded


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over ``dp_ep`` for non-expert parameters and over ``dp`` for EP expert blocks."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    experts = expert_parameters(model)
    broadcast_from_first([p for p in model.parameters() if p not in experts] + list(model.buffers()),
                         mesh.group("dp_ep"))
    broadcast_from_first(list(experts), mesh.group("dp"))
    unsharded_experts = shard_expert_blocks(list(expert_parallel_modules(model).values()), mesh,
                                            reshard_after_forward)
    if mesh.group("dp_ep") is None:
        return model
    dp_ep = mesh.device_mesh("dp_ep")
    # Expert blocks not managed by their own fully_shard must be kept out of the enclosing units, which
    # would otherwise treat them as replicated over dp_ep and shard (mix) different ranks' experts.
    ignored = unsharded_experts or None
    for unit in _fsdp_units(model):
        fully_shard(unit, mesh=dp_ep, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=dp_ep, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    if hasattr(model, "forward_with_mtp"):
        register_fsdp_forward_method(model, "forward_with_mtp")
    return model


def _fsdp_modules(model: nn.Module) -> Iterator[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return (m for m in model.modules() if isinstance(m, FSDPModule))


# ---------------------------------------------------------------------------------------- entry points
def apply_data_parallel(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig) -> nn.Module:
    """``cfg.dp_mode`` over the mesh; a no-op when the stage has a single rank."""
    if mesh.dp * mesh.ep == 1:
        return model
    if cfg.dp_mode == "fsdp":
        return apply_fsdp(model, mesh, cfg.reshard_after_forward)
    return apply_ddp(model, mesh, cfg.bucket_mb)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction on/off for the following backward passes (off: accumulate locally).

    The equivalent of DDP's ``no_sync`` and FSDP's ``set_requires_gradient_sync`` for either mode.
    """
    sync = gradient_sync(model)
    if sync is not None:
        sync.enabled = enabled
    for m in _fsdp_modules(model):
        m.set_requires_gradient_sync(enabled, recurse=False)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """``with no_gradient_sync(model): loss.backward()`` -- accumulate without communicating."""
    set_gradient_sync(model, False)
    try:
        yield
    finally:
        set_gradient_sync(model, True)


def restrict_gradient_sync(model: nn.Module, keep: set[nn.Parameter]) -> None:
    """DDP mode: reduce only the parameters in ``keep`` (see `GradientSync.restrict`); no-op otherwise."""
    sync = gradient_sync(model)
    if sync is not None:
        sync.restrict(keep)


def sync_gradients(model: nn.Module) -> None:
    """Reduce gradients now, for code paths whose backward does not trigger the hooks (DDP mode; under
    FSDP keep gradient sync on for the last backward instead -- its reduction is part of that backward)."""
    sync = gradient_sync(model)
    if sync is not None:
        sync.sync_now()


# ---------------------------------------------------------------------------------------- grad norm
@torch.no_grad()
def grad_norm(model: nn.Module, mesh: ParallelMesh,
              pp_copies: Optional[dict[nn.Parameter, int]] = None) -> torch.Tensor:
    """Global L2 norm of the (reduced) gradients of the whole model, identical on every rank.

    Each rank adds its local squared norms divided by how many ranks of the stage hold the same values
    (dp*ep for replicated tensors, dp for EP expert shards, 1 for FSDP shards), the sum goes over
    ``dp_ep``, then over ``pp`` (stages hold different layers; ``pp_copies[p]``: on how many pipeline
    ranks ``p``'s gradient sits, e.g. DualPipe's two copies of a stage or a shared embedding).
    """
    from torch.distributed.tensor import DTensor

    experts = expert_parameters(model)
    total = torch.zeros((), dtype=torch.float32, device=mesh.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            local, copies = g.to_local(), 1
        else:
            local, copies = g, (mesh.dp if p in experts else mesh.dp * mesh.ep)
        if pp_copies is not None:
            copies *= pp_copies.get(p, 1)
        total += local.detach().float().pow(2).sum().to(total.device) / copies
    for axis in ("dp_ep", "pp"):
        if mesh.group(axis) is not None:
            dist.all_reduce(total, group=mesh.group(axis))
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: ParallelMesh,
                    pp_copies: Optional[dict[nn.Parameter, int]] = None) -> torch.Tensor:
    """Scale all gradients so the global norm is at most ``max_norm`` (0: only measure); returns the norm.

    The same rule as `frugalm.train.optim.clip_gradients_`, with the norm taken over the whole
    distributed model so every rank applies the same scale (and agrees on a non-finite step).
    """
    from torch.distributed.tensor import DTensor

    norm = grad_norm(model, mesh, pp_copies)
    if max_norm > 0 and math.isfinite(norm.item()):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(scale.to(g.device, g.dtype))
    return norm
