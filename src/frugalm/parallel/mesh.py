"""Process-group setup: `init_distributed(cfg, device)` -> a `ParallelMesh` of pp x dp x ep ranks.

Why our own groups rather than `init_device_mesh`: a DeviceMesh creates its sub-groups with the
backend's *default* timeout (30 minutes for gloo, 10 for NCCL) unless every dimension is given backend
options, so a rank that dies mid-collective would leave the others hanging for half an hour. Here every
group gets ``[parallel].timeout_s``. FSDP2 still needs DeviceMeshes; `ParallelMesh.device_mesh` wraps our
groups in one (`DeviceMesh.from_group`) so FSDP inherits the same timeouts.

Rank layout is row-major over (pp, dp, ep): ``rank = (pp_rank * dp + dp_rank) * ep + ep_rank``, the
order `init_device_mesh((pp, dp, ep))` would use, so a DeviceMesh built elsewhere agrees with ours.
Axes:

* ``ep``    -- ranks that split one set of routed experts between them (token all-to-all);
* ``dp``    -- ranks holding the same experts (expert gradients are averaged here);
* ``dp_ep`` -- all ranks of one pipeline stage: every one sees different tokens, so non-expert gradients
  and expert loads are reduced here;
* ``pp``    -- the pipeline stages of one data/expert replica.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from frugalm.config import ConfigError
from frugalm.parallel.config import ParallelConfig

AXES = ("pp", "dp", "ep", "dp_ep")


class CollectiveError(RuntimeError):
    """A collective that failed or timed out -- almost always because another rank died or stalled.

    Raised instead of the backend's bare message so every surviving rank says what it was doing and
    with which ranks; the backend's error is kept as the cause and in the message.
    """


def collective_error(what: str, group: Optional[dist.ProcessGroup], err: BaseException) -> CollectiveError:
    ranks = dist.get_process_group_ranks(group) if group is not None else []
    return CollectiveError(
        f"{what} with ranks {ranks} failed on rank {dist.get_rank()}: a peer rank has probably died or stopped "
        f"responding (each collective waits at most [parallel].timeout_s). Check the other ranks' logs. "
        f"Backend error: {err}"
    )


def select_backend(requested: str, device: torch.device) -> str:
    """``"auto"``: NCCL for CUDA devices, gloo for everything else; an explicit choice is checked."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError(f"[parallel] backend 'nccl' needs a CUDA device, the training device is {device}")
    return requested


def local_device(device: torch.device) -> torch.device:
    """The training device for this process: a bare accelerator type gets torchrun's LOCAL_RANK as index.

    ``train.device = "cuda"`` on an 8-GPU host must mean "my GPU", not GPU 0 for every rank.
    """
    if device.type in ("cpu", "meta") or device.index is not None:
        return device
    return torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class ParallelMesh:
    """This process's coordinates in the pp x dp x ep mesh and the process group of each axis.

    A group is None when its axis has one rank (no communication needed); `size`/`rank` still work.
    """

    pp: int
    dp: int
    ep: int
    rank: int
    device: torch.device
    backend: str = "gloo"
    timeout_s: float = 300.0
    groups: dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    # A second group over this rank's ep ranks (pp > 1 with `PipelineConfig.overlap` only, else None):
    # expert-parallel backward all-to-alls, so a pipeline's overlapped forward and backward chunks never
    # share a group.
    ep_backward_group: Optional[dist.ProcessGroup] = None
    _device_meshes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelMesh":
        """The trivial mesh of a single-process run (no process group needed)."""
        return cls(pp=1, dp=1, ep=1, rank=0, device=torch.device(device))

    # ------------------------------------------------------------------ coordinates
    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.ep) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.ep * self.dp)

    @property
    def dp_ep_rank(self) -> int:
        """Index of this rank among the dp*ep ranks of its stage: the data shard it reads."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def data_parallel_size(self) -> int:
        """How many ranks of one stage read different data (dp * ep): the sampler's world size."""
        return self.dp * self.ep

    def size(self, axis: str) -> int:
        return {"pp": self.pp, "dp": self.dp, "ep": self.ep, "dp_ep": self.dp * self.ep}[_check_axis(axis)]

    def rank_in(self, axis: str) -> int:
        return {"pp": self.pp_rank, "dp": self.dp_rank, "ep": self.ep_rank, "dp_ep": self.dp_ep_rank}[_check_axis(axis)]

    def group(self, axis: str) -> Optional[dist.ProcessGroup]:
        """The process group of ``axis`` containing this rank (None when the axis has one rank)."""
        return self.groups.get(_check_axis(axis))

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along ``axis``, in group-rank order."""
        return axis_ranks(self.pp, self.dp, self.ep, axis)[_group_index(self, axis)]

    def device_mesh(self, axis: str):
        """A 1-D `DeviceMesh` over this rank's ``axis`` group (for FSDP2), sharing our group and timeout."""
        axis = _check_axis(axis)
        if axis not in self._device_meshes:
            from torch.distributed.device_mesh import DeviceMesh

            group = self.group(axis)
            if group is None:
                raise ValueError(f"axis {axis!r} has one rank; there is nothing to build a DeviceMesh over")
            self._device_meshes[axis] = DeviceMesh.from_group(group, self.device.type, mesh_dim_names=(axis,))
        return self._device_meshes[axis]

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} pp{self.pp}·dp{self.dp}·ep{self.ep} "
                f"(pp_rank {self.pp_rank}, dp_rank {self.dp_rank}, ep_rank {self.ep_rank}) "
                f"{self.backend} on {self.device}, timeout {self.timeout_s:g}s")


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"unknown mesh axis {axis!r}; one of {AXES}")
    return axis


