"""Fresh memory made resident before it is written, on another thread.

A large new array (``read_matrix``'s matrix) is mapped lazily: each page is
faulted in, and zeroed, by the first write to it. On a virtual machine that is
expensive (a 488 MiB matrix took 2.7 s of faults against 0.15 s of writing it
once resident), and the shard readers would pay it while holding HDF5's lock.
:func:`populate` asks the kernel to fault the pages in ahead
(``madvise(MADV_POPULATE_WRITE)``, Linux 5.14+), which never changes the
array's content, so it may run while readers write into it; ctypes releases
the GIL for the call. Anywhere else it does nothing.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import numpy as np

MADV_POPULATE_WRITE = 23  # linux/mman.h
# Populating only pays for arrays this large (below, the faults cost less than the call).
MIN_BYTES = 16 << 20
STEP = 64 << 20  # bytes per call (page multiple)


@functools.cache  # on first use: importing the store must not load ctypes or libc
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise  # the C library the interpreter links
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def populate(arr: np.ndarray) -> bool:
    """Fault in the pages of ``arr`` (C-contiguous) without changing it; whether the kernel did.

    Best effort: a kernel without ``MADV_POPULATE_WRITE``, another system or a
    small array returns False and the pages are faulted in by the first writes.
    """
    madvise = _madvise()
    if madvise is None or arr.nbytes < MIN_BYTES or not arr.flags.c_contiguous:
        return False
    import mmap

    page = mmap.PAGESIZE
    addr = arr.ctypes.data
    start = (addr + page - 1) // page * page
    end = (addr + arr.nbytes) // page * page
    # In steps: the kernel holds the process's memory-map lock through one call, and other threads
    # (a new thread's stack, a large buffer being allocated) must not wait for the whole array.
    for at in range(start, end, STEP):
        if madvise(at, min(STEP, end - at), MADV_POPULATE_WRITE) != 0:
            return False
    return end > start
