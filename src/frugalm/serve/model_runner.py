"""Runs the model over one scheduled step against the paged latent cache.

The runner owns the cache tensor `[cache_layers, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`
(one extra layer for the MTP draft module when speculating) and walks the checkpoint's own modules layer
by layer: the projections, norms, MoE (grouped GEMM, no loop over experts) and head are the model's,
only attention is replaced by the two paged paths in `frugalm.serve.mla`. All sequences of a step are
flattened into one token batch, so every matmul outside attention sees the whole step at once.

Decode-only steps (every sequence feeds its newest token, plus its MTP drafts when speculating: the
common case once prompts are in) take a leaner path, `_decode_layer`: at short contexts much of a small
model's step is per-op dispatch and Python overhead rather than FLOPs, so that path works on flat [N, d]
rows with the model's own weights through functional calls (no module dispatch), builds its per-step
tensors (slots, padded block tables, an additive causal mask, complex RoPE factors) once per step rather
than per layer, runs absorbed MLA as a handful of batched matmuls over one `index_select` of the cache,
and calls the model's own MoE module (router, grouped expert GEMM, shared expert). Speculative steps
use it too: the main model verifying 1 + k tokens per sequence, the MTP layer over the same rows (the
engine reuses the step's tensors), and each further draft. When every sequence feeds the same number T of tokens, a sequence's T queries
share one gathered context ([G, T*H, S] scores, the mask causal within the new tokens); otherwise every
query row gets its own copy of its sequence's context (G = N, T = 1). It computes the same function as
the general path (same weights and formulas; sums may round differently), which tests/serve checks
against the general path and against full recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.model.attention import MLA, RMSNorm
from frugalm.model.moe import MoE, SwiGLU
from frugalm.model.rope import rotate_pairs
from frugalm.model.transformer import DecoderLayer, DeepSeekV3
from frugalm.serve.mla import AttentionGroup, absorbed_attention, absorbed_weights, prefill_attention


@dataclass
class StepInput:
    """One forward pass: flat tokens of several sequences plus their attention groups."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) each token's latent goes to
    row_starts: list[int]  # first flat row of each sequence
    prefill: Optional[AttentionGroup]
    decode: Optional[AttentionGroup]
    # Set only for decode-only steps (the lean path). G attention groups of T query rows each: the
    # sequences when all feed T tokens, else one group per query row (G = N, T = 1).
    block_ids: Optional[torch.Tensor] = None  # [G * nb] each group's first nb cache blocks, flattened
    mask: Optional[torch.Tensor] = None  # [G, T * H or 1, nb * block_size] additive: 0 for keys <= position, -inf after
    rope: Optional[torch.Tensor] = None  # [N, rope_dim / 2] complex cos + i sin at each position

    @property
    def lean(self) -> bool:
        return self.block_ids is not None


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
        blocks = list(model.model.layers) + ([m.block for m in model.mtp[:1]] if use_mtp else [])
        self.lean_decode = all(_lean_layer_ok(b) for b in blocks) and type(model.lm_head) is nn.Linear
        # Decode steps where a sequence feeds several tokens (MTP verification, the MTP layer over accepted
        # positions) take the lean path too; False sends them down the general path (benchmarks compare).
        self.lean_multi_token = True

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all cached layers (the MTP layer included when speculating)."""
        return self.cache.shape[0] * self.cache.shape[-1] * self.cache.element_size()

    # ------------------------------------------------------------------ inputs
    def prepare(self, items: list[tuple[list[int], int, list[int], bool]]) -> StepInput:
        """items: (tokens fed, first position, block table, use the decode path) per sequence."""
        if self.lean_decode and all(decode and (len(tokens) == 1 or self.lean_multi_token)
                                    for tokens, _, _, decode in items):
            return self._prepare_lean(items)
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

    def _prepare_lean(self, items: list[tuple[list[int], int, list[int], bool]]) -> StepInput:
        """Decode tokens only (the newest token, plus drafts): everything the layers share, built once."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_starts: list[int] = []
        nb = max((start + len(tokens) - 1) // bs for tokens, start, _, _ in items) + 1
        T = len(items[0][0])
        grouped = all(len(tokens) == T for tokens, _, _, _ in items)  # G = B groups of T queries
        tables: list[int] = []
        for tokens, start, table, _ in items:
            row_starts.append(len(ids))
            ids.extend(tokens)
            used = (start + len(tokens) - 1) // bs + 1
            padded = list(table[:used]) + [0] * (nb - used)
            tables.extend(padded if grouped else padded * len(tokens))
            for p in range(start, start + len(tokens)):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        keys = torch.arange(nb * bs, device=dev)
        qpos = pos.view(len(items), T) if grouped else pos[:, None]  # [G, T]
        mask = torch.zeros(qpos.shape[0], qpos.shape[1], 1, nb * bs, device=dev)  # fp32: scores softmax in fp32
        mask.masked_fill_((keys > qpos[..., None])[:, :, None, :], float("-inf"))
        if qpos.shape[1] > 1:  # scores are [G, T*H, S]: one mask row per (query, head), causal within the T
            mask = mask.expand(-1, -1, self.config.num_attention_heads, -1)
        cos, sin = self.model.rotary(pos)
        return StepInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev), positions=pos,
            slots=torch.tensor(slots, dtype=torch.long, device=dev), row_starts=row_starts,
            prefill=None, decode=None, block_ids=torch.tensor(tables, dtype=torch.long, device=dev),
            mask=mask.flatten(1, 2), rope=torch.complex(cos, sin),
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
        if step.lean:
            x = F.embedding(step.input_ids, m.model.embed_tokens.weight)
            for i, layer in enumerate(m.model.layers):
                x = _decode_layer(layer, self.cache[i], x, step)
            return _norm(m.model.norm, x)
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
        if step.lean:
            emb = F.embedding(step.input_ids, m.model.embed_tokens.weight)
            x = mtp.eh_proj(torch.cat([_norm(mtp.enorm, emb), _norm(mtp.hnorm, h_prev)], dim=-1))
            x = _decode_layer(mtp.block, self.cache[self.num_layers], x, step)
            return _norm(mtp.shared_head.norm, x)
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


