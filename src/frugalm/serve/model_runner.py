"""Runs the model over one scheduled step against the paged latent cache.

The runner owns the cache tensor `[cache_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`
(one extra layer for the MTP draft module when speculating) and walks the checkpoint's own modules layer
by layer: the projections, norms, MoE (grouped GEMM, no loop over experts) and head are the model's,
only attention is replaced by the two paged paths in `frugalm.serve.mla`. All sequences of a step are
flattened into one token batch, so every matmul outside attention sees the whole step at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from frugalm.model.transformer import DecoderLayer, DeepSeekV3
from frugalm.serve.mla import AttentionGroup, absorbed_attention, prefill_attention


@dataclass
class StepInput:
    """One forward pass: flat tokens of several sequences plus their attention groups."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) each token's latent goes to
    row_starts: list[int]  # first flat row of each sequence
    prefill: Optional[AttentionGroup]
    decode: Optional[AttentionGroup]


def cache_entry_dim(model: DeepSeekV3) -> int:
    cfg = model.config
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


class ModelRunner:
    def __init__(self, model: DeepSeekV3, block_size: int, num_blocks: int, *, use_mtp: bool = False):
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.use_mtp = use_mtp
        self.num_layers = self.config.num_hidden_layers
        layers = self.num_layers + (1 if use_mtp else 0)
        # Zeros, not empty: padded block ids read block 0, and masked garbage must not be NaN (0 * NaN).
        self.cache = torch.zeros(layers, num_blocks, block_size, cache_entry_dim(model), device=self.device,
                                 dtype=self.dtype)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all cached layers (the MTP layer included when speculating)."""
        return self.cache.shape[0] * self.cache.shape[-1] * self.cache.element_size()

    # ------------------------------------------------------------------ inputs
    def prepare(self, items: list[tuple[list[int], int, list[int], bool]]) -> StepInput:
        """items: (tokens fed, first position, block table, use the decode path) per sequence."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_starts: list[int] = []
        pre: list[tuple[int, int, int, list[int]]] = []
        dec: list[tuple[int, int, int, list[int]]] = []
        for tokens, start, table, decode in items:
            row0 = len(ids)
            row_starts.append(row0)
            ids.extend(tokens)
            for p in range(start, start + len(tokens)):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            (dec if decode else pre).append((row0, start, len(tokens), table))
        dev = self.device
        return StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            row_starts=row_starts,
            prefill=AttentionGroup.build(pre, bs, dev) if pre else None,
            decode=AttentionGroup.build(dec, bs, dev) if dec else None,
        )

    # ------------------------------------------------------------------ forward
    def _layer(self, layer: DecoderLayer, cache: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, step: StepInput) -> torch.Tensor:
        """One decoder layer over the flat step batch x [1, N, d]; writes this step's latents to `cache`."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q_nope, q_pe = attn.project_q(h, cos, sin)
        c_kv, k_pe = attn.project_latent(h, cos, sin)
        q_nope, q_pe, c_kv, k_pe = q_nope[0], q_pe[0], c_kv[0], k_pe[0]
        flat = cache.view(-1, cache.shape[-1])
        flat.index_copy_(0, step.slots, torch.cat([c_kv, k_pe], dim=-1))
        N = x.shape[1]
        o = x.new_empty(N, attn.n_heads, attn.v_dim)
        if step.prefill is not None:
            o.index_copy_(0, step.prefill.out_rows,
                          prefill_attention(attn, q_nope, q_pe, cache, step.prefill, (c_kv, k_pe)))
        if step.decode is not None:
            o.index_copy_(0, step.decode.out_rows, absorbed_attention(attn, q_nope, q_pe, cache, step.decode))
        x = x + attn.o_proj(o.view(1, N, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Main model: final-norm hidden states [N, d] of every fed token."""
        m = self.model
        cos, sin = m.rotary(step.positions[None])
        x = m.model.embed_tokens(step.input_ids)[None]
        for i, layer in enumerate(m.model.layers):
            x = self._layer(layer, self.cache[i], x, cos, sin, step)
        return m.model.norm(x)[0]

    @torch.inference_mode()
    def forward_mtp(self, step: StepInput, h_prev: torch.Tensor) -> torch.Tensor:
        """MTP module 0 at the step's positions: step.input_ids are the *next* tokens (t_{i+1}) and
        h_prev [N, d] the main model's (or the previous draft's) hidden state at position i."""
        m = self.model
        mtp = m.mtp[0]
        cos, sin = m.rotary(step.positions[None])
        emb = m.model.embed_tokens(step.input_ids)[None]
        x = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h_prev[None])], dim=-1))
        x = self._layer(mtp.block, self.cache[self.num_layers], x, cos, sin, step)
        return mtp.shared_head.norm(x)[0]

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()


def default_num_blocks(model: nn.Module, block_size: int, bytes_per_token: int, *, max_num_seqs: int,
                       max_model_len: int, device: torch.device) -> int:
    """Blocks for an unconfigured engine: 90% of free accelerator memory, or on CPU enough for
    max_num_seqs full-length sequences capped at 1 GiB (CPU RAM is shared with everything else)."""
    per_block = bytes_per_token * block_size
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * 0.9) // per_block)
    want = -(-max_num_seqs * max_model_len // block_size)
    return max(1, min(want, (1 << 30) // per_block))
