"""MLA over the paged latent cache, in its two forms.

The cache holds, per token per layer, only `[c_kv (kv_lora_rank) ‖ k_pe (qk_rope_head_dim)]`.

* Prefill (`prefill_attention`) is compute-bound: many queries per sequence, so the latent is expanded
  once into per-head keys and values (`kv_b_proj`) and ordinary attention runs on them.
* Decode (`absorbed_attention`) is memory-bound: one (or 1 + k draft) queries per sequence. Expanding the
  whole context every step would cost S·r·H·(nope+v) multiply-adds per layer, so W_UK is folded into the
  query instead (q_nope·W_UK lives in the r-dim latent space, scored directly against the cached
  c_kv, plus the roped part against k_pe), and W_UV is applied once to the r-dim attention result. All
  heads read the same cache rows, as in multi-query attention.

Both take an `AttentionGroup`: sequences padded to a common query length and context length, with a
boolean mask that is causal within each sequence and hides the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frugalm.model.attention import MLA


@dataclass
class AttentionGroup:
    """Padded view of G sequences' queries and contexts for one step (shared by all layers)."""

    rows: torch.Tensor  # [G, Tq] index of each query in the step's flat token rows (padding repeats a row)
    valid: torch.Tensor  # [G, Tq] bool, False on padding
    out_rows: torch.Tensor  # [n_valid] rows[valid]
    block_tables: torch.Tensor  # [G, nb] cache block ids (padding: block 0, masked)
    mask: torch.Tensor  # [G, Tq, nb * block_size] bool: key position <= query position
    fresh_causal: bool  # every sequence starts at 0 with the same length: contexts are the chunks themselves

    @classmethod
    def build(cls, items: list[tuple[int, int, int, list[int]]], block_size: int, device: torch.device) -> "AttentionGroup":
        """items: (first flat row, first position, number of queries, block table) per sequence."""
        tq = max(n for _, _, n, _ in items)
        nb = max(-(-(start + n) // block_size) for _, start, n, _ in items)
        rows, qpos, valid, tables = [], [], [], []
        for row0, start, n, table in items:
            pad = tq - n
            rows.append(list(range(row0, row0 + n)) + [row0] * pad)
            qpos.append(list(range(start, start + n)) + [0] * pad)  # padded queries see key 0: no empty softmax
            valid.append([True] * n + [False] * pad)
            used = -(-(start + n) // block_size)
            tables.append(list(table[:used]) + [0] * (nb - used))
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        valid_t = torch.tensor(valid, dtype=torch.bool, device=device)
        qpos_t = torch.tensor(qpos, dtype=torch.long, device=device)
        keys = torch.arange(nb * block_size, device=device)
        return cls(
            rows=rows_t, valid=valid_t, out_rows=rows_t[valid_t],
            block_tables=torch.tensor(tables, dtype=torch.long, device=device),
            mask=keys[None, None, :] <= qpos_t[:, :, None],
            fresh_causal=all(start == 0 and n == tq for _, start, n, _ in items),
        )


def gather_context(cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """cache [num_blocks, block_size, D] -> each sequence's context rows [G, nb*block_size, D]."""
    return cache[group.block_tables].flatten(1, 2)


def prefill_attention(attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      group: AttentionGroup, fresh: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Expanded-latent attention for prefill chunks -> [n_valid, H, v_head_dim] in `group.out_rows` order.

    q_nope [N,H,nope] and q_pe [N,H,rope] are the step's flat queries; `fresh` = (c_kv [N,r], k_pe [N,rope])
    just computed for the step's tokens (used directly when the chunk is its sequence's whole context).
    """
    H = attn.n_heads
    q = torch.cat([q_nope, q_pe], dim=-1)[group.rows]  # [G, Tq, H, qk]
    if group.fresh_causal:  # nothing cached yet: attend to the latents just computed, no gather or mask
        c_kv, k_pe = fresh[0][group.rows], fresh[1][group.rows]
    else:
        ctx = gather_context(cache, group)
        c_kv, k_pe = ctx.split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    k_nope, v = attn.expand_latent(c_kv)  # [G, S, H, nope], [G, S, H, v]
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)
    if group.fresh_causal:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=attn.softmax_scale)
    else:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.mask[:, None],
            scale=attn.softmax_scale)
    return o.transpose(1, 2)[group.valid]


def absorbed_weights(attn: MLA) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK [H, nope, r] and W_UV [H, v, r]: views of kv_b_proj's weight (no copy)."""
    w = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
    return w[:, : attn.nope_dim], w[:, attn.nope_dim:]


def absorbed_attention(attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                       group: AttentionGroup) -> torch.Tensor:
    """Weight-absorbed attention straight over cached latents -> [n_valid, H, v_head_dim]."""
    H, r = attn.n_heads, attn.kv_lora_rank
    w_uk, w_uv = absorbed_weights(attn)
    G, Tq = group.rows.shape
    q_lat = torch.einsum("gthn,hnr->gthr", q_nope[group.rows], w_uk)  # query in latent space
    q = torch.cat([q_lat, q_pe[group.rows]], dim=-1).flatten(1, 2)  # [G, Tq*H, r+rope]
    ctx = gather_context(cache, group)  # [G, S, r+rope]
    scores = torch.matmul(q, ctx.transpose(1, 2)).float() * attn.softmax_scale  # [G, Tq*H, S]
    mask = group.mask[:, :, None, :].expand(G, Tq, H, -1).reshape(G, Tq * H, -1)
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(-1).to(ctx.dtype)
    o_lat = torch.matmul(probs, ctx[..., :r]).view(G, Tq, H, r)  # attention result, still latent
    o = torch.einsum("gthr,hvr->gthv", o_lat, w_uv)
    return o[group.valid]
