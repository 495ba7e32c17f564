"""Full (single-process) state dicts from a parallelized model, and back.

A distributed run saves what a single process would: `full_state_dict` gathers EP-sharded experts
(all-gather over ``ep``, concatenated in expert order) and FSDP shards (``DTensor.full_tensor``) into
plain tensors under the plain model's names, so the checkpoint resumes on any layout -- single-process,
or another dp/ep split via `load_full_state_dict` -- and exports to Hugging Face format through the plain
model's ``save_pretrained``. Optimizer state keyed ``"<param name>.<slot>"`` (`frugalm.train.optim.AdamW`)
has the parameters' shapes and sharding: `full_optimizer_state`/`local_optimizer_state` reuse the same code.

Every rank must call these (they are collectives) and every rank receives the full tensors; rank 0
writing them is the caller's choice. Memory: one full copy per rank, on CPU with ``to_cpu=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from frugalm.parallel.expert_parallel import expert_parallel_modules
from frugalm.parallel.mesh import ParallelMesh

if TYPE_CHECKING:
    from frugalm.model.config import ModelConfig
    from frugalm.model.transformer import DeepSeekV3


def _ep_sharded_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors split over the ep group (rows of the stacked expert weights)."""
    names = set()
    for mod_name, block in expert_parallel_modules(model).items():
        for pname, _ in block.named_parameters(recurse=False):
            names.add(f"{mod_name}.{pname}" if mod_name else pname)
    return names


def _param_name(key: str, names: set[str]) -> Optional[str]:
    """The parameter a state key belongs to: itself, or its longest dotted prefix (``x.exp_avg`` -> ``x``)."""
    while key:
        if key in names:
            return key
        if "." not in key:
            return None
        key = key.rsplit(".", 1)[0]
    return None


