"""Turn a plain (BF16/FP32) model into an FP8-training one from the outside: `apply_fp8(model, config)`.

The model code stays free of FP8 concerns: its ``nn.Linear`` layers are swapped in place for
`FP8Linear` (sharing the same Parameter objects, so state_dict keys, checkpoints and optimizer
references are unchanged), and MoE expert blocks -- modules with a replaceable ``linear_fn`` attribute
over stacked ``[E, out, in]`` weights -- get the FP8 grouped GEMM. Which modules qualify is decided by
name patterns (`FP8Config`), first as a `FP8Plan` that can be inspected without changing anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from frugalm.fp8.backends import select_backend
from frugalm.fp8.config import GEMM_NAMES, FP8Config
from frugalm.fp8.linear import FP8GroupedLinear, FP8Linear

log = logging.getLogger(__name__)


def name_matches(name: str, pattern: str) -> bool:
    """Glob match of a qualified module name, where a pattern also matches any dotted suffix.

    ``mlp.gate`` matches ``model.layers.3.mlp.gate`` but not ``model.layers.0.mlp.gate_proj``.
    """
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def _first_match(name: str, patterns: list[str]) -> str | None:
    return next((p for p in patterns if name_matches(name, p)), None)


@dataclass
class FP8Plan:
    """What `apply_fp8` converts (or converted), what it left alone and why, and the backend it resolved."""

    linears: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    device: str = ""
    gemms: list[str] = field(default_factory=lambda: list(GEMM_NAMES))

    def describe(self) -> str:
        lines = [
            f"FP8: {len(self.linears)} Linear module(s) and {len(self.experts)} expert block(s) in FP8; "
            f"GEMM backend {self.backend!r} on {self.device}"
            + ("" if set(self.gemms) == set(GEMM_NAMES) else
               f"; FP8 GEMMs only {self.gemms or 'none'} (the others in high precision)")
        ]
        lines += [f"  fp8   {name}" for name in self.linears]
        lines += [f"  fp8   {name} (experts.linear_fn)" for name in self.experts]
        lines += [f"  keep  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _skip_reason(name: str, config: FP8Config) -> str | None:
    pattern = _first_match(name, config.keep_high_precision)
    if pattern is not None:
        return f"kept in high precision (matches {pattern!r})"
    pattern = _first_match(name, config.exclude)
    if pattern is not None:
        return f"excluded (matches {pattern!r})"
    if _first_match(name, config.include) is None:
        return "not matched by fp8.include"
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def plan_fp8(model: nn.Module, config: FP8Config) -> FP8Plan:
    """Decide, without changing ``model``, which modules `apply_fp8` would put in FP8.

    Raises `frugalm.fp8.backends.BackendUnavailable` if ``config.backend`` names a backend the model's
    device cannot run, so a misconfigured run fails before training starts.
    """
    device = _model_device(model)
    plan = FP8Plan(backend=select_backend(config.backend, device).name, device=str(device),
                   gemms=list(config.gemms))
    for name, module in model.named_modules(remove_duplicate=False):
        shown = name or "<root>"
        if hasattr(module, "linear_fn") and not isinstance(module, nn.Linear):
            why = _skip_reason(name, config) if config.experts else "fp8.experts is false"
            if why is None:
                plan.experts.append(name)
            else:
                plan.skipped[shown] = why
            continue
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(module, FP8Linear):
            plan.skipped[shown] = "already FP8Linear"
            continue
        if type(module) is not nn.Linear:
            plan.skipped[shown] = f"{type(module).__name__} subclasses nn.Linear with its own forward"
            continue
        why = _skip_reason(name, config)
        if why is None:
            plan.linears.append(name)
        else:
            plan.skipped[shown] = why
    return plan


def apply_fp8(model: nn.Module, config: FP8Config) -> nn.Module:
    """Put ``model``'s eligible Linear layers and expert GEMMs in FP8, in place; returns the model.

    With ``config.enabled`` false the model is returned untouched. The plan (what was converted, what
    was kept and why, which backend) is logged at INFO; call `plan_fp8` first to get it as an object.
    If the model itself is an eligible ``nn.Linear``, the returned module is its FP8 replacement.
    """
    if not config.enabled:
        log.info("FP8 disabled (fp8.enabled = false); model left in its own precision")
        return model
    plan = plan_fp8(model, config)
    gemms = tuple(config.gemms)
    grouped = FP8GroupedLinear(
        backend=config.backend, power_of_two_scales=config.power_of_two_scales, gemms=gemms
    )
    replaced: dict[int, FP8Linear] = {}
    root = model
    for name in plan.linears:
        old = model.get_submodule(name)
        new = replaced.get(id(old))
        if new is None:
            new = FP8Linear.from_linear(
                old, backend=config.backend, power_of_two_scales=config.power_of_two_scales, gemms=gemms
            )
            replaced[id(old)] = new
        if not name:
            root = new
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    for name in plan.experts:
        model.get_submodule(name).linear_fn = grouped
    log.info(plan.describe())
    return root
