"""Expert parallelism applied from outside: each MoE's `experts` becomes a module holding E/ep experts.

`apply_expert_parallel(model, ep_group)` swaps every ``MoE.experts`` (a `GroupedExperts`) for an
`ExpertParallelExperts` that keeps only this rank's contiguous block of experts, under the same
parameter names (``gate_up_proj``, ``down_proj``), and the same call contract: ``forward(x_sorted, offs)``
with tokens sorted by *global* expert id. Inside, one call is

1. exchange counts: every rank tells every other how many of its rows go to each of that rank's
   experts (one small equal-split all-to-all), which sizes the next exchange;
2. dispatch: rows sorted by global expert are already contiguous per owning rank, so one
   ``all_to_all_single`` with uneven splits sends each block to its owner;
3. compute: the received rows arrive grouped by source rank, then expert; a stable permutation regroups
   them by local expert and the parent class's grouped GEMM (and its replaceable ``linear_fn``, e.g. FP8)
   runs on the local weights;
4. combine: the inverse permutation and the reverse all-to-all bring every row back to the rank and
   position it came from, so `MoE.routed` combines exactly as on one process.

Both all-to-alls are an autograd Function (`all_to_all`) whose backward is the reverse exchange, so
gradients of the tokens flow back to their own ranks and the expert weights accumulate the gradient of
every rank's tokens. Gradient *averaging* is data parallelism's job (`frugalm.parallel.data_parallel`).
The backward exchanges may use a second group over the same ranks (``backward_group``): DualPipe's
overlapped F&B runs one micro-batch's forward and another's backward at once on two threads, and
collectives of two threads sharing one group could pair up in different orders on different ranks.

The router runs before dispatch on each rank's own tokens, so `MoE.last_expert_counts` stays a local
count; `global_expert_counts` / `all_reduce_counts` sum it over the ranks that see different tokens.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from frugalm.model.moe import GroupedExperts, MoE
from frugalm.parallel.mesh import collective_error


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the gradient is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
                backward_group: dist.ProcessGroup):
        ctx.splits, ctx.group = (out_splits, in_splits), backward_group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None, None


def _exchange(x: torch.Tensor, out_splits: Optional[list[int]], in_splits: Optional[list[int]],
              group: dist.ProcessGroup, what: str = "expert-parallel token all-to-all") -> torch.Tensor:
    """One all_to_all_single (equal splits when both are None); failures name the EP group."""
    x = x.contiguous()
    out = x.new_empty(((sum(out_splits),) + tuple(x.shape[1:])) if out_splits is not None else tuple(x.shape))
    try:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    except RuntimeError as e:  # DistBackendError and timeouts included
        raise collective_error(what, group, e) from e
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
               backward_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:r]) : ...]`` to rank r of ``group``; receive ``out_splits[r]`` rows from r.

    The gradient goes back over ``backward_group`` (same ranks, same order; default ``group``)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, backward_group or group)


class ExpertParallelExperts(GroupedExperts):
    """This rank's E/ep experts, wrapped in token dispatch and combine over the EP group.

    Parameters keep `GroupedExperts`' names with local shapes ``[E/ep, ...]``: rows
    ``ep_rank*E/ep ...`` of the full stacked tensors. `frugalm.parallel.checkpoint` gathers them back.
    """

    def __init__(self, experts: GroupedExperts, group: dist.ProcessGroup,
                 backward_group: Optional[dist.ProcessGroup] = None):
        E = experts.n_experts
        ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        if E % ep:
            raise ValueError(f"{E} experts cannot be split evenly over {ep} expert-parallel ranks")
        n_local = E // ep
        _, two_hidden, dim = experts.gate_up_proj.shape
        with torch.device("meta"):  # the parent allocates [n_local, ...] placeholders; replaced below
            super().__init__(n_local, dim, two_hidden // 2)
        rows = slice(ep_rank * n_local, (ep_rank + 1) * n_local)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[rows].clone(), requires_grad=full.requires_grad))
        self.linear_fn = experts.linear_fn
        self.group = group
        self.backward_group = backward_group or group  # the dispatch/combine gradients' exchanges
        if dist.get_process_group_ranks(self.backward_group) != dist.get_process_group_ranks(group):
            raise ValueError("backward_group must hold the same ranks as group, in the same order")
        self.ep_size, self.ep_rank = ep, ep_rank
        self.n_global_experts = E
        self.first_expert = ep_rank * n_local
        self.last_tokens_computed = 0  # rows this rank's experts processed in the last forward (load logging)

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.n_experts - 1} of {self.n_global_experts} "
                f"(ep rank {self.ep_rank}/{self.ep_size})")

    def forward(self, x_sorted: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.ep_size, self.n_experts
        counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))  # [E], global
        if counts.numel() != self.n_global_experts:
            raise ValueError(f"offs has {counts.numel()} entries, expected one per global expert "
                             f"({self.n_global_experts})")
        # 1. recv[s, j] = rows rank s sends to my local expert j (equal splits: n_local counts per rank)
        recv = _exchange(counts, None, None, self.group, "expert-parallel count exchange").view(ep, n_local)
        send_splits = counts.view(ep, n_local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        # 2. dispatch
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, self.group, self.backward_group)
        # 3. regroup (source rank, expert) blocks by expert; stable, so each source's order is kept
        perm = None
        if ep > 1 and n_local > 1:
            block = torch.repeat_interleave(torch.arange(ep * n_local, device=recv.device), recv.flatten())
            perm = ((block % n_local) * ep + block // n_local).argsort(stable=True)
            x_local = x_recv[perm]
        else:
            x_local = x_recv
        local_offs = recv.sum(0).cumsum(0).to(torch.int32)
        self.last_tokens_computed = int(x_local.shape[0])
        y_local = super().forward(x_local, local_offs)
        if y_local.shape[0] == 0:
            # No rows here: keep the weights in the graph so every rank's backward reaches them (a zero
            # gradient), which data parallelism relies on to reduce the same tensors everywhere.
            y_local = y_local + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum()).to(y_local.dtype)
        if perm is not None:
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            y_local = y_local[inverse]
        # 4. combine: back to the ranks and positions the rows came from
        return all_to_all(y_local, send_splits, recv_splits, self.group, self.backward_group)


def expert_parallel_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Every EP-sharded expert block by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def apply_expert_parallel(model: nn.Module, ep_group: Optional[dist.ProcessGroup],
                          backward_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Replace every MoE's `experts` (main layers and MTP blocks) by its EP shard; in place, returned.

    A None group (ep = 1) leaves the model unchanged. Apply before data parallelism, which treats the
    EP-sharded parameters differently (see `frugalm.parallel.data_parallel`). ``backward_group``: see
    the module docstring (pipelines whose F&B slots overlap).
    """
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return model
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, ep_group, backward_group)
    return model


