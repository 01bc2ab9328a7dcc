"""Slowing down token guessing at ``/ui/login``: a few wrong tokens per client, then 429 for a while."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

MAX_FAILURES = 10
"""Wrong tokens a client may send per :data:`WINDOW_SECONDS` before it must wait."""
WINDOW_SECONDS = 60.0
_MAX_CLIENTS = 10_000  # addresses remembered at most (the oldest are forgotten first)


class LoginThrottle:
    """Counts wrong tokens per client address in a sliding window (one per server process)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or (lambda: time.monotonic())
        self.lock = threading.Lock()
        self.failures: dict[str, deque[float]] = {}

    def wait_for(self, client: str) -> float:
        """Seconds ``client`` must wait before trying again (0: it may try now)."""
        now = self.clock()
        with self.lock:
            seen = self.failures.get(client)
            if seen is None:
                return 0.0
            while seen and seen[0] <= now - WINDOW_SECONDS:
                seen.popleft()
            if len(seen) < MAX_FAILURES:
                return 0.0
            return max(0.0, seen[0] + WINDOW_SECONDS - now)

    def failed(self, client: str) -> None:
        """Record a wrong token from ``client``."""
        with self.lock:
            if client not in self.failures and len(self.failures) >= _MAX_CLIENTS:
                self.failures.pop(next(iter(self.failures)))
            self.failures.setdefault(client, deque(maxlen=MAX_FAILURES)).append(self.clock())

    def succeeded(self, client: str) -> None:
        with self.lock:
            self.failures.pop(client, None)
