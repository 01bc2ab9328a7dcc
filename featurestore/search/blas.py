"""Matrix products of the search kernel: small ones on the calling thread, larger ones through BLAS behind a gate.

Concurrent searches (``fs serve`` answers requests in a thread pool) would
otherwise start more BLAS threads than the machine has cores.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from threadpoolctl import ThreadpoolController


class ProductGate:
    """At most as many matrix products at once as the cores hold.

    Each product already runs on every BLAS thread; several threads of one process
    (``fs serve`` answers requests in a thread pool) starting products at once give
    the cores more BLAS threads than they have, and OpenBLAS's spinning threads
    then slow every request down (concurrency 8 below concurrency 1). Products
    beyond ``cores // BLAS threads`` wait here instead; with single-threaded BLAS
    as many run at once as there are cores. The BLAS thread count is read once,
    at the first product.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: threading.BoundedSemaphore | None = None

    def size(self) -> int:
        blas = [lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(blas, default=1))

    def __enter__(self) -> None:
        if self._slots is None:
            with self._lock:
                if self._slots is None:
                    self._slots = threading.BoundedSemaphore(self.size())
        self._slots.acquire()

    def __exit__(self, *exc: object) -> None:
        assert self._slots is not None
        self._slots.release()


GATE = ProductGate()

# A matrix-vector product of at most this many cells runs on this thread (numpy's einsum loop, no
# BLAS): waking BLAS's worker threads between queries took milliseconds on a loaded machine, far
# more than the product itself (a 2,000 x 128 product between queries: 18 ms a call on average through
# 2-thread OpenBLAS, against 25 us for 1,000 x 256 on one thread; load average 22 on 2 cores).
ONE_THREAD_CELLS = 1 << 22


def product(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``rows @ q``: small ones on this thread, larger ones through BLAS and the gate."""
    if rows.size <= ONE_THREAD_CELLS:
        return np.einsum("ij,j->i", rows, q)
    with GATE:
        return rows @ q
