"""The DeepSeek-V3 decoder: embedding -> N x (MLA + dense-or-MoE FFN) -> norm -> head, plus MTP modules.

Read top to bottom: `DecoderLayer`, `MTPModule`, `DeepSeekV3`. In-memory parameter names follow
transformers (`model.layers.N.self_attn.q_a_proj.weight`, `model.layers.N.mlp.experts.gate_up_proj`,
...); MTP modules live under `mtp.K.*` and `frugalm.model.checkpoint` maps them to the official
`model.layers.{num_hidden_layers + K}.*` on disk.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from frugalm.model.attention import MLA, RMSNorm
from frugalm.model.config import ModelConfig
from frugalm.model.moe import MoE, SwiGLU
from frugalm.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """Only the norm is MTP-specific; the projection is the main model's lm_head (DeepSeek shares it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """Multi-token prediction depth k: combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}.

    Concatenation order is [embedding ; hidden], the order the released V3 weights were trained with
    (vLLM serves them this way), which is the reverse of the paper's equation.
    """

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers + depth)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.shared_head.norm(self.block(h, cos, sin))


class Backbone(nn.Module):
    """`model.*` in HF naming: embedding, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 causal LM. `model(input_ids)` returns logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, *, with_mtp: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(n_mtp))
        self.rotary = RotaryEmbedding(cfg)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> "DeepSeekV3":
        """Normal(0, initializer_range) for every matrix, ones for norms, zero router bias."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
        for m in self.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()
        return self

    # ------------------------------------------------------------------ forward
    def positions(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)
        return self.rotary(position_ids)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d] (what the head and the first MTP module consume)."""
        cos, sin = self.positions(input_ids, position_ids)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, position_ids))

    def forward_with_mtp(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits [B,T,V] and, per MTP depth k (1-based), logits [B, T-k, V] predicting t_{i+k+1}.

        Position i of depth k sees tokens up to i+k: its hidden state from depth k-1 at i plus the
        embedding of token i+k (input_ids[:, k:]). Targets are labels[:, k:] where labels = the inputs
        shifted by one.
        """
        h = self.hidden_states(input_ids)
        logits = self.lm_head(h)
        mtp_logits = []
        T = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = self.positions(input_ids[:, : T - k])
            emb = self.model.embed_tokens(input_ids[:, k:])
            h = module(h[:, :-1], emb, cos, sin)
            mtp_logits.append(self.lm_head(h))
        return logits, mtp_logits

    # ------------------------------------------------------------------ introspection
    def moe_layers(self) -> list[nn.Module]:
        """MoE blocks of the main model (MTP blocks excluded: they do not drive the bias update)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def num_parameters(self) -> dict[str, int]:
        main = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for n, p in self.named_parameters() if n.startswith("mtp."))
        return {"main": main, "mtp": mtp}

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path, *, fp8: bool = False, max_shard_bytes: int = 4 << 30) -> None:
        from frugalm.model.checkpoint import save_pretrained

        save_pretrained(self, path, fp8=fp8, max_shard_bytes=max_shard_bytes)