# ---------------------------------------------------------------------------------------- lean decode path
def _lean_layer_ok(layer: nn.Module) -> bool:
    """The lean path calls weights functionally, so it only takes the stock modules (no FP8 or other
    swapped-in linears, no hooks); anything else runs the general path, which calls the modules."""
    if not isinstance(layer, DecoderLayer) or type(layer.self_attn) is not MLA:
        return False
    if layer.self_attn.nope_dim % 2 or layer.self_attn.kv_lora_rank % 2:  # complex views of the rope halves
        return False
    mlp = layer.mlp
    if type(mlp) is MoE:
        mlp = mlp.shared_experts
    if mlp is not None and type(mlp) is not SwiGLU:
        return False
    for m in layer.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            return False
    return True


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm; in fp32 the fused kernel gives RMSNorm.forward's numbers with fewer ops."""
    if x.dtype == torch.float32 and type(norm) is RMSNorm:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def _linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, mod.weight, mod.bias)


def _swiglu(mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


def _decode_layer(layer: DecoderLayer, cache: torch.Tensor, x: torch.Tensor, step: StepInput) -> torch.Tensor:
    """One decoder layer for N decode query rows: x [N, d] -> [N, d]; writes the N new latents to `cache`.

    Same computation as `_layer` + `absorbed_attention`: W_UK folded into the query, scores against the
    cached [c_kv | k_pe] rows shared by all heads (and by the T queries of a group), W_UV applied to the
    latent attention result. The new latents are written before attention, so a verification query sees
    the tokens before it in the same step, and the mask hides those after it.
    """
    attn = layer.self_attn
    B = x.shape[0]
    G = step.mask.shape[0]
    H, nope, r = attn.n_heads, attn.nope_dim, attn.kv_lora_rank
    h = _norm(layer.input_layernorm, x)
    if attn.cfg.q_lora_rank:
        q = F.linear(_norm(attn.q_a_layernorm, _linear(attn.q_a_proj, h)), attn.q_b_proj.weight)
    else:
        q = F.linear(h, attn.q_proj.weight)
    q = q.view(B, H, -1)
    kv = _linear(attn.kv_a_proj_with_mqa, h)
    c_kv = _norm(attn.kv_a_layernorm, kv[:, :r])
    k_pe = rotate_pairs(kv[:, r:], step.rope)
    D = cache.shape[-1]
    cache.view(-1, D).index_copy_(0, step.slots, torch.cat([c_kv, k_pe], dim=-1))

    w_uk, w_uv = absorbed_weights(attn)
    q_lat = torch.bmm(q[:, :, :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
    q = torch.cat([q_lat, rotate_pairs(q[:, :, nope:], step.rope[:, None])], dim=-1).view(G, -1, D)  # [G, T*H, D]
    ctx = cache.index_select(0, step.block_ids).view(G, -1, D)  # [G, S, r + rope]
    if step.mask.dtype == q.dtype:
        scores = torch.baddbmm(step.mask, q, ctx.transpose(1, 2), alpha=attn.softmax_scale)
    else:
        scores = torch.add(step.mask, torch.bmm(q, ctx.transpose(1, 2)).float(), alpha=attn.softmax_scale)
    probs = scores.softmax(-1)
    o_lat = torch.bmm(probs if probs.dtype == ctx.dtype else probs.to(ctx.dtype), ctx[..., :r]).view(B, H, r)
    o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1).reshape(B, -1)
    x = x + _linear(attn.o_proj, o)
    h = _norm(layer.post_attention_layernorm, x)
    mlp = layer.mlp
    return x + (mlp(h) if type(mlp) is MoE else _swiglu(mlp, h))  # MoE: the model's grouped path