def _gather_ep(local: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    group = mesh.group("ep")
    if group is None:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(mesh.ep)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def full_tensors(
    tensors: Mapping[str, torch.Tensor],
    model: nn.Module,
    mesh: ParallelMesh,
    *,
    to_cpu: bool = False,
    key_to_param: Callable[[str, set[str]], Optional[str]] = _param_name,
) -> dict[str, torch.Tensor]:
    """Unshard ``tensors`` (a state dict of ``model`` or tensors shaped like its parameters) to full tensors.

    Keys are visited in sorted order so every rank issues the same collectives in the same order.
    """
    from torch.distributed.tensor import DTensor

    ep_names = _ep_sharded_names(model)
    param_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        t = tensors[key]
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if key_to_param(key, param_names) in ep_names:
            t = _gather_ep(t, mesh)
        t = t.detach()
        out[key] = t.cpu().clone() if to_cpu else t.clone()
    return out


def full_state_dict(model: nn.Module, mesh: ParallelMesh, *, to_cpu: bool = False) -> dict[str, torch.Tensor]:
    """The plain model's state dict (same names, full shapes) on every rank of the mesh's stage."""
    return full_tensors(model.state_dict(), model, mesh, to_cpu=to_cpu)


def full_grads(model: nn.Module, mesh: ParallelMesh, *, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter's (reduced) gradient as a full tensor under the parameter's name (for checks/debug)."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return full_tensors(grads, model, mesh, to_cpu=to_cpu)


@torch.no_grad()
def local_tensors(
    full: Mapping[str, torch.Tensor],
    model: nn.Module,
    mesh: ParallelMesh,
    like: Mapping[str, torch.Tensor],
    *,
    key_to_param: Callable[[str, set[str]], Optional[str]] = _param_name,
) -> dict[str, torch.Tensor]:
    """Cut full tensors down to what this rank holds, shaped and placed like ``like`` (no communication).

    EP-sharded keys keep rows ``ep_rank*E/ep ...``; a DTensor in ``like`` gets a DTensor with the same
    mesh and placements (its local shard). Dtypes are kept (BF16 moments stay BF16); devices follow
    ``like``. Raises ValueError on missing keys or wrong full shapes.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    ep_names = _ep_sharded_names(model)
    param_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    missing = sorted(set(like) - set(full))
    if missing:
        raise ValueError(f"full state is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    out: dict[str, torch.Tensor] = {}
    for key, ref in like.items():
        src = full[key]
        is_ep = key_to_param(key, param_names) in ep_names
        expect = list(ref.shape)
        if is_ep:  # ref is this rank's expert block (a DTensor's global shape is that block, split over dp)
            expect[0] = ref.shape[0] * mesh.ep
        if list(src.shape) != expect:
            raise ValueError(f"{key}: full tensor has shape {tuple(src.shape)}, expected {tuple(expect)}")
        if is_ep:
            n = src.shape[0] // mesh.ep
            src = src[mesh.ep_rank * n:(mesh.ep_rank + 1) * n]
        device = ref.device if not isinstance(ref, DTensor) else ref.to_local().device
        src = src.to(device=device)
        if isinstance(ref, DTensor):
            src = distribute_tensor(src, ref.device_mesh, ref.placements, src_data_rank=None)
        out[key] = src
    return out


def full_optimizer_state(tensors: Mapping[str, torch.Tensor], model: nn.Module, mesh: ParallelMesh,
                         *, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """`AdamW.tensor_state()` (``"<param>.exp_avg"`` ...) of a parallelized model -> the single-process one."""
    return full_tensors(tensors, model, mesh, to_cpu=to_cpu)


def local_optimizer_state(full: Mapping[str, torch.Tensor], model: nn.Module,
                          mesh: ParallelMesh) -> dict[str, torch.Tensor]:
    """A full optimizer state -> this rank's shards, ready for `AdamW.load_tensor_state` on ``model``.

    Each ``"<param>.<slot>"`` is cut like its parameter (EP rows, FSDP shard); unknown parameters are an error.
    """
    params = dict(model.named_parameters())
    like = {}
    for key in full:
        name = _param_name(key, set(params))
        if name is None:
            raise ValueError(f"optimizer state {key!r} belongs to no parameter of this model")
        like[key] = params[name]
    return local_tensors(full, model, mesh, like)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], mesh: ParallelMesh,
                         *, strict: bool = True) -> None:
    """Load a full (single-process) state dict into a parallelized ``model``, each rank taking its shard.

    Every rank must hold ``state`` (e.g. each reads the same safetensors file). ``strict`` also refuses
    keys the model does not have. Tensors of ``model`` on the meta device (parameters a pipeline rank
    released) are left alone.
    """
    from torch.distributed.tensor import DTensor

    targets = model.state_dict(keep_vars=True)
    if strict:
        extra = sorted(set(state) - set(targets))
        if extra:
            raise ValueError(f"full state has {len(extra)} key(s) the model does not: {', '.join(extra[:5])}")
    # tensors on the meta device are not held by this rank (a pipeline rank's other stages): skipped
    targets = {k: t for k, t in targets.items() if t.device.type != "meta"}
    shards = local_tensors(state, model, mesh, targets)
    for key, target in targets.items():
        src = shards[key]
        if isinstance(target, DTensor):
            target.to_local().copy_(src.to_local())
        else:
            target.copy_(src)


def export_pretrained(model: nn.Module, mesh: ParallelMesh, path: str | Path, *, fp8: bool = False) -> None:
    """Write a Hugging Face checkpoint of a parallelized DeepSeek-V3 (all ranks call; the stage's first
    rank writes). The full state is loaded into a plain `DeepSeekV3` built on the meta device, whose
    ``save_pretrained`` does the naming (per-expert tensors, MTP at layer L+k)."""
    state = full_state_dict(model, mesh, to_cpu=True)
    if mesh.dp_ep_rank != 0:
        return
    plain = plain_model(model.config, state)
    plain.save_pretrained(path, fp8=fp8)


def plain_model(cfg: "ModelConfig", state: Mapping[str, torch.Tensor]) -> "DeepSeekV3":
    """A single-process `DeepSeekV3` holding a full state dict (MTP modules iff the state has them)."""
    from frugalm.model.transformer import DeepSeekV3

    with_mtp = any(k.startswith("mtp.") for k in state)
    with torch.device("meta"):
        model = DeepSeekV3(cfg, with_mtp=with_mtp)
    model.load_state_dict(dict(state), assign=True, strict=True)
    model.rotary = type(model.rotary)(cfg)  # non-persistent buffers are not in the state: rebuild off meta
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
