"""`ParallelConfig`: the ``[parallel]`` section -- how the world's ranks are split into dp x ep x pp.

One dataclass for the data/expert-parallel concern. The pipeline *schedule* and micro-batch count are
the pipeline's concern and live in ``[pipeline]`` (`frugalm.parallel.pipeline.PipelineConfig`); only the
pipeline *degree* ``pp`` is here, because it takes part in dividing the world into a mesh.

Load it like every other section: ``from_dict(ParallelConfig, raw["parallel"], "parallel")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from frugalm.config import ConfigError


@dataclass
class ParallelConfig:
    """Mesh degrees, the data-parallel flavour, node-limited routing and failure handling.

    The mesh is ``pp x dp x ep`` in row-major order (ep fastest): the ep ranks of one expert group are
    neighbours, which puts them on one host when they fit, the usual choice for the heaviest traffic.
    Non-expert parameters are replicated (or FSDP-sharded) over the ``dp*ep`` ranks of a pipeline stage;
    expert parameters are split over ``ep`` and replicated over ``dp``.
    """

    # Data-parallel degree; 0 means "whatever the world size leaves": world / (ep * pp).
    dp: int = 0
    # Expert-parallel degree: routed experts are split into ep contiguous blocks, one per rank.
    ep: int = 1
    # Pipeline-parallel degree (the schedule itself is [pipeline].schedule).
    pp: int = 1
    # "ddp": replicated parameters, bucketed gradient all-reduce overlapped with backward.
    # "fsdp": torch FSDP2 (`fully_shard`) per decoder layer; expert blocks sharded over dp.
    dp_mode: Literal["ddp", "fsdp"] = "ddp"
    # "auto": NCCL when the training device is CUDA, gloo otherwise.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Every collective of every process group gives up after this long, so a dead or stuck rank ends
    # the run with an error on the others instead of a hang.
    timeout_s: float = 300.0
    # Node-limited routing (DeepSeek-V3 §2.1.2). The ep ranks are grouped into nodes of this many
    # consecutive ranks; routing groups (model.n_group) must each lie inside one node.
    ep_ranks_per_node: int = 1
    # M: each token may reach experts on at most this many nodes. 0 = not enforced. When set, startup
    # fails unless model.n_group / model.topk_group guarantee it under this mesh.
    max_nodes_per_token: int = 0
    # DDP: gradient bucket size in MiB (one async all-reduce per bucket).
    bucket_mb: float = 25.0
    # FSDP: free the gathered parameters after each layer's forward (re-gathered for backward).
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.dp < 0:
            problems.append(f"dp must be >= 0 (0 = infer from the world size), got {self.dp}")
        for name in ("ep", "pp", "ep_ranks_per_node"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_nodes_per_token < 0:
            problems.append(f"max_nodes_per_token must be >= 0 (0 = not enforced), got {self.max_nodes_per_token}")
        if self.ep >= 1 and self.ep_ranks_per_node >= 1 and self.ep % self.ep_ranks_per_node:
            problems.append(
                f"ep ({self.ep}) must be a multiple of ep_ranks_per_node ({self.ep_ranks_per_node}): nodes hold "
                f"whole blocks of consecutive ep ranks"
            )
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.bucket_mb <= 0:
            problems.append(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if problems:
            raise ConfigError("[parallel] " + "; ".join(problems))

    @property
    def ep_nodes(self) -> int:
        """How many nodes the ep ranks of one expert group span."""
        return self.ep // self.ep_ranks_per_node

    def resolve(self, world_size: int) -> tuple[int, int, int]:
        """(pp, dp, ep) for ``world_size`` ranks, or a ConfigError saying why they do not fit."""
        fixed = self.ep * self.pp
        if self.dp == 0:
            if world_size % fixed:
                raise ConfigError(
                    f"[parallel] world size {world_size} is not divisible by ep*pp = {self.ep}*{self.pp} = {fixed}; "
                    f"launch a multiple of {fixed} processes or change ep/pp"
                )
            return self.pp, world_size // fixed, self.ep
        if self.dp * fixed != world_size:
            raise ConfigError(
                f"[parallel] dp*ep*pp = {self.dp}*{self.ep}*{self.pp} = {self.dp * fixed} does not equal the world "
                f"size {world_size}; launch {self.dp * fixed} processes or set dp = 0 to infer it"
            )
        return self.pp, self.dp, self.ep
