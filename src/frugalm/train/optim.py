"""AdamW with FP32 master weights and optionally BF16 moments, whose state round-trips through safetensors.

Why not `torch.optim.AdamW`: it keeps moments in the parameter's dtype (no BF16 moments next to FP32
weights, DeepSeek-V3 §3.3) and its `state_dict` is keyed by position and meant for pickle. Here the
state is a flat ``{"<param name>.exp_avg": tensor, ...}`` dict, so a checkpoint is one safetensors file
that survives reordering or adding parameters, and a resumed run continues bit-for-bit.

Parameters kept in low precision (a BF16 model) get an FP32 master copy in the optimizer; the update is
computed on the master and rounded into the parameter. FP32 parameters are their own master.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter), bias-corrected; one `step` per optimizer step.

    Moments are updated in FP32 arithmetic whatever their storage dtype, so BF16 moments only add the
    rounding of storing them (no BF16 accumulation error).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        bf16_moments: bool = False,
        no_decay: tuple[str, ...] = (),
    ):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("AdamW got no trainable parameters")
        # Matrices decay; vectors (norm gains, biases) do not: decaying a norm gain only fights the model.
        decay = [(n, p) for n, p in named if p.dim() >= 2 and not any(s in n for s in no_decay)]
        rest = [(n, p) for n, p in named if not (p.dim() >= 2 and not any(s in n for s in no_decay))]
        groups = []
        for items, wd in ((decay, weight_decay), (rest, 0.0)):
            if items:
                groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "weight_decay": wd})
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = torch.bfloat16 if bf16_moments else torch.float32
        self.step_count = 0

    def _state_for(self, p: nn.Parameter) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                state["master"] = p.detach().float().clone()
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise NotImplementedError("AdamW.step does not take a closure")
        self.step_count += 1
        t = self.step_count
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            bc1 = 1.0 - b1 ** t
            bc2 = 1.0 - b2 ** t
            step_size = lr / bc1
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p)
                grad = p.grad.float()
                master = state.get("master", p)
                if self.moment_dtype == torch.float32:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(grad, 1.0 - b1)
                    v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
                else:
                    m = state["exp_avg"].float().lerp_(grad, 1.0 - b1)
                    v = state["exp_avg_sq"].float().mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                if wd:
                    master.mul_(1.0 - lr * wd)
                denom = (v / bc2).sqrt_().add_(eps)
                master.addcdiv_(m, denom, value=-step_size)
                if master is not p:
                    p.copy_(master)
        return None

    # ------------------------------------------------------------------ safetensors-friendly state
    def tensor_state(self) -> dict[str, torch.Tensor]:
        """``{"<name>.exp_avg" | ".exp_avg_sq" | ".master": tensor}`` for every parameter with state."""
        out: dict[str, torch.Tensor] = {}
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                for key, value in self.state.get(p, {}).items():
                    out[f"{name}.{key}"] = value.detach().contiguous()
        return out

    def scalar_state(self) -> dict:
        """JSON part of the state: the step count and the hyper-parameters in effect."""
        return {
            "step_count": self.step_count,
            "moment_dtype": str(self.moment_dtype).removeprefix("torch."),
            "groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k not in ("params", "names")}
                       for g in self.param_groups],
        }

    def load_tensor_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        """Restore state saved by `tensor_state`/`scalar_state`; names and shapes must match exactly."""
        saved_dtype = scalars.get("moment_dtype")
        mine = str(self.moment_dtype).removeprefix("torch.")
        if saved_dtype != mine:
            raise ValueError(f"optimizer moments were saved as {saved_dtype}, this run uses {mine} (train.bf16_moments)")
        expected: set[str] = set()
        for group in self.param_groups:
            for name, p in zip(group["names"], group["params"]):
                keys = [k for k in ("exp_avg", "exp_avg_sq", "master") if f"{name}.{k}" in tensors]
                if not keys:
                    continue
                state = self._state_for(p)
                for k in ("exp_avg", "exp_avg_sq") + (("master",) if "master" in state else ()):
                    key = f"{name}.{k}"
                    if key not in tensors:
                        raise ValueError(f"optimizer state is missing {key}")
                    src = tensors[key]
                    if src.shape != state[k].shape or src.dtype != state[k].dtype:
                        raise ValueError(
                            f"optimizer state {key}: saved {tuple(src.shape)} {src.dtype}, "
                            f"expected {tuple(state[k].shape)} {state[k].dtype}"
                        )
                    state[k].copy_(src)
                    expected.add(key)
        extra = sorted(set(tensors) - expected)
        if extra:
            raise ValueError(f"optimizer state has entries for unknown parameters: {', '.join(extra[:5])}")
        self.step_count = int(scalars["step_count"])


def global_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, in FP32 (a NaN/Inf anywhere makes it non-finite)."""
    norms = [p.grad.detach().float().norm(2) for p in params if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def clip_gradients_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0: no clipping); returns the norm before."""
    norm = global_grad_norm(params)
    if max_norm > 0 and math.isfinite(norm.item()):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
    return norm
