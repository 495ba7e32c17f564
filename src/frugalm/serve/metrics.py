"""Prometheus text-format metrics, written by hand (a few counters and histograms need no dependency).

Names follow vLLM's where one exists (`num_requests_running`, `time_to_first_token_seconds`, ...) under
a `frugalm:` prefix, so existing dashboards need only the prefix changed. Observations arrive from the
engine thread and rendering happens on the HTTP thread, hence the lock.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from frugalm.serve.engine import LLMEngine

PREFIX = "frugalm:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        n = PREFIX + self.name
        lines = [f"# HELP {n} {self.help}", f"# TYPE {n} histogram"]
        cum = 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            lines.append(f'{n}_bucket{{le="{b}"}} {cum}')
        lines += [f'{n}_bucket{{le="+Inf"}} {self.count}', f"{n}_sum {self.sum}", f"{n}_count {self.count}"]
        return lines


class Metrics:
    """Request-level measurements; engine-level gauges are read from the engine at render time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram("time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("inter_token_latency_seconds", "Time between successive output tokens of a request.")
        self.e2e = Histogram("e2e_request_latency_seconds", "Time from request arrival to its last token.")
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}

    def on_tokens(self, n_tokens: int, first: bool, since_arrival: float, since_last: Optional[float]) -> None:
        with self._lock:
            self.generation_tokens += n_tokens
            if first:
                self.ttft.observe(since_arrival)
                n_tokens -= 1  # the first token has no predecessor
            if since_last is not None and n_tokens > 0:
                # Several tokens in one step (speculation) share the gap evenly.
                for _ in range(n_tokens):
                    self.itl.observe(since_last / n_tokens)

    def on_finish(self, reason: str, prompt_tokens: int, since_arrival: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.e2e.observe(since_arrival)

    def on_reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, engine: "LLMEngine", pending: int) -> str:
        p = PREFIX
        bm = engine.block_manager
        st = engine.stats

        def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> list[str]:
            return [f"# HELP {p}{name} {help_text}", f"# TYPE {p}{name} {kind}", f"{p}{name}{labels} {value}"]

        with self._lock:
            lines = []
            lines += metric("num_requests_running", "gauge", "Sequences holding cache blocks.", engine.num_running)
            lines += metric("num_requests_waiting", "gauge", "Sequences queued for admission.", engine.num_waiting)
            lines += metric("num_requests_pending", "gauge", "Admitted but unfinished sequences (bounded by max_pending).", pending)
            lines += metric("kv_cache_usage_perc", "gauge", "Fraction of latent-cache blocks in use.", round(bm.usage, 6))
            lines += metric("kv_cache_blocks_total", "gauge", "Latent-cache blocks.", bm.num_blocks)
            lines += metric("kv_cache_bytes_per_token", "gauge", "Latent-cache bytes one token occupies.", engine.cache_bytes_per_token)
            lines += metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
            lines += metric("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
            lines += metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", bm.query_tokens)
            lines += metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", bm.hit_tokens)
            lines += metric("num_preemptions_total", "counter", "Sequences preempted for lack of blocks.", engine.scheduler.num_preemptions)
            lines += metric("spec_decode_num_draft_tokens_total", "counter", "MTP draft tokens proposed.", st.draft_tokens)
            lines += metric("spec_decode_num_accepted_tokens_total", "counter", "MTP draft tokens accepted.", st.accepted_tokens)
            lines += [f"# HELP {p}request_success_total Finished requests by finish reason.",
                      f"# TYPE {p}request_success_total counter"]
            for reason in sorted(set(self.finished) | {"stop", "length"}):
                lines.append(f'{p}request_success_total{{finished_reason="{reason}"}} {self.finished.get(reason, 0)}')
            lines += [f"# HELP {p}request_rejected_total Requests refused before running, by reason.",
                      f"# TYPE {p}request_rejected_total counter"]
            for reason in sorted(set(self.rejected) | {"overloaded"}):
                lines.append(f'{p}request_rejected_total{{reason="{reason}"}} {self.rejected.get(reason, 0)}')
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
        return "\n".join(lines) + "\n"
