"""Shared helpers for the benchmarks: real images from Fashion-MNIST, timing, memory."""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from featurestore.io.fashion_mnist import export_fashion_mnist

BENCH_DIR = Path(os.environ.get("FS_BENCH_DIR", "/tmp/featurestore-bench"))


def fashion_images(n: int, size: tuple[int, int], fmt: str = "jpeg") -> Path:
    """Export (once, cached) ``n`` class-balanced Fashion-MNIST images at ``size``."""
    dest = BENCH_DIR / f"fashion-{n}-{size[0]}x{size[1]}-{fmt}"
    t = time.perf_counter()
    s = export_fashion_mnist(dest, limit=n, size=size, fmt=fmt, workers=os.cpu_count() or 2)
    if s.written:
        print(f"exported {s.written} images to {dest} in {time.perf_counter() - t:.1f}s")
    return dest


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def row(name: str, n: int, seconds: float, baseline: float | None = None) -> str:
    rate = n / seconds
    ratio = f"{rate / baseline:6.2f}x" if baseline else "   base"
    return f"{name:<52} {n:>6} img {seconds:8.2f}s {rate:9.1f} img/s  {ratio}"


def fake_store(root: Path, n: int, dims: dict[str, int], shard_rows: int = 10_000, seed: int = 0,
               labels: int = 10):  # type: ignore[no-untyped-def]
    """A store with ``n`` catalog images (no files) and random vectors for each feature set in ``dims``.

    Image rows are bulk-inserted with fake sha256 values; vectors go through the
    normal ``append_vectors`` path in shards of ``shard_rows``.
    """
    from featurestore.config import Settings
    from featurestore.store import Store

    store = Store.open(Settings.from_env(store=root), create=True)
    fake_rows(store, n, dims, shard_rows, seed, labels)
    return store


def fake_rows(store: Any, n: int, dims: dict[str, int], shard_rows: int = 10_000, seed: int = 0,
              labels: int = 10) -> None:
    """Add ``n`` catalog images (no files) and random vectors for each feature set in ``dims`` to ``store``."""
    import numpy as np
    from sqlalchemy import insert

    from featurestore.catalog.schema import Dataset, Image
    from featurestore.features.base import FeatureSpec

    rng = np.random.default_rng(seed)
    with store.writing():
        with store.session() as s:
            ds = Dataset(name="bench")
            s.add(ds)
            s.flush()
            s.execute(insert(Image), [
                {"sha256": f"{i:064x}", "source_path": f"/nonexistent/{i}.jpg", "width": 1, "height": 1,
                 "format": "JPEG", "mode": "RGB", "bytes": 1, "label": f"class{i % labels}",
                 "superclass": f"group{i % labels // 3}", "dataset_id": ds.id} for i in range(n)])
        ids = np.array([r.id for r in store.select_images()], dtype=np.int64)
        for name, dim in dims.items():
            fs = store.ensure_feature_set(FeatureSpec(name, "bench", dim, {"dim": dim}))
            for start in range(0, n, shard_rows):
                chunk = ids[start : start + shard_rows]
                store.append_vectors(fs, chunk, rng.standard_normal((len(chunk), dim), dtype=np.float32))


@contextmanager
def temp_store(prefix: str, **settings: Any) -> Iterator[Any]:
    """A fresh store in a temp folder, closed and deleted afterwards."""
    from featurestore.config import Settings
    from featurestore.store import Store

    tmp = Path(tempfile.mkdtemp(prefix=f"fs-bench-{prefix}-"))
    store = Store.open(Settings.from_env(store=tmp / ".fs", **settings), create=True)
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
