"""Input-gradient-now / weight-gradient-later backward equals one ordinary backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from frugalm.parallel.split_backward import backward_input_only


class TiedAndBranchy(nn.Module):
    """One Linear used twice on the input path, a scale, a residual and a parameter-only branch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.offset = nn.Parameter(torch.zeros(8))
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.lin(x))) * self.scale
        return self.lin(h) + x + self.offset.pow(2).sum()


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.embed(ids))


def _reference(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None):
    module.zero_grad(set_to_none=True)
    xr = x.detach().requires_grad_(x.is_floating_point())
    y = module(xr)
    if grad_out is None:
        y = y.square().mean()
    torch.autograd.backward(y, grad_out)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, xr.grad


@pytest.mark.parametrize(
    "module, x, with_grad",
    [
        (nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), torch.randn(4, 8), True),
        (TiedAndBranchy(), torch.randn(2, 3, 8), True),
        (TiedAndBranchy(), torch.randn(4, 8), False),  # scalar loss at the root (last stage)
        (Embedder(), torch.randint(0, 10, (4, 5)), True),  # first stage: no input gradient at all
    ],
)
def test_split_equals_full_backward(module: nn.Module, x: torch.Tensor, with_grad: bool) -> None:
    torch.manual_seed(0)
    grad_out = torch.randn(*x.shape[:2], 8) if with_grad and not x.is_floating_point() else (
        torch.randn_like(x) if with_grad else None)
    ref_grads, ref_dx = _reference(module, x, grad_out)

    module.zero_grad(set_to_none=True)
    xs = x.detach().requires_grad_(x.is_floating_point())
    y = module(xs)
    if grad_out is None:
        y = y.square().mean()
    dx, task = backward_input_only(y, grad_out, [xs] if xs.requires_grad else [], list(module.parameters()))
    assert all(p.grad is None for p in module.parameters()), "the input pass must not touch weight gradients"
    if ref_dx is not None:
        torch.testing.assert_close(dx[0], ref_dx, rtol=1e-6, atol=1e-7)
    task.run()
    got = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert got.keys() == ref_grads.keys()
    for name in got:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(RuntimeError, match="already"):
        task.run()


def test_weight_pass_skips_the_input_path() -> None:
    """W reruns only the weight side of each layer, not the activation-gradient chain."""
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    y = mlp(x)
    gelu_node = y.grad_fn.next_functions[1][0]  # AddmmBackward -> (bias, input=GeluBackward, weight^T)
    assert "Gelu" in type(gelu_node).__name__
    dx, task = backward_input_only(y, torch.ones_like(y), [x], list(mlp.parameters()))
    calls = []
    handle = gelu_node.register_prehook(lambda g: calls.append(1))
    task.run()
    handle.remove()
    assert calls == [], "the weight pass re-ran the activation gradient through GELU"
    assert all(p.grad is not None for p in mlp.parameters())


def test_gradients_accumulate_across_micro_batches() -> None:
    lin = nn.Linear(4, 4)
    xs = [torch.randn(2, 4) for _ in range(3)]
    ref = nn.Linear(4, 4)
    ref.load_state_dict(lin.state_dict())
    sum(ref(x).sum() for x in xs).backward()
    tasks = []
    for x in xs:
        x = x.requires_grad_()
        y = lin(x)
        tasks.append(backward_input_only(y, torch.ones_like(y), [x], list(lin.parameters()))[1])
    for t in reversed(tasks):  # order of W slots does not matter
        t.run()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad)
