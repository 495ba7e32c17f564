"""Multi-head Latent Attention (MLA), the training ("naive") form.

Keys and values are rebuilt from a small per-token latent `c_kv` (kv_lora_rank) plus one roped key
`k_pe` shared by all heads; that pair is all a cache must hold (see `frugalm.serve` for the absorbed
decode path that never expands it). Here we expand per head and hand the result to PyTorch's fused
`scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.model.config import ModelConfig
from frugalm.model.rope import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as DeepSeek and HF do) and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        bias = cfg.attention_bias
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=bias)
        self.softmax_scale = cfg.softmax_scale()

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,d] -> q_nope [B,T,H,nope], roped q_pe [B,T,H,rope]."""
        if self.cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.unflatten(-1, (self.n_heads, -1))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,d] -> normed latent c_kv [B,T,kv_lora_rank], roped shared key k_pe [B,T,rope]: the cache entry."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
        return self.kv_a_layernorm(c_kv), k_pe

    def expand_latent(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv [B,S,r] -> per-head k_nope [B,S,H,nope] and v [B,S,H,v]."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1))
        return kv.split([self.nope_dim, self.v_dim], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_latent(x, cos, sin)
        k_nope, v = self.expand_latent(c_kv)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        dropout = self.cfg.attention_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, dropout_p=dropout, scale=self.softmax_scale,
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
