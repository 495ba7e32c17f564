"""`parallelize(model, mesh, cfg)`: expert parallelism, then data parallelism, applied to a plain model.

The order matters: expert parallelism first replaces each MoE's experts by this rank's shard, so data
parallelism can see which parameters are EP-sharded (averaged over ``dp``) and which are replicated over
the whole stage (averaged over ``dp_ep``). The model's class, parameter names and methods are kept, so
the trainer, FP8 (`apply_fp8`, before or after) and checkpoint code keep working; only expert tensors
have local shapes, and `frugalm.parallel.checkpoint` gathers them back.

Pipeline parallelism (``pp > 1``): `parallelize` is applied to the whole model on every rank, then
`frugalm.parallel.pipeline_model.split_model` cuts it into stages that share its modules, each rank
releases the parameters of the stages it does not run (`PipelineReplicas.release_unheld`), and the
trainer turns the DDP hooks off and reduces its held gradients over dp x ep once per step, after the
pipeline (`restrict_gradient_sync`). Under ``dp_mode = "fsdp"`` the data-parallel part waits until
then: ``parallelize(..., data_parallel=False)`` applies expert parallelism only, and
`frugalm.parallel.pipeline_fsdp.shard_pipeline_stages` shards just the held stages.
"""

from __future__ import annotations

import logging

from torch import nn

from frugalm.parallel.config import ParallelConfig
from frugalm.parallel.data_parallel import apply_data_parallel
from frugalm.parallel.expert_parallel import apply_expert_parallel
from frugalm.parallel.expert_placement import ExpertPlacement, placement_for
from frugalm.parallel.mesh import ParallelMesh

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig, *,
                data_parallel: bool = True) -> nn.Module:
    """Shard experts over ``ep`` and replicate/shard the rest over ``dp x ep``; in place, returned.

    ``data_parallel=False``: expert parallelism only (a pipelined FSDP run shards its stages later).

    ``model`` must already hold its initial (or loaded) weights, identical on every rank up to the
    broadcast data parallelism does from each group's first rank; or load them afterwards with
    `frugalm.parallel.checkpoint.load_full_state_dict`.
    """
    if (cfg.pp, cfg.ep) != (mesh.pp, mesh.ep) or (cfg.dp and cfg.dp != mesh.dp):
        raise ValueError(f"mesh pp{mesh.pp}·dp{mesh.dp}·ep{mesh.ep} was not built from this [parallel] "
                         f"(pp={cfg.pp}, dp={cfg.dp}, ep={cfg.ep})")
    model_cfg = getattr(model, "config", None)
    if model_cfg is not None and model_cfg.n_routed_experts:
        placement: ExpertPlacement = placement_for(model_cfg, cfg)
        if mesh.ep > 1 and mesh.rank == 0:
            log.info(placement.describe())
    apply_expert_parallel(model, mesh.group("ep"), mesh.ep_backward_group)
    if data_parallel:
        apply_data_parallel(model, mesh, cfg)
    return model
