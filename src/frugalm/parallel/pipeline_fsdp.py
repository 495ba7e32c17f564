"""FSDP2 (`fully_shard`) data parallelism under pipeline parallelism: shard the stages a rank holds.

Under ``pp > 1`` with ``[parallel] dp_mode = "fsdp"`` every pipeline rank shards the parameters of its
own stages over the ``dp x ep`` ranks of that stage (EP expert blocks over ``dp``, as `apply_fsdp` does
for the unpipelined model); the stages of other ranks stay released on the meta device and are never
wrapped. Order in `frugalm.train.trainer.Trainer`: ``parallelize(..., data_parallel=False)`` (experts
only), `split_model`, `PipelineReplicas.release_unheld`, then `shard_pipeline_stages`.

FSDP units on a rank: each held decoder layer, each MTP module (last stage), and the embedding, final
norm and LM head as units of their own. The last three are separate units, not one per stage, because
a rank can run two stages that both use the embedding (DualPipe(V): the first and the last stage, whose
MTP modules embed tokens too) and a parameter can belong to one FSDP unit only; as each is called as a
module, FSDP's hooks gather it whichever stage calls it. Tied embedding/head is refused by the trainer
(``lm_head`` would need to live in the embedding's unit, which no module's forward covers).

A step of a hand-written schedule runs many forward and backward chunks per unit, in an order FSDP's
hooks do not know, and the zero-bubble W chunks (`frugalm.parallel.split_backward`) differentiate
with ``autograd.grad`` w.r.t. the parameters the forward used. So, as torch.distributed.pipelining does
for its own schedules, `PipelineFSDP`:

* `begin_step`: gradient reduction off, no resharding after backward: every backward accumulates into
  the gathered (unsharded) parameters' ``.grad``;
* `finish_step` (after the last micro-batch of the last accumulation batch, before the cross-stage
  sums): runs every unit's post-backward with reduction on -- one reduce-scatter per unit and step,
  the ``1/(dp*ep)`` mean as in `apply_fsdp` -- which leaves sharded DTensor gradients and reshards the
  parameters; the optimizer then steps on shards.

Resharding between micro-batches: with a schedule that defers weight gradients (zb1p, dualpipe,
dualpipev) a stage's parameters must stay gathered from its first forward to the end of the step (the
deferred W pass needs the very tensors the forward used), so those schedules run with
``reshard_after_forward=False`` whatever ``[parallel].reshard_after_forward`` says; 1F1B honours the
setting (True: gathered again for every micro-batch's forward and backward, parameters freed in
between; unsharded gradients are kept until the end of the step either way). DualPipe's mirrored
copies exchange their gathered (unsharded) gradients in the executor before `finish_step`, so the
reduce-scatter sees the sum of both directions, as the optimizer step of the two copies must.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from frugalm.parallel.data_parallel import broadcast_from_first, expert_parameters, shard_expert_blocks
from frugalm.parallel.expert_parallel import expert_parallel_modules
from frugalm.parallel.mesh import ParallelMesh
from frugalm.parallel.schedules import PipelineSchedule, compute_chunks


def defers_weight_grads(schedule: PipelineSchedule) -> bool:
    """Whether some rank of ``schedule`` runs a W (deferred weight-gradient) chunk."""
    return any(c.kind == "W" for acts in schedule.actions for a in acts for c in compute_chunks(a))


class PipelineFSDP:
    """The FSDP units of one pipeline rank and the per-step gradient-reduction protocol (module docstring)."""

    def __init__(self, units: list[nn.Module], reshard_after_forward: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.modules = [m for m in units if isinstance(m, FSDPModule)]
        self.reshard_after_forward = reshard_after_forward

    def _states(self) -> list:
        from torch.distributed.fsdp import fully_shard

        return [fully_shard.state(m) for m in self.modules]

    def begin_step(self) -> None:
        """Before the step's first forward: accumulate unsharded gradients, reduce nothing yet."""
        for m in self.modules:
            m.set_is_last_backward(False)
            m.set_requires_gradient_sync(False, recurse=False)
            m.set_reshard_after_backward(self.reshard_after_forward, recurse=False)

    def finish_step(self) -> None:
        """After the step's last backward chunk: reduce-scatter every unit's accumulated gradient once
        (sharded DTensor ``.grad`` on every held parameter) and reshard the parameters."""
        for m in self.modules:
            m.set_is_last_backward(True)
            m.set_requires_gradient_sync(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
        roots = [s for s in self._states() if s._is_root]  # each unit that ran a forward first is a root
        for root in roots:
            for state in root._state_ctx.all_states:
                for group in state._fsdp_param_groups:
                    group.post_backward()  # idempotent; a no-op for a group without gradients
            root._root_post_backward_final_callback()  # waits for the reductions, resets per-step state

    def reshard(self) -> None:
        """Free gathered parameters (after a forward-only pass, e.g. evaluation)."""
        for m in self.modules:
            m.reshard()


def shard_pipeline_stages(model: nn.Module, mine: Mapping[int, nn.Module], mesh: ParallelMesh,
                          schedule: PipelineSchedule, reshard_after_forward: bool = True) -> PipelineFSDP:
    """`fully_shard` the stages this rank holds (``mine``: stage index -> `DecoderStage`) over dp x ep.

    Call after `PipelineReplicas.release_unheld` (released parameters stay plain meta tensors) and
    before building the optimizer; then `PipelineReplicas.rebind` the replicas to the new parameters.
    """
    from torch.distributed.fsdp import fully_shard

    reshard = reshard_after_forward and not defers_weight_grads(schedule)
    held = {id(p) for stage in mine.values() for p in stage.parameters()}
    experts = expert_parameters(model)
    held_experts = [p for p in experts if id(p) in held]
    # stages of one rank can share parameters (DualPipeV: the first and last stage both embed tokens)
    broadcast_from_first([p for p in _unique(p for stage in mine.values() for p in stage.parameters())
                          if p not in experts], mesh.group("dp_ep"))
    broadcast_from_first(held_experts, mesh.group("dp"))
    blocks = [b for b in expert_parallel_modules(model).values()
              if any(id(p) in held for p in b.parameters())]
    units: list[nn.Module] = list(blocks)
    ignored = shard_expert_blocks(blocks, mesh, reshard) or None
    if mesh.group("dp_ep") is None:  # one rank per stage: nothing to shard the rest over
        return PipelineFSDP(units, reshard)
    dp_ep = mesh.device_mesh("dp_ep")
    seen: set[int] = set()
    for s in sorted(mine):
        stage = mine[s]
        for unit in [*stage.layers, *stage.mtp, stage.embed_tokens, stage.norm, stage.lm_head]:
            if unit is None or id(unit) in seen:
                continue
            seen.add(id(unit))
            fully_shard(unit, mesh=dp_ep, reshard_after_forward=reshard, ignored_params=ignored)
            units.append(unit)
    _check_all_sharded(mine, ignored or set())
    return PipelineFSDP(units, reshard)


def _unique(params) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _check_all_sharded(mine: Mapping[int, nn.Module], ignored: set[nn.Parameter]) -> None:
    """Every held parameter is now an FSDP DTensor (or an expert shard unique to this rank)."""
    from torch.distributed.tensor import DTensor

    loose = sorted({n for stage in mine.values() for n, p in stage.named_parameters()
                    if not isinstance(p, DTensor) and p not in ignored})
    if loose:
        raise RuntimeError(f"pipeline FSDP: parameters of held stages in no FSDP unit: {loose[:5]}")
