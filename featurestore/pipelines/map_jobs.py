"""Embedding maps for the web app: computed in a background process, with progress, cancel, and the last map of a
set served while a newer one is computed.

This wraps :func:`featurestore.pipelines.embedding_map.embedding_map` and its cache without touching how it
computes: a job runs ``embedding_map`` in a child process (its own interpreter, at a lower CPU priority, so a
minute of t-SNE neither holds the server's GIL nor slows its pages), which writes the cache file as usual; the
server polls the process. A write to the set changes the cache key (its shard list); until the new map is asked
for, the newest map of the same set, method, size and seed is served, labelled with how many vectors it covers.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurestore.config import Settings
from featurestore.errors import FeatureStoreError
from featurestore.pipelines.embedding_map import FOLDER, EmbeddingMap, cache_path, embedding_map
from featurestore.store import Store

NICE = 10  # the child's CPU priority, below the server's


@dataclass(frozen=True)
class JobState:
    """A map computation: "running" (with seconds so far and an estimate of the total, if known), "done",
    "failed" (with the reason) or "cancelled"."""

    state: str
    seconds: float = 0.0
    estimate: float | None = None
    message: str = ""


def _child(settings: Settings, feature_set: str, method: str, n: int, seed: int, errors: Any) -> None:
    try:
        os.nice(NICE)
    except OSError:  # not permitted: run at the same priority
        pass
    try:
        with Store.open(settings) as store:
            embedding_map(store, feature_set, method, n, seed)
    except FeatureStoreError as exc:
        errors.put(str(exc))
    except Exception as exc:  # noqa: BLE001 - reported to the page, not lost in the child
        errors.put(f"{type(exc).__name__}: {exc}")


class _Job:
    def __init__(self, key: str, process: Any, errors: Any, estimate: float | None) -> None:
        self.key, self.process, self.errors, self.estimate = key, process, errors, estimate
        self.started = time.monotonic()
        self.finished: JobState | None = None

    def poll(self) -> JobState:
        if self.finished is not None:
            return self.finished
        elapsed = time.monotonic() - self.started
        if self.process.is_alive():
            return JobState("running", elapsed, self.estimate)
        self.process.join()
        message = self.errors.get() if not self.errors.empty() else ""
        if self.process.exitcode == 0 and not message:
            self.finished = JobState("done", elapsed)
        elif self.process.exitcode is not None and self.process.exitcode < 0:
            self.finished = JobState("cancelled", elapsed, message="the computation was cancelled")
        else:
            self.finished = JobState("failed", elapsed, message=message or f"exit code {self.process.exitcode}")
        return self.finished


_jobs: dict[str, _Job] = {}
_jobs_lock = threading.Lock()


def _estimate(store: Store, feature_set: str, method: str, n: int) -> float | None:
    """Seconds the map will take: the time of the largest map of the set with this method, scaled by size."""
    folder = store.root / FOLDER / feature_set
    best: tuple[int, float] | None = None
    for path in folder.glob(f"{method}-n*-s*-*.npz"):
        try:
            with np.load(path) as z:
                points, seconds = len(z["image_ids"]), float(z["seconds"])
        except (OSError, KeyError, ValueError):
            continue
        if points and (best is None or points > best[0]):
            best = (points, seconds)
    if best is None:
        return None
    points = best[0]
    return best[1] * (n / points) ** (1.2 if method == "tsne" else 1.0)


def start(store: Store, feature_set: str, method: str, n: int, seed: int = 0) -> JobState:
    """Start computing a map in a child process (once per map; a second call reports the running job)."""
    key = str(store.root / cache_path(store, feature_set, method, n, seed))
    with _jobs_lock:
        job = _jobs.get(key)
        if job is not None and job.poll().state == "running":
            return job.poll()
        ctx = multiprocessing.get_context("spawn")
        errors = ctx.Queue()
        process = ctx.Process(target=_child, args=(store.settings, feature_set, method, n, seed, errors), daemon=True)
        process.start()
        _jobs[key] = _Job(key, process, errors, _estimate(store, feature_set, method, n))
        return _jobs[key].poll()


def state(store: Store, feature_set: str, method: str, n: int, seed: int = 0) -> JobState | None:
    """The job computing this map of the set as it is now, if one was started."""
    key = str(store.root / cache_path(store, feature_set, method, n, seed))
    with _jobs_lock:
        job = _jobs.get(key)
    return None if job is None else job.poll()


def cancel(store: Store, feature_set: str, method: str, n: int, seed: int = 0) -> bool:
    """Stop the job computing this map (True if one was running)."""
    key = str(store.root / cache_path(store, feature_set, method, n, seed))
    with _jobs_lock:
        job = _jobs.get(key)
    if job is None or job.poll().state != "running":
        return False
    job.process.terminate()
    job.process.join(5)
    return True


def cached(store: Store, feature_set: str, method: str, n: int, seed: int = 0) -> EmbeddingMap | None:
    """The map of the set as it is now if it is in the cache (never computes)."""
    path = store.root / cache_path(store, feature_set, method, n, seed)
    return _load(path, feature_set, method)


def latest(store: Store, feature_set: str, method: str, n: int, seed: int = 0) -> EmbeddingMap | None:
    """The newest cached map of the set with these parameters, whatever version of the set it was made of."""
    folder = store.root / FOLDER / store.feature_set(feature_set).name
    found = sorted(folder.glob(f"{method}-n{n}-s{seed}-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        emap = _load(path, feature_set, method)
        if emap is not None:
            return emap
    return None


def _load(path: Any, feature_set: str, method: str) -> EmbeddingMap | None:
    try:
        with np.load(path) as z:
            return EmbeddingMap(feature_set, method, z["image_ids"], z["xy"], int(z["available"]),
                                float(z["seconds"]), True)
    except (OSError, KeyError, ValueError):
        return None
