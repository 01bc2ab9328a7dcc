"""Shared helpers for the benchmarks: real images from Fashion-MNIST, timing, memory."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from featurestore.datasets import export_fashion_mnist

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
