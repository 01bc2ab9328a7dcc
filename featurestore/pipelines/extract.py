"""The extract pass: decode each image once, feed every requested extractor, store the vectors.

Decoding and per-image preparation (resize, normalise) run in a thread pool,
one batch ahead of the batched math in the main thread, so decode overlaps
with projection / CNN inference. Only images lacking a feature set are
processed (re-running is a no-op). Buffered vectors are flushed to a new shard
every ``flush_rows`` images or ``flush_bytes`` bytes, whichever comes first,
each shard registered in one transaction, so memory stays bounded whatever the
vector size and a crash loses at most the unflushed tail. Images whose file
vanished or became unreadable since ingest are reported and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import InvalidInputError
from featurestore.features.base import Extractor
from featurestore.io.batching import prefetch_batches
from featurestore.io.images import ImageDecodeError, decode_bytes, read_bytes
from featurestore.store import FeatureSet, Store

Progress = Callable[[int, int], None]
FLUSH_BYTES = 256 * 2**20


@dataclass
class ExtractSummary:
    processed: int = 0
    written: dict[str, int] = field(default_factory=dict)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Job:
    """One extractor's share of the pass: its feature sets and the vectors waiting to be written."""

    extractor: Extractor
    sets: list[FeatureSet]
    needed: set[int]  # image ids lacking at least one of the outputs
    lacking: dict[str, set[int]]  # per output name: image ids lacking it
    buf_ids: dict[str, list[int]] = field(default_factory=dict)
    buf_vecs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    buffered_bytes: int = 0

    def add(self, ids: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Buffer the computed vectors of the images that lack each set."""
        for fs in self.sets:
            mask = np.fromiter((int(i) in self.lacking[fs.name] for i in ids), bool, len(ids))
            if mask.any():
                vecs = np.asarray(out[fs.name], dtype=np.float32)[mask]
                self.buf_ids.setdefault(fs.name, []).extend(ids[mask].tolist())
                self.buf_vecs.setdefault(fs.name, []).append(vecs)
                self.buffered_bytes += vecs.nbytes

    def flush(self, store: Store, summary: ExtractSummary) -> None:
        for fs in self.sets:
            ids = self.buf_ids.pop(fs.name, [])
            vecs = self.buf_vecs.pop(fs.name, [])
            if ids:
                store.append_vectors(fs, ids, np.concatenate(vecs), runtime=self.extractor.runtime)
                summary.written[fs.name] = summary.written.get(fs.name, 0) + len(ids)
        self.buffered_bytes = 0


def _plan_jobs(store: Store, extractors: list[Extractor], all_ids: list[int], replace: bool,
               summary: ExtractSummary) -> list[_Job]:
    jobs: list[_Job] = []
    for ex in extractors:
        sets = [store.ensure_feature_set(spec, replace=replace) for spec in ex.outputs()]
        lacking = {fs.name: set(store.images_lacking(fs.name, all_ids)) for fs in sets}
        needed = set().union(*lacking.values()) if lacking else set()
        summary.up_to_date += [fs.name for fs in sets if not lacking[fs.name]]
        if needed:
            jobs.append(_Job(ex, sets, needed, lacking))
    return jobs


def extract(
    store: Store,
    extractors: list[Extractor],
    *,
    replace: bool = False,
    dataset: str | None = None,
    image_ids: list[int] | None = None,
    batch_size: int = 32,
    flush_rows: int = 4096,
    flush_bytes: int = FLUSH_BYTES,
    progress: Progress | None = None,
) -> ExtractSummary:
    """Compute the missing vectors of every extractor's feature sets. Call under ``store.writing()``."""
    if not extractors:
        raise InvalidInputError("nothing to extract: give --rp K, --pixels WxH, --lowlevel or --model NAME")
    if batch_size < 1:
        raise InvalidInputError("--batch must be at least 1")
    summary = ExtractSummary()
    images = store.select_images(dataset=dataset, image_ids=image_ids)
    path_of = {r[0]: r[1] for r in images}
    jobs = _plan_jobs(store, extractors, list(path_of), replace, summary)
    todo = [i for i in path_of if any(i in j.needed for j in jobs)]
    if not todo:
        return summary
    start = time.perf_counter()
    max_pixels = store.settings.max_image_pixels
    max_bytes = store.settings.max_file_bytes  # issue 11: regular files only, size-capped

    def prepare(image_id: int) -> tuple[int, list[Any] | None, str | None]:
        try:
            img = decode_bytes(read_bytes(Path(path_of[image_id]), max_bytes), max_pixels).image
            return image_id, [j.extractor.prepare(img) if image_id in j.needed else None for j in jobs], None
        except ImageDecodeError as exc:
            return image_id, None, str(exc)
        except Exception as exc:  # a broken file must not stop the pass
            return image_id, None, f"{type(exc).__name__}: {exc}"

    done = pending = 0
    with ThreadPoolExecutor(max_workers=store.settings.workers) as pool:
        for batch in prefetch_batches(pool, prepare, todo, batch_size):
            summary.failed += [(path_of[i], err) for i, _, err in batch if err is not None]
            ok = [(i, prep) for i, prep, _ in batch if prep is not None]
            _compute(jobs, ok)
            summary.processed += len(ok)
            pending += len(ok)
            done += len(batch)
            if pending >= flush_rows or sum(j.buffered_bytes for j in jobs) >= flush_bytes:
                for job in jobs:
                    job.flush(store, summary)
                pending = 0
            if progress:
                progress(done, len(todo))
    for job in jobs:
        job.flush(store, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _compute(jobs: list[_Job], ok: list[tuple[int, list[Any]]]) -> None:
    """Run each extractor's batch computation on the images prepared for it."""
    for k, job in enumerate(jobs):
        rows = [(i, prep[k]) for i, prep in ok if prep[k] is not None]
        if rows:
            out = job.extractor.compute([p for _, p in rows])
            job.add(np.array([i for i, _ in rows], dtype=np.int64), out)
