"""Stop a long loop at a safe point on SIGINT/SIGTERM (a second Ctrl-C aborts at once)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


class StopFlag:
    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop(enabled: bool, say: Callable[[str], None]) -> Iterator[StopFlag]:
    """Yield a flag that becomes true on the first SIGINT/SIGTERM; handlers are restored on exit."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        say(f"received {signal.Signals(signum).name}: stopping at the next safe point with a checkpoint "
            "(Ctrl-C again to abort without one)")

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
