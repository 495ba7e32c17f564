"""Shared pieces of the serving tests: tiny checkpoints, a tiny tokenizer, a greedy reference check,
a briefly trained model whose MTP drafts get accepted, and a live uvicorn server on a free local port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
import torch.nn.functional as F

from frugalm_testing import tiny_config
from frugalm.model.transformer import DeepSeekV3

TIE = 1e-4  # logits closer than this are a numerical tie; either token is a correct greedy choice


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny matmuls run fastest on one thread, and a shared 2-core runner punishes oversubscription
    (two intra-op threads were ~30x slower than one here under load). Restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def random_model(seed: int = 0, **overrides) -> DeepSeekV3:
    return DeepSeekV3(tiny_config(**overrides)).init_weights(seed).eval()


def random_prompts(n: int, lengths, vocab: int = 97, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


@torch.no_grad()
def assert_greedy(model: DeepSeekV3, prompt: list[int], output: list[int]) -> None:
    """Each output token is the argmax of a full-recompute forward over prompt + the tokens before it.

    One causal forward over prompt + output gives every one of those recomputations at once.
    """
    assert output, "no tokens generated"
    ids = torch.tensor([prompt + output[:-1]])
    logits = model(ids)[0, len(prompt) - 1:].float()
    best = logits.argmax(-1).tolist()
    for i, tok in enumerate(output):
        if tok != best[i]:
            gap = (logits[i, best[i]] - logits[i, tok]).item()
            assert gap < TIE, f"token {i}: engine chose {tok}, full recompute argmax {best[i]} (logit gap {gap:.3g})"


def train_pattern_model(steps: int = 70, seed: int = 0, **overrides) -> DeepSeekV3:
    """Tiny model + MTP trained on t_{i+1} = (7 t_i + 3) mod 40: the main model and the MTP module both
    learn the rule quickly, so greedy MTP drafts are mostly accepted (exercises the accept path)."""
    torch.manual_seed(seed)
    model = DeepSeekV3(tiny_config(**overrides)).init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with single_thread():
        _pattern_steps(model, opt, g, steps)
    return model.eval()


def _pattern_steps(model: DeepSeekV3, opt, g: torch.Generator, steps: int) -> None:
    for _ in range(steps):
        x = [torch.randint(0, 40, (16, 1), generator=g)]
        for _ in range(23):
            x.append((x[-1] * 7 + 3) % 40)
        ids = torch.cat(x, 1) + 2
        logits, mtp = model.forward_with_mtp(ids[:, :-1])
        labels = ids[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss = loss + F.cross_entropy(mtp[0].flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def pattern_prompt(start: int, length: int) -> list[int]:
    x = [start]
    for _ in range(length - 1):
        x.append((x[-1] * 7 + 3) % 40)
    return [t + 2 for t in x]


TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Two plus two is four.", "What is the answer?",
    "Serving small models on a laptop is fun.", "Latent attention keeps the cache small.",
    "Paged blocks, prefix caching and continuous batching.", "Hello world, hello there, hello again.",
] * 20


def make_tokenizer(path: Path, vocab_size: int = 320):
    from frugalm.data.tokenizer import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXT, vocab_size, path, min_frequency=1)


def train_chat_reply(model: DeepSeekV3, ids: list[int], steps: int = 120) -> DeepSeekV3:
    """Teach the model one exact continuation (memorisation), so server tests know what greedy says."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    x = torch.tensor([ids])
    model.train()
    with single_thread():
        for _ in range(steps):
            logits, mtp = model.forward_with_mtp(x[:, :-1])
            loss = F.cross_entropy(logits[0], x[0, 1:]) + F.cross_entropy(mtp[0][0], x[0, 2:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 1e-3:
                break
    return model.eval()


# ---------------------------------------------------------------------------------------- live server
class LiveServer:
    """uvicorn on 127.0.0.1 with an OS-assigned port, in a thread; bounded start and stop."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@contextlib.contextmanager
def live_server(engine, config=None, model_name: str = "tiny") -> Iterator[LiveServer]:
    from frugalm.serve.server import create_app

    with LiveServer(create_app(engine, config, model_name=model_name)) as srv:
        yield srv


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def metric_value(text: str, name: str, labels: Optional[str] = None) -> float:
    key = f"frugalm:{name}" + (f"{{{labels}}}" if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)
