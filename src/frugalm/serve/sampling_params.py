"""`SamplingParams`: what one request asks of the sampler and of the stopping rules.

Validation happens here, once, so both the offline API and the HTTP server refuse the same bad values
with the same messages (the server turns the `ValueError` into a 400).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass
class SamplingParams:
    """Sampling and stopping for one prompt.

    temperature 0 means greedy (argmax); `top_k` 0 or -1 and `top_p` 1 disable those filters. `logprobs`
    None returns none; k >= 0 returns each chosen token's log-probability plus the k most likely
    alternatives, all from the model's raw distribution (before temperature/top-p), as vLLM does.
    `seed` makes a sampled request reproducible regardless of what else is in the batch; with n > 1
    choice i uses seed + i so the choices differ.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: Optional[Union[str, Sequence[str]]] = None
    seed: Optional[int] = None
    n: int = 1
    logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        num = (int, float)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, num) or not 0 <= self.temperature <= 2:
            bad(f"temperature must be in [0, 2], got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, num) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (or -1 for off), got {self.top_k!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 128:
            bad(f"n must be an integer in 1..128, got {self.n!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, num) or not -2 <= v <= 2:
                bad(f"{name} must be in [-2, 2], got {v!r}")
        if len(self.stop) > 16:
            bad(f"at most 16 stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_choice(self, index: int) -> "SamplingParams":
        """The params of choice `index` of an n > 1 request: n=1 and a distinct seed."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_tokens=self.max_tokens,
            stop=list(self.stop), seed=seed, n=1, logprobs=self.logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
        )
