"""Split a stage's backward into an input-gradient pass now and a weight-gradient pass later.

Zero-bubble schedules (ZB1P, DualPipe's W slots) need the gradient w.r.t. a stage's *input* early, since
the previous rank waits for it, while the gradient w.r.t. its *weights* can run whenever the rank would
otherwise sit idle. DualPipe's reference code gets this split from custom autograd Functions that push
their weight-gradient closures into a global store; that ties every layer to a custom Linear and keeps
global state. Here the split works on any ``nn.Module`` from the autograd graph alone:

1. Mark the graph nodes that lie on a path from the stage output to the stage input ("input side").
2. For each parameter, walk up from its gradient accumulator until an input-side node is met. Those
   nodes ("anchors", e.g. the ``AddmmBackward`` of a Linear) are where the parameter's gradient
   branches off the input path.
3. Run ``autograd.grad`` for the input only (``retain_graph=True``), capturing the gradient that
   flows *into* each anchor with a pre-hook.
4. Later (the W slot), run ``autograd.grad`` from the anchors, with the captured gradients, to the
   parameters. The engine then only computes the weight-side outputs of each anchor (e.g. the
   ``grad_output^T @ input`` matmul of a Linear) plus any parameter-only branches, so W costs about
   what a weight gradient costs rather than a second full backward.

Parameters whose anchors chain into each other (a weight used twice along the input path) are put
in one group, and the anchors' incoming gradients are pinned to the captured values during W, so a
gradient reaching an anchor twice (once captured, once re-propagated) is never double counted.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@dataclass
class _ParamGroup:
    params: list[torch.Tensor]
    anchors: list[Node]
    captured: list[tuple[torch.Tensor | None, ...] | None]


class DeferredWeightGrad:
    """The weight-gradient half of a split backward; ``run()`` accumulates into ``param.grad`` once."""

    def __init__(self, groups: list[_ParamGroup], roots: list[tuple[GradientEdge, torch.Tensor]],
                 root_params: list[torch.Tensor]) -> None:
        self._groups = groups
        self._roots = roots  # output edges feeding parameter-only branches (not via the input path)
        self._root_params = root_params
        self._done = False

    def run(self) -> None:
        if self._done:
            raise RuntimeError("deferred weight gradient already computed")
        self._done = True
        for group in self._groups:
            edges: list[GradientEdge] = []
            grads: list[torch.Tensor] = []
            for anchor, captured in zip(group.anchors, group.captured):
                if captured is None:
                    continue
                for i, g in enumerate(captured):
                    if g is not None:
                        edges.append(GradientEdge(anchor, i))
                        grads.append(g)
            if not edges:
                continue
            handles = []
            if len(group.anchors) > 1:
                # pin every anchor's incoming gradient to what the input pass saw
                for anchor, captured in zip(group.anchors, group.captured):
                    if captured is not None:
                        handles.append(anchor.register_prehook(lambda _g, c=captured: c))
            try:
                _accumulate(group.params, edges, grads)
            finally:
                for h in handles:
                    h.remove()
        if self._roots and self._root_params:
            _accumulate(self._root_params, [e for e, _ in self._roots], [g for _, g in self._roots])
        self._groups, self._roots, self._root_params = [], [], []


def _accumulate(params: list[torch.Tensor], edges: list[GradientEdge], grads: list[torch.Tensor]) -> None:
    param_edges = [get_gradient_edge(p) for p in params]
    result = torch.autograd.grad(edges, param_edges, grads, retain_graph=True, allow_unused=True)
    for p, g in zip(params, result):
        if g is None:
            continue
        if p.grad is None:
            # own the storage: autograd may hand back expanded or aliasing views
            p.grad = g if (g.is_contiguous() and g._base is None and g.shape == p.shape) else g.clone()
        else:
            p.grad.add_(g)


def backward_input_only(
    output: torch.Tensor,
    output_grad: torch.Tensor | None,
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor | None], DeferredWeightGrad]:
    """Gradient of ``output`` w.r.t. ``inputs`` now; the parameters' share as a deferred task.

    ``inputs`` are the stage's input tensors that require grad (may be empty: the first stage, whose
    input is token ids, then has everything deferred). ``output_grad`` is None for a scalar loss.
    The graph stays alive until the returned task has run.
    """
    if output.grad_fn is None:
        raise ValueError("backward_input_only needs an output produced by autograd-tracked ops")
    grad = torch.ones_like(output) if output_grad is None else output_grad
    root = output.grad_fn
    params = [p for p in params if p.requires_grad]

    # parents[n] = nodes whose backward feeds n (reverse of next_functions), over the reachable graph
    parents: dict[Node, list[Node]] = defaultdict(list)
    seen = {root}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents[child].append(node)
            if child not in seen:
                seen.add(child)
                queue.append(child)

    input_nodes = [get_gradient_edge(x).node for x in inputs if x.requires_grad]
    input_side: set[Node] = set()
    queue = deque(n for n in input_nodes if n in seen)
    input_side.update(queue)
    while queue:
        node = queue.popleft()
        for parent in parents[node]:
            if parent not in input_side:
                input_side.add(parent)
                queue.append(parent)

    # anchors of each parameter, and whether it is also reached straight from the root
    param_anchors: list[set[Node]] = []
    from_root: list[bool] = []
    for p in params:
        start = get_gradient_edge(p).node
        anchors: set[Node] = set()
        hit_root = False
        visited = {start}
        queue = deque([start] if start in seen else [])
        while queue:
            node = queue.popleft()
            if node is root and node not in input_side:
                hit_root = True
            for parent in parents[node]:
                if parent in input_side:
                    anchors.add(parent)
                elif parent not in visited:
                    visited.add(parent)
                    queue.append(parent)
        param_anchors.append(anchors)
        from_root.append(hit_root)

    # union parameters that share an anchor into groups
    owner: dict[Node, int] = {}
    group_of = list(range(len(params)))

    def find(i: int) -> int:
        while group_of[i] != i:
            group_of[i] = group_of[group_of[i]]
            i = group_of[i]
        return i

    for i, anchors in enumerate(param_anchors):
        for a in anchors:
            if a in owner:
                group_of[find(i)] = find(owner[a])
            else:
                owner[a] = i
    members: dict[int, list[int]] = defaultdict(list)
    for i, anchors in enumerate(param_anchors):
        if anchors:
            members[find(i)].append(i)
    groups = []
    for idx in members.values():
        anchor_list = sorted({a for i in idx for a in param_anchors[i]}, key=id)
        groups.append(_ParamGroup([params[i] for i in idx], anchor_list, [None] * len(anchor_list)))

    handles = []
    for group in groups:
        for k, anchor in enumerate(group.anchors):
            def capture(grad_outputs: tuple[torch.Tensor | None, ...], group: _ParamGroup = group, k: int = k) -> None:
                group.captured[k] = tuple(grad_outputs)

            handles.append(anchor.register_prehook(capture))
    try:
        needs = [x for x in inputs if x.requires_grad]
        if needs and root in input_side:
            input_grads = list(torch.autograd.grad([output], needs, [grad], retain_graph=True, allow_unused=True))
        else:
            input_grads = [None] * len(needs)
    finally:
        for h in handles:
            h.remove()

    root_params = [p for p, hit in zip(params, from_root) if hit]
    roots = [(get_gradient_edge(output), grad)] if root_params else []
    return input_grads, DeferredWeightGrad(groups, roots, root_params)