# ---------------------------------------------------------------------------------------- global load
def all_reduce_counts(counts: Mapping[str, torch.Tensor],
                      group: Optional[dist.ProcessGroup]) -> dict[str, torch.Tensor]:
    """Sum per-expert token counts over ``group`` in one collective (identity for a None group).

    The aux-loss-free bias update must see the load of the *global* batch, i.e. over every rank that
    routes different tokens: the ``dp_ep`` axis of the mesh.
    """
    names = sorted(counts)
    out = {n: counts[n].detach().to(torch.int64) for n in names}
    if group is None or not names:
        return out
    flat = torch.cat([out[n].flatten() for n in names])
    try:
        dist.all_reduce(flat, group=group)
    except RuntimeError as e:  # DistBackendError and timeouts included
        raise collective_error("expert-load all-reduce", group, e) from e
    result, start = {}, 0
    for n in names:
        k = out[n].numel()
        result[n] = flat[start:start + k].view_as(out[n])
        start += k
    return result


def global_expert_counts(model: nn.Module, group: Optional[dist.ProcessGroup]) -> dict[str, torch.Tensor]:
    """Every MoE block's `last_expert_counts` summed over ``group`` (pass ``mesh.group("dp_ep")``)."""
    local = {name: m.last_expert_counts for name, m in model.named_modules()
             if isinstance(m, MoE) and m.last_expert_counts is not None}
    return all_reduce_counts(local, group)
