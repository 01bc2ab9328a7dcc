"""The write lock of a store in a bucket: a PostgreSQL advisory lock held by one catalog connection.

A bucket has no ``flock``; every machine writing to the store reaches the same
PostgreSQL catalog, so the lock lives there. It is a session-level advisory
lock on a key derived from the store's URL, held by a connection kept open for
the duration: PostgreSQL releases it when that connection closes, including
when the process is killed (the server notices the dropped socket).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from featurestore.errors import StoreBusyError


def lock_key(url: str) -> int:
    """The signed 64-bit advisory-lock key of a store URL."""
    return int.from_bytes(hashlib.sha256(url.encode()).digest()[:8], "big", signed=True)


@contextmanager
def advisory_lock(engine: Any, url: str, timeout: float) -> Iterator[None]:
    """Hold the advisory lock of store ``url`` for the block; :class:`StoreBusyError` after ``timeout`` seconds."""
    key = lock_key(url)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        while not conn.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (key,)).scalar():
            if time.monotonic() >= deadline:
                raise StoreBusyError(None, f"the catalog's advisory lock of {url}")
            time.sleep(0.1)
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        conn.close()
