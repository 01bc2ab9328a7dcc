"""featurestore.io.memory: a large array's pages faulted in ahead, its content untouched."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from featurestore.io import memory


def test_populate_leaves_the_content_as_it_was() -> None:
    arr = np.empty((6000, 1280), dtype=np.float32)  # ~29 MiB: above the size worth populating
    arr[::7] = np.arange(1280, dtype=np.float32)  # some rows already written, as a reader may have by then
    before = arr[::7].copy()
    done = memory.populate(arr)
    assert np.array_equal(arr[::7], before)
    if sys.platform.startswith("linux") and done:
        arr[:] = 1.0  # resident and writable
        assert float(arr.sum()) == arr.size


def test_small_or_strided_arrays_are_left_to_the_first_writes() -> None:
    assert memory.populate(np.empty(1000, dtype=np.float32)) is False
    big = np.empty((6000, 1280), dtype=np.float32)
    assert memory.populate(big[:, ::2]) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
def test_the_kernel_is_asked() -> None:
    import platform

    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")
    assert memory.populate(np.empty((6000, 1280), dtype=np.float32)) is True
