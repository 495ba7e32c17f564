"""Held-out loss and perplexity of a saved model on any text the data pipeline can read.

Documents are framed exactly as in training (``BOS text EOS``, special-token spellings in the text kept
as plain characters) and cut into non-overlapping windows of ``seq_len + 1`` tokens, so the number is
comparable to the trainer's ``val_loss``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats/token
    perplexity: float
    tokens: int  # predicted tokens
    documents: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(stream: list[int], seq_len: int) -> Iterator[list[int]]:
    """Non-overlapping windows of seq_len + 1 tokens (the last, shorter one too, if it predicts anything)."""
    for start in range(0, max(1, len(stream) - 1), seq_len):
        window = stream[start:start + seq_len + 1]
        if len(window) >= 2:
            yield window


@torch.no_grad()
def evaluate_windows(model: nn.Module, windows: list[list[int]], batch_size: int, device: torch.device) -> tuple[float, int]:
    """(sum of cross-entropy, number of predicted tokens) over `windows` (equal lengths batched together)."""
    model.eval()
    total, count = 0.0, 0
    by_len: dict[int, list[list[int]]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for length, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            batch = torch.tensor(group[i:i + batch_size], dtype=torch.long, device=device)
            logits = model(batch[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
    return total, count


def evaluate_model(
    model_dir: str,
    data: list[str],
    *,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    text_field: str = "text",
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> EvalResult:
    """Loss/perplexity of the HF-format model in `model_dir` (with its tokenizer) on files/folders/globs `data`."""
    import frugalm
    from frugalm.config import ConfigError
    from frugalm.data.corpus import Corpus, resolve_files
    from frugalm.data.errors import DataError
    from frugalm.data.tokenizer import load_tokenizer
    from frugalm.train.trainer import resolve_device

    tokenizer = load_tokenizer(model_dir)
    corpus = Corpus(files=tuple(resolve_files(list(data))), text_field=text_field)
    dev = resolve_device(device)
    model = frugalm.from_pretrained(model_dir, device=dev, dtype=dtype)
    seq_len = seq_len or min(model.config.max_position_embeddings, 1024)
    if seq_len <= 0 or seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"--seq-len must be in 1..{model.config.max_position_embeddings} (got {seq_len})")
    stream: list[int] = []
    documents = 0
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for doc in corpus.documents():
        ids = tokenizer.encode(doc.text, add_special_tokens=False, split_special_tokens=True)
        stream.extend(prefix + ids + [tokenizer.eos_id])
        documents += 1
        if max_tokens is not None and len(stream) > max_tokens:
            stream = stream[: max_tokens + 1]
            break
    if len(stream) < 2:
        raise DataError(f"{corpus.describe()} holds no text to evaluate on")
    windows = list(token_windows(stream, seq_len))
    total, count = evaluate_windows(model, windows, batch_size, dev)
    loss = total / count
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count, documents=documents,
                      windows=len(windows))
