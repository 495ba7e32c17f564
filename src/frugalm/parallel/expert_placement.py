"""Which EP rank (and node) owns which routed expert, and what node-limited routing guarantees.

Experts are placed contiguously: with E experts and ep ranks, rank r owns experts
``[r*E/ep, (r+1)*E/ep)``, and node k owns ranks ``[k*R, (k+1)*R)`` for R = ``ep_ranks_per_node``. The router's
routing groups (``model.n_group``) are contiguous blocks of ``E/n_group`` experts, so a group lies inside
one node exactly when ``n_group`` is a multiple of the node count. Then the router's group limit
(``topk_group`` groups per token) is also a node limit: a token's experts live on at most ``topk_group``
nodes. That is DeepSeek-V3's node-limited routing (§2.1.2): 8 groups = 8 nodes, ``topk_group = M = 4``.

`placement_for` checks that the mesh and the model agree and, when ``max_nodes_per_token`` (M) is set,
that M is really guaranteed; the error names the field to change. Nothing here changes the routing
function: ``n_group``/``topk_group`` are architecture (they are in the HF config), the mesh only has to
line up with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugalm.config import ConfigError
from frugalm.model.config import ModelConfig
from frugalm.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ExpertPlacement:
    """The expert -> rank -> node map of one expert-parallel group and the routing limits it implies."""

    n_experts: int
    ep: int
    ranks_per_node: int
    n_group: int
    topk_group: int
    top_k: int
    group_limited: bool  # does the router restrict tokens to topk_group groups at all?

    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.ep

    @property
    def nodes(self) -> int:
        return self.ep // self.ranks_per_node

    @property
    def groups_align_with_nodes(self) -> bool:
        """True when every routing group's experts sit on a single node."""
        return self.n_group % self.nodes == 0

    def experts_of_rank(self, rank: int) -> range:
        n = self.experts_per_rank
        return range(rank * n, (rank + 1) * n)

    def rank_of_expert(self, expert: torch.Tensor | int):
        return expert // self.experts_per_rank

    def node_of_expert(self, expert: torch.Tensor | int):
        return expert // (self.experts_per_rank * self.ranks_per_node)

    def max_nodes_per_token(self) -> int:
        """The most nodes one token can reach under this router and placement (a guarantee, not a sample)."""
        bound = min(self.top_k, self.nodes)
        if self.group_limited and self.groups_align_with_nodes:
            bound = min(bound, self.topk_group)
        return bound

    def describe(self) -> str:
        per_group = self.n_experts // self.n_group
        lines = [f"expert placement: {self.n_experts} experts over ep={self.ep} ranks "
                 f"({self.experts_per_rank} each), {self.nodes} node(s) of {self.ranks_per_node} rank(s); "
                 f"each token reaches at most {self.max_nodes_per_token()} node(s)"]
        for r in range(self.ep):
            ex = self.experts_of_rank(r)
            groups = sorted({e // per_group for e in ex})
            lines.append(f"  ep rank {r} (node {r // self.ranks_per_node}): experts {ex.start}-{ex.stop - 1}, "
                         f"routing group(s) {', '.join(map(str, groups))}")
        return "\n".join(lines)


def placement_for(model: ModelConfig, cfg: ParallelConfig) -> ExpertPlacement:
    """The placement of ``model``'s experts under ``cfg``; a ConfigError if they cannot be placed or limited."""
    E = model.n_routed_experts
    if E and E % cfg.ep:
        raise ConfigError(
            f"[parallel] ep = {cfg.ep} does not divide model.n_routed_experts = {E}: every EP rank must own the "
            f"same number of experts"
        )
    placement = ExpertPlacement(
        n_experts=E, ep=cfg.ep, ranks_per_node=cfg.ep_ranks_per_node, n_group=max(1, model.n_group),
        topk_group=model.topk_group, top_k=model.num_experts_per_tok,
        group_limited=model.n_group > 1 and model.topk_method != "greedy",
    )
    M = cfg.max_nodes_per_token
    if M and E:
        got = placement.max_nodes_per_token()
        if got > M:
            if not placement.group_limited:
                how = (f"the router does not limit groups (n_group = {model.n_group}, topk_method = "
                       f"{model.topk_method!r}); use n_group = {placement.nodes} (one group per node) and "
                       f"topk_group <= {M}")
            elif not placement.groups_align_with_nodes:
                how = (f"model.n_group = {model.n_group} routing groups do not line up with the {placement.nodes} "
                       f"nodes (n_group must be a multiple of the node count, ideally equal to it)")
            else:
                how = f"model.topk_group = {model.topk_group} groups per token; set topk_group <= {M}"
            raise ConfigError(
                f"[parallel] max_nodes_per_token = {M} is not guaranteed: a token can reach {got} of "
                f"{placement.nodes} nodes because {how}"
            )
    return placement


def nodes_per_token(indices: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """For routing indices [N, K], how many distinct nodes each token's experts live on ([N])."""
    nodes = placement.node_of_expert(indices)
    hit = torch.zeros(indices.shape[0], placement.nodes, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, nodes, True)
    return hit.sum(1)


def ep_rank_loads(counts: torch.Tensor, ep: int) -> torch.Tensor:
    """Per-expert token counts [E] -> tokens each EP rank computes [ep] (the per-rank load to log)."""
    return counts.reshape(ep, -1).sum(1)
