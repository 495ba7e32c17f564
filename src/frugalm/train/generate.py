"""Plain autoregressive sampling (no KV cache): enough to look at what a training run learned.

Each new token re-runs the model over the whole context, which is quadratic but exact and uses only
the model's public forward. The serving engine (MLA latent cache, batching) is the place for speed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) all but the `top_k` largest logits and the smallest set with probability >= `top_p`."""
    logits = logits.float().clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_token(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> int:
    """One token id from 1-D `logits`; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
    max_context: Optional[int] = None,
) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` (stopping at `eos_id`); returns only the new ids."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    param = next(model.parameters())
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            context = ids[-max_context:] if max_context else ids
            x = torch.tensor([context], dtype=torch.long, device=param.device)
            logits = model(x)[0, -1]
            token = sample_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_id is not None and token == eos_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return new


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
) -> str:
    """The decoded continuation of `prompt` (BOS prepended as in training; stops at EOS)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    cfg = getattr(model, "config", None)
    new = generate_ids(
        model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, eos_id=tokenizer.eos_id, max_context=getattr(cfg, "max_position_embeddings", None),
    )
    return tokenizer.decode(new, skip_special_tokens=True)
