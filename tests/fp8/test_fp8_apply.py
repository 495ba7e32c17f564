"""`apply_fp8` on a DeepSeek-V3-shaped model, and the ``[fp8]`` config section."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from frugalm.config import ConfigError, apply_overrides, from_dict
from frugalm.fp8.apply import apply_fp8, name_matches, plan_fp8
from frugalm.fp8.backends import BackendUnavailable
from frugalm.fp8.config import FP8Config
from frugalm.fp8.linear import FP8GroupedLinear, FP8Linear

D, VOCAB, E, INTER = 128, 64, 4, 64


def loop_grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The high-precision `linear_fn` an experts module starts with."""
    out = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Experts(nn.Module):
    """Stacked expert weights with a replaceable grouped GEMM, as the model stores them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(0.05 * torch.randn(E, 2 * INTER, D))
        self.down_proj = nn.Parameter(0.05 * torch.randn(E, D, INTER))
        self.linear_fn = loop_grouped_linear

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(expert, stable=True)
        offs = torch.bincount(expert, minlength=E).cumsum(0).to(torch.int32)
        gate, up = self.linear_fn(x[order], self.gate_up_proj, offs).chunk(2, dim=-1)
        y = self.linear_fn(nn.functional.silu(gate) * up, self.down_proj, offs)
        return torch.empty_like(y).index_copy_(0, order, y)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, INTER, bias=False)
        self.up_proj = nn.Linear(D, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)  # the router
        self.experts = Experts()
        self.shared_experts = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, D)
        scores = self.gate(flat).sigmoid()
        weight, expert = scores.max(-1)
        routed = self.experts(flat, expert) * weight[:, None]
        return (routed + self.shared_experts(flat)).reshape(x.shape)


class Attention(nn.Module):
    """MLA's projections (the attention core itself is plain tensor math and stays high precision)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_a_proj = nn.Linear(D, 96, bias=False)
        self.q_a_layernorm = RMSNorm(96)
        self.q_b_proj = nn.Linear(96, D, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, 80, bias=False)
        self.kv_a_layernorm = RMSNorm(80)
        self.kv_b_proj = nn.Linear(80, 2 * D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        k, v = self.kv_b_proj(self.kv_a_layernorm(self.kv_a_proj_with_mqa(x))).chunk(2, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / D ** 0.5, dim=-1)
        return self.o_proj(att @ v)


class Layer(nn.Module):
    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(D)
        self.self_attn = Attention()
        self.post_attention_layernorm = RMSNorm(D)
        self.mlp = MoE() if moe else MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Layer(moe=False), Layer(moe=True)])
        self.norm = RMSNorm(D)


class TinyDeepSeek(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Body()
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPECTED_FP8 = (
    [f"model.layers.0.self_attn.{p}" for p in ATTN]
    + [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    + [f"model.layers.1.self_attn.{p}" for p in ATTN]
    + [f"model.layers.1.mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
)


def _model() -> TinyDeepSeek:
    torch.manual_seed(0)
    return TinyDeepSeek()


def test_default_plan_keeps_embedding_head_router_and_norms_in_high_precision():
    plan = plan_fp8(_model(), FP8Config(enabled=True))
    assert plan.linears == EXPECTED_FP8
    assert plan.experts == ["model.layers.1.mlp.experts"]
    assert "matches 'mlp.gate'" in plan.skipped["model.layers.1.mlp.gate"]
    assert "matches 'lm_head'" in plan.skipped["lm_head"]
    assert plan.backend == "sliced" and plan.device == "cpu"
    assert "model.layers.0.mlp.gate_proj" in plan.linears  # the dense MLP's gate_proj is not the router


def test_apply_swaps_in_place_sharing_parameters_and_state_dict_keys(caplog):
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="frugalm.fp8.apply"):
        out = apply_fp8(model, FP8Config(enabled=True))
    assert out is model
    assert f"{len(EXPECTED_FP8)} Linear module(s) and 1 expert block(s)" in caplog.text
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    fp8_names = sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear))
    assert fp8_names == sorted(EXPECTED_FP8)
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[1].mlp.gate) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.experts.linear_fn, FP8GroupedLinear)
    with torch.no_grad():
        got = model(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


def test_converted_model_trains_and_every_parameter_gets_a_gradient():
    model = apply_fp8(_model(), FP8Config(enabled=True, backend="emulated"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(6):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_exclude_include_and_expert_opt_out():
    cfg = FP8Config(enabled=True, exclude=["o_proj", "model.layers.0.*"], experts=False)
    plan = plan_fp8(_model(), cfg)
    assert not any(n.endswith("o_proj") or n.startswith("model.layers.0.") for n in plan.linears)
    assert "excluded (matches 'o_proj')" == plan.skipped["model.layers.1.self_attn.o_proj"]
    assert plan.experts == [] and plan.skipped["model.layers.1.mlp.experts"] == "fp8.experts is false"
    only = plan_fp8(_model(), FP8Config(enabled=True, include=["*.self_attn.*"]))
    assert only.linears == [n for n in EXPECTED_FP8 if ".self_attn." in n]
    assert only.experts == []


def test_disabled_config_is_a_no_op_and_unavailable_backend_fails_early():
    model = _model()
    assert apply_fp8(model, FP8Config()) is model
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert model.model.layers[1].mlp.experts.linear_fn is loop_grouped_linear
    with pytest.raises(BackendUnavailable):
        apply_fp8(model, FP8Config(enabled=True, backend="blockwise"))


def test_apply_handles_root_linear_subclasses_and_shared_modules():
    class Custom(nn.Linear):
        pass

    shared = nn.Linear(16, 16)
    seq = nn.Sequential(shared, Custom(16, 16), shared)
    apply_fp8(seq, FP8Config(enabled=True))
    assert isinstance(seq[0], FP8Linear) and seq[0] is seq[2]
    assert type(seq[1]) is Custom
    root = apply_fp8(nn.Linear(16, 8), FP8Config(enabled=True))
    assert isinstance(root, FP8Linear)


def test_name_patterns_match_dotted_suffixes_only():
    assert name_matches("model.layers.3.mlp.gate", "mlp.gate")
    assert not name_matches("model.layers.3.mlp.gate_proj", "mlp.gate")
    assert name_matches("model.embed_tokens", "embed_tokens")
    assert name_matches("model.layers.0.self_attn.q_a_layernorm", "*norm*")
    assert name_matches("model.layers.12.self_attn.o_proj", "model.layers.1*.self_attn.o_proj")


def test_fp8_section_loads_strictly_with_cli_overrides():
    raw = apply_overrides(
        {"fp8": {"exclude": ["o_proj"]}},
        ["fp8.enabled=true", "fp8.backend=emulated", "fp8.power_of_two_scales=true"],
    )
    cfg = from_dict(FP8Config, raw["fp8"], "fp8")
    assert cfg == FP8Config(enabled=True, backend="emulated", power_of_two_scales=True, exclude=["o_proj"])
    with pytest.raises(ConfigError, match=r"\[fp8\] unknown key\(s\) bf16_moments"):
        from_dict(FP8Config, {"bf16_moments": True}, "fp8")
    with pytest.raises(ConfigError, match="fp8.backend"):
        from_dict(FP8Config, {"backend": "fast"}, "fp8")
    with pytest.raises(ValueError, match="fp8.backend"):
        FP8Config(backend="fast")
