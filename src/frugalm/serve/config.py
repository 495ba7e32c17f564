"""Engine and server settings as dataclasses (built from TOML/CLI with `frugalm.config.from_dict`).

Every limit that bounds memory or latency lives here, so a server's behaviour under load is decided
by a config someone can read, not by constants scattered through the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from frugalm.config import ConfigError


@dataclass
class EngineConfig:
    """How the engine batches work and sizes its paged latent cache."""

    # Tokens per cache block. Small blocks waste little padding and make prefix reuse finer-grained;
    # 16 is vLLM's default and suits both CPU and GPU here (attention gathers whole blocks).
    block_size: int = 16
    # Cache size: an explicit block count wins; otherwise `cache_bytes`; otherwise an automatic size
    # (90% of free accelerator memory, or enough for max_num_seqs full-length sequences on CPU, capped at 1 GiB).
    num_blocks: Optional[int] = None
    cache_bytes: Optional[int] = None
    # At most this many sequences run (hold cache and decode) at once; the rest wait.
    max_num_seqs: int = 64
    # Token budget of one step: decodes first, then prefill chunks fill what is left.
    max_num_batched_tokens: int = 2048
    # Longest prompt + completion; None means the model's max_position_embeddings.
    max_model_len: Optional[int] = None
    enable_prefix_caching: bool = True
    # Split long prompts across steps to stay within the token budget (off: a prompt is prefilled whole).
    enable_chunked_prefill: bool = True
    # None or "mtp": draft with the checkpoint's first MTP module, verify with the main model.
    speculative: Optional[str] = None
    num_speculative_tokens: int = 1
    # Seed of the generator used by sampled requests that carry no seed of their own.
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.num_blocks is not None and self.num_blocks <= 0:
            problems.append(f"num_blocks must be > 0 (got {self.num_blocks})")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            problems.append(f"cache_bytes must be > 0 (got {self.cache_bytes})")
        if self.max_model_len is not None and self.max_model_len <= 1:
            problems.append(f"max_model_len must be > 1 (got {self.max_model_len})")
        if self.speculative not in (None, "mtp"):
            problems.append(f"speculative must be null or 'mtp' (got {self.speculative!r})")
        if not 1 <= self.num_speculative_tokens <= 8:
            problems.append(f"num_speculative_tokens must be in 1..8 (got {self.num_speculative_tokens})")
        if problems:
            raise ConfigError("invalid engine config: " + "; ".join(problems))


@dataclass
class ServerConfig:
    """The HTTP layer's limits and identity."""

    host: str = "127.0.0.1"
    port: int = 8000
    # When set, every /v1 request needs `Authorization: Bearer <api_key>`.
    api_key: Optional[str] = None
    # Name clients pass as `model`; None means the checkpoint folder's name.
    served_model_name: Optional[str] = None
    # Requests (counting each of n choices) admitted but unfinished; beyond it the server answers 503.
    # Bounded so overload shows up as fast errors instead of an ever-growing queue and memory.
    max_pending: int = 512
    # Request bodies larger than this are refused with 413 before being parsed.
    max_body_bytes: int = 4 << 20
    # Split R1-style "<think>...</think>" output into `reasoning_content`.
    reasoning_parser: bool = True
    # Default completion length when a request gives none (OpenAI's completions default is 16).
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535 (got {self.port})")
        for name in ("max_pending", "max_body_bytes", "default_max_tokens"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.api_key is not None and not self.api_key:
            problems.append("api_key must be non-empty when set")
        if problems:
            raise ConfigError("invalid server config: " + "; ".join(problems))