def axis_ranks(pp: int, dp: int, ep: int, axis: str) -> list[list[int]]:
    """Every group along ``axis`` as a list of global ranks (the same list, in the same order, on every rank)."""
    def r(p: int, d: int, e: int) -> int:
        return (p * dp + d) * ep + e

    if axis == "ep":
        return [[r(p, d, e) for e in range(ep)] for p in range(pp) for d in range(dp)]
    if axis == "dp":
        return [[r(p, d, e) for d in range(dp)] for p in range(pp) for e in range(ep)]
    if axis == "dp_ep":
        return [[r(p, d, e) for d in range(dp) for e in range(ep)] for p in range(pp)]
    if axis == "pp":
        return [[r(p, d, e) for p in range(pp)] for d in range(dp) for e in range(ep)]
    raise ValueError(f"unknown mesh axis {axis!r}; one of {AXES}")


def _group_index(mesh: ParallelMesh, axis: str) -> int:
    """Which of `axis_ranks`'s groups holds mesh.rank."""
    if axis == "ep":
        return mesh.pp_rank * mesh.dp + mesh.dp_rank
    if axis == "dp":
        return mesh.pp_rank * mesh.ep + mesh.ep_rank
    if axis == "dp_ep":
        return mesh.pp_rank
    return mesh.dp_rank * mesh.ep + mesh.ep_rank


def init_distributed(
    cfg: ParallelConfig,
    device: torch.device | str,
    *,
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pipeline_overlap: bool = False,
) -> ParallelMesh:
    """Join (or reuse) the default process group and build every axis group with ``cfg.timeout_s``.

    Under torchrun, RANK/WORLD_SIZE/MASTER_ADDR come from the environment (``env://``); tests pass a
    ``file://`` ``init_method`` with explicit ``rank``/``world_size``. A single process with nothing to
    join gets `ParallelMesh.single`. Must be called by every rank (group creation is collective).
    ``pipeline_overlap`` (``[pipeline] overlap``): also build `ParallelMesh.ep_backward_group` when
    pp > 1 and ep > 1; without it that twin EP group (an extra communicator) is not created.
    """
    device = local_device(torch.device(device))
    backend = select_backend(cfg.backend, device)
    timeout = timedelta(seconds=cfg.timeout_s)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    pp, dp, ep = cfg.resolve(world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1 and not dist.is_initialized():
        mesh = ParallelMesh.single(device)
        mesh.backend, mesh.timeout_s = backend, cfg.timeout_s
        return mesh
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
    elif backend not in str(dist.get_backend()):
        raise ConfigError(f"a process group with backend {dist.get_backend()!r} already exists; "
                          f"[parallel] asks for {backend!r} on {device}")
    groups: dict[str, Optional[dist.ProcessGroup]] = {}
    for axis in AXES:
        members = axis_ranks(pp, dp, ep, axis)
        if len(members[0]) == 1:
            groups[axis] = None
            continue
        for ranks in members:  # every rank creates every group, in the same order (new_group is collective)
            g = dist.new_group(ranks, timeout=timeout, backend=backend, group_desc=f"frugalm_{axis}")
            if rank in ranks:
                groups[axis] = g
    ep_backward = None
    if pipeline_overlap and pp > 1 and ep > 1:
        for ranks in axis_ranks(pp, dp, ep, "ep"):
            g = dist.new_group(ranks, timeout=timeout, backend=backend, group_desc="frugalm_ep_backward")
            if rank in ranks:
                ep_backward = g
    return ParallelMesh(pp=pp, dp=dp, ep=ep, rank=rank, device=device, backend=backend,
                        timeout_s=cfg.timeout_s, groups=groups, ep_backward_group=ep_backward)


def shutdown_distributed() -> None:
    """Destroy the default process group (and with it every sub-group) if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()
