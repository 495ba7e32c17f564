"""One generation in flight (`Sequence`) and what the engine hands back (`RequestOutput`, `Completion`).

A sequence's cache state is two numbers and a list: `num_computed` positions already hold final latent
entries in the blocks of `block_table`. Everything else the scheduler and runner need is derived from
them, which keeps preemption (reset to zero) and prefix hits (start above zero) simple.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from frugalm.serve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and of the most likely alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sequence:
    """Prompt + generated tokens, the blocks holding their latents, and the per-request sampling state."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: Optional[float] = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.arrival = time.monotonic() if arrival is None else arrival
        # Cache state.
        self.block_table: list[int] = []
        self.num_computed = 0  # positions whose main (and MTP) cache entries are final
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.block_hashes: list[int] = []  # chained hashes of those blocks
        self.drafts: list[int] = []  # MTP draft tokens to verify next step
        # Output state.
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: Optional[str] = None
        self.text = ""  # detokenized output (stop strings removed)
        self.num_text_emitted = 0  # characters of `text` already streamed
        self.num_tokens_emitted = 0  # output tokens already streamed
        self.generator: Optional[torch.Generator] = None  # per-request RNG when params.seed is set

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        """All but the newest token are in the cache: the next step feeds one token (plus drafts)."""
        return self.num_computed == len(self.token_ids) - 1

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={len(self.token_ids)}, computed={self.num_computed}, "
                f"blocks={len(self.block_table)}, status={self.status.value})")


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence: the new tokens and the text safe to show now.

    Text is held back while it could still turn into a stop string or ends inside a UTF-8 character,
    so concatenating `text_delta`s gives exactly the final `Completion.text`.
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: Optional[str]
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    """A finished generation (one per prompt and choice)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Optional[str]
    logprobs: Optional[list[TokenLogprob]] = None
    prompt_index: int = 0
    index: int = 0
