"""Communication per training step: MoE all-to-all, data-parallel gradient sync, pipeline and tensor traffic.

The expert-parallel model follows DeepSeek-V3 §3.2.2: a token crosses the scale-out network (IB/RoCE)
once per remote node its experts live on, to the GPU with the same local index there, and is forwarded
over the scale-up fabric (NVLink) to each expert's GPU; combine returns the same way. Node-limited
routing caps the nodes per token (V3: 4 of 8). IB and NVLink stages are pipelined, so the all-to-all
takes the longer of the two. Collectives use ring volumes: 2(n−1)/n of the buffer for an all-reduce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from frugalm.config import ConfigError
from frugalm.plan.arch import ModelShape
from frugalm.plan.chips import Chip
from frugalm.plan.layout import DTYPE_BYTES, FP8_BYTES, LayoutConfig


@dataclass
class CommConfig:
    """How communication is carried and overlapped (`[comm]` section)."""

    max_nodes_per_token: int = 0  # node-limited routing M; 0 = derive from the router's group limit
    dispatch_dtype: str = "auto"  # auto (fp8 with an FP8 layout, else bf16) | fp8 | bf16
    ep_overlap: str = "auto"  # auto (hidden under compute with dualpipe/dualpipev, else exposed) | full | none
    scale_up_efficiency: float = 0.8  # usable / nominal when a chip has no measured figure (H800: 160 of 200)
    scale_out_efficiency: float = 1.0  # DeepSeek plans with the full 50 GB/s of a 400 Gb/s NIC

    def __post_init__(self) -> None:
        problems = []
        if self.max_nodes_per_token < 0:
            problems.append("max_nodes_per_token must be >= 0")
        if self.dispatch_dtype not in ("auto", "fp8", "bf16"):
            problems.append("dispatch_dtype must be auto, fp8 or bf16")
        if self.ep_overlap not in ("auto", "full", "none"):
            problems.append("ep_overlap must be auto, full or none")
        for name in ("scale_up_efficiency", "scale_out_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must be in (0, 1]")
        if problems:
            raise ConfigError("invalid [comm]: " + "; ".join(problems))


def expected_nodes_hit(nodes: float, experts_per_node: int, k: int) -> float:
    """Expected distinct nodes among `nodes` when k distinct experts are drawn uniformly from all of theirs.

    Uniform draws are the balanced-load assumption that aux-loss-free balancing aims for.
    """
    n_whole = int(round(nodes))
    total = n_whole * experts_per_node
    if n_whole <= 1 or k <= 0:
        return float(min(n_whole, 1 if k > 0 else 0))
    miss = 1.0  # P(one given node gets none of the k experts)
    for i in range(k):
        miss *= max(total - experts_per_node - i, 0) / (total - i)
    return n_whole * (1.0 - miss)


def node_limit(shape: ModelShape, ep_nodes: int, comm: CommConfig) -> int:
    """Nodes a token may reach: the configured M, else what the router's group limit implies when its
    groups map onto nodes (V3: top-4 of 8 groups, one group of 32 experts per node, so 4), else all."""
    if comm.max_nodes_per_token:
        return min(comm.max_nodes_per_token, ep_nodes)
    g, t = shape.n_group, shape.topk_group
    if g > 1 and t < g:
        if g % ep_nodes == 0:  # whole groups per node: t groups touch at most t nodes
            return min(ep_nodes, t)
        if ep_nodes % g == 0:  # each group spans ep_nodes/g nodes
            return min(ep_nodes, t * ep_nodes // g)
    return ep_nodes


@dataclass
class EpTraffic:
    """All-to-all bytes per token per MoE layer (forward + backward, dispatch + combine)."""

    ep_nodes: int
    nodes_reached: float
    remote_nodes: float
    scale_up_bytes: float
    scale_out_bytes: float
    bytes_per_element: float


def ep_traffic(shape: ModelShape, layout: LayoutConfig, gpus_per_node: int, comm: CommConfig) -> EpTraffic:
    ep = layout.ep
    if ep <= 1 or not shape.is_moe:
        return EpTraffic(1, 0.0, 0.0, 0.0, 0.0, 0.0)
    dispatch = comm.dispatch_dtype
    if dispatch == "auto":
        dispatch = "fp8" if layout.precision == "fp8" else "bf16"
    # forward dispatch (fp8 + scales, or bf16) and combine (bf16); backward moves bf16 gradients both ways.
    per_elem = (FP8_BYTES if dispatch == "fp8" else 2.0) + 2.0 + 2.0 + 2.0
    g = min(ep, gpus_per_node)
    nodes = max(1, ep // gpus_per_node)
    k, d = shape.top_k, shape.hidden
    up = k * (1.0 - 1.0 / g) * d * per_elem
    if nodes == 1:
        return EpTraffic(1, 1.0, 0.0, up, 0.0, per_elem)
    limit = node_limit(shape, nodes, comm)
    per_node = shape.n_routed_experts // nodes
    reached = expected_nodes_hit(limit, per_node, k) if limit < nodes else expected_nodes_hit(nodes, per_node, k)
    remote = reached * (nodes - 1) / nodes
    return EpTraffic(nodes, reached, remote, up, remote * d * per_elem, per_elem)


@dataclass
class CommEstimate:
    """Seconds per step on the busiest rank, before any overlap with compute."""

    ep_scale_up_s: float
    ep_scale_out_s: float
    ep_s: float  # the pipelined all-to-all: max of its two legs
    dp_s: float
    pp_s: float
    tp_s: float
    total_s: float
    ep_nodes: int
    nodes_reached: float
    scale_up_gbs: float  # usable per direction
    scale_out_gbs: float
    dp_link: str
    bytes: dict

    def to_dict(self) -> dict:
        return asdict(self)


def step_comm(
    shape: ModelShape, layout: LayoutConfig, chip: Chip, comm: CommConfig, *, gpus_per_node: int,
    tokens_per_replica: float, moe_layer_visits: float, layer_visits: float, micro_batches: int,
    chunk_visits: int, seq_len: int, dense_params_local: float, expert_params_local: float,
) -> CommEstimate:
    """Per-step communication of one rank.

    `tokens_per_replica` is the step's tokens divided by dp; `moe_layer_visits` / `layer_visits` are the
    MoE / all layers a token passes on this rank (DualPipe's two stages each see half the micro-batches).
    """
    up_bw = chip.scale_up_gbs_per_direction(comm.scale_up_efficiency) * 1e9
    out_bw = chip.scale_out_gbs_per_direction(comm.scale_out_efficiency) * 1e9
    count = layout.dp * layout.pp * layout.tp
    tokens_rank = tokens_per_replica / layout.tp

    traffic = ep_traffic(shape, layout, gpus_per_node, comm)
    ep_up_bytes = tokens_rank * moe_layer_visits * traffic.scale_up_bytes
    ep_out_bytes = tokens_rank * moe_layer_visits * traffic.scale_out_bytes
    if (ep_up_bytes and not up_bw) or (ep_out_bytes and not out_bw):
        raise ConfigError(f"chip {chip.key!r} has no {'scale-up' if not up_bw else 'scale-out'} bandwidth for expert parallelism")
    ep_up = ep_up_bytes / up_bw if ep_up_bytes else 0.0
    ep_out = ep_out_bytes / out_bw if ep_out_bytes else 0.0

    # Gradient sync with ring collectives (each moves (n-1)/n of its buffer per pass):
    # ZeRO-0/1 all-reduce the accumulated gradients once, 2(n-1)/n of them; ZeRO-2 cannot keep the full
    # gradients, so it reduce-scatters after every micro-batch and all-gathers the updated weights once;
    # ZeRO-3 also all-gathers the weights for every micro-batch's forward and backward.
    b_g, b_w = DTYPE_BYTES[layout.grad_dtype], DTYPE_BYTES[layout.param_dtype]

    def sync(params: float, n: int) -> float:
        if n <= 1:
            return 0.0
        share = (n - 1) / n * params
        if layout.zero >= 3:
            return micro_batches * share * (2 * b_w + b_g)
        if layout.zero == 2:
            return micro_batches * share * b_g + share * b_w
        return 2 * share * b_g

    dp_bytes = sync(dense_params_local, layout.dp) + sync(expert_params_local, layout.expert_dp)
    dp_inside = layout.dp * layout.tp <= gpus_per_node
    dp_bw = up_bw if dp_inside else out_bw
    dp_s = dp_bytes / dp_bw if dp_bytes else 0.0

    # Pipeline: each chunk visit sends its activations forward and receives their gradient back (bf16).
    tokens_micro = layout.micro_batch * seq_len / layout.tp
    pp_bytes = 0.0
    if layout.pp > 1:
        pp_bytes = 2 * micro_batches * chunk_visits * tokens_micro * shape.hidden * 2.0
    pp_bw = up_bw if count <= gpus_per_node else out_bw
    pp_s = pp_bytes / pp_bw if pp_bytes else 0.0

    # Tensor parallel with sequence parallel: 2 all-gathers + 2 reduce-scatters forward, as many backward.
    tp_bytes = 0.0
    if layout.tp > 1:
        tp_bytes = layer_visits * micro_batches * 8 * (layout.tp - 1) / layout.tp * tokens_micro * layout.tp * shape.hidden * 2.0
    tp_s = tp_bytes / up_bw if tp_bytes else 0.0

    ep_s = max(ep_up, ep_out)
    return CommEstimate(
        ep_scale_up_s=ep_up, ep_scale_out_s=ep_out, ep_s=ep_s, dp_s=dp_s, pp_s=pp_s, tp_s=tp_s,
        total_s=ep_s + dp_s + pp_s + tp_s, ep_nodes=traffic.ep_nodes, nodes_reached=traffic.nodes_reached,
        scale_up_gbs=up_bw / 1e9, scale_out_gbs=out_bw / 1e9, dp_link="scale-up" if dp_inside else "scale-out",
        bytes={"ep_scale_up": ep_up_bytes, "ep_scale_out": ep_out_bytes, "dp": dp_bytes, "pp": pp_bytes, "tp": tp_bytes},
    )
