"""The engine on a background thread, fed by the HTTP server.

The step loop is synchronous PyTorch; running it on its own thread keeps the event loop free to accept
connections and stream tokens while a step computes (PyTorch releases the GIL inside kernels). Requests
and aborts are handed over through a locked inbox that the loop drains between steps, so the engine's
state is only ever touched by its own thread. Admission is bounded (`max_pending`): past it `submit`
raises `Overloaded` at once instead of queueing without limit.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from frugalm.serve.engine import LLMEngine
from frugalm.serve.metrics import Metrics
from frugalm.serve.sampling_params import SamplingParams
from frugalm.serve.sequence import RequestOutput

log = logging.getLogger("frugalm.serve")

Sink = Callable[[Union[RequestOutput, BaseException]], None]


class Overloaded(Exception):
    """Too many unfinished requests; the caller should answer 503 and the client retry later."""


@dataclass
class _Tracking:
    sink: Sink
    arrival: float
    last_token: Optional[float] = None
    prompt_tokens: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_pending: int = 512, metrics: Optional[Metrics] = None):
        self.engine = engine
        self.max_pending = max_pending
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._live: dict[str, _Tracking] = {}  # submitted, not yet finished or aborted
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="frugalm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------ requests (any thread)
    def submit(self, requests: list[tuple[str, list[int], SamplingParams]], sink: Sink) -> None:
        """Queue several sequences (the n choices of one request) together, or none of them."""
        now = time.monotonic()
        with self._cond:
            if len(self._live) + len(requests) > self.max_pending:
                self.metrics.on_reject("overloaded")
                raise Overloaded(f"{len(self._live)} requests in flight (limit {self.max_pending})")
            for rid, ids, params in requests:
                self._live[rid] = _Tracking(sink, now, prompt_tokens=len(ids))
                self._adds.append((rid, ids, params))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (client gone); its blocks are freed before the next step."""
        with self._cond:
            if request_id in self._live:
                self._aborts.append(request_id)
                self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stop or self._adds or self._aborts or engine.has_unfinished()):
                    self._cond.wait()
                if self._stop:
                    return
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            aborted = set(aborts)
            for rid, ids, params in adds:
                if rid in aborted:
                    continue
                try:
                    engine.add_request(rid, ids, params, arrival=self._live[rid].arrival)
                except Exception as e:  # validated by the server already; never let one request kill the loop
                    self._fail(rid, e)
            for rid in aborts:
                engine.abort_request(rid)
                self._forget(rid)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:
                log.exception("engine step failed; failing the requests in flight")
                for rid in list(self._live):
                    engine.abort_request(rid)
                    self._fail(rid, e)
                continue
            now = time.monotonic()
            for out in outputs:
                self._dispatch(out, now)

    def _dispatch(self, out: RequestOutput, now: float) -> None:
        t = self._live.get(out.request_id)
        if t is None:
            return
        if out.new_token_ids:
            first = t.last_token is None
            self.metrics.on_tokens(len(out.new_token_ids), first, now - t.arrival,
                                   None if first else now - t.last_token)
            t.last_token = now
        if out.finished:
            self.metrics.on_finish(out.finish_reason or "abort", t.prompt_tokens, now - t.arrival)
            self._forget(out.request_id)
        self._deliver(t.sink, out)

    def _fail(self, rid: str, error: BaseException) -> None:
        t = self._forget(rid)
        if t is not None:
            self._deliver(t.sink, error)

    def _forget(self, rid: str) -> Optional[_Tracking]:
        with self._cond:
            return self._live.pop(rid, None)

    @staticmethod
    def _deliver(sink: Sink, item: Union[RequestOutput, BaseException]) -> None:
        try:
            sink(item)
        except Exception:  # a consumer whose event loop is gone: nothing left to tell
            log.debug("dropping output for a closed consumer", exc_info=True)
