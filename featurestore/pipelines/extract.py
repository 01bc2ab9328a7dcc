"""The extract pass: decode each image once, feed every requested extractor, store the vectors.

Decoding and per-image preparation (resize, normalise) run in a thread pool,
one batch ahead of the batched math in the main thread, so decode overlaps
with projection / CNN inference. Only images lacking a feature set are
processed (re-running is a no-op). Buffered vectors are flushed to a new shard
every ``flush_rows`` images or ``flush_bytes`` bytes, whichever comes first,
each shard registered in one transaction, so memory stays bounded whatever the
vector size and a crash loses at most the unflushed tail. Images whose file
vanished or became unreadable since ingest are reported and skipped.

The per-batch work (:func:`featurize_batches`: decode once, prepare for and
compute every extractor, keep the vectors of the images that lack each set)
is shared with the cluster path (``featurestore.pipelines.cluster``), whose
workers run it on their share of the images and write one shard per task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.errors import InvalidInputError, InvalidParameterError
from featurestore.features.base import Extractor
from featurestore.io.batching import prefetch_batches
from featurestore.io.images import ImageDecodeError, decode_bytes, read_bytes
from featurestore.io.objects import reader_threads
from featurestore.store import FeatureSetHandle, Store

Progress = Callable[[int, int], None]
FLUSH_BYTES = 128 * 2**20


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
class Work:
    """One extractor's share of the pass: per feature set it produces, the image ids lacking that set."""

    extractor: Extractor
    lacking: dict[str, set[int]]

    def __post_init__(self) -> None:
        self.needed: set[int] = set().union(*self.lacking.values()) if self.lacking else set()


@dataclass
class Featurized:
    """What one batch gave: per feature set the ids and vectors of the images that lacked it, and failures."""

    ids: dict[str, np.ndarray]
    vectors: dict[str, np.ndarray]
    failed: list[tuple[str, str]]
    processed: int  # images decoded and featurized
    seen: int  # images in the batch, failed ones included


def featurize_batches(work: Sequence[Work], images: Sequence[tuple[int, str]], *, pool: ThreadPoolExecutor,
                      batch_size: int, max_pixels: int, max_bytes: int) -> Iterator[Featurized]:
    """Decode each of ``images`` ((id, path), in order) once and feed it to every extractor that needs it.

    Decoding and ``prepare`` run in ``pool`` a batch or two ahead of the batched
    ``compute`` in the calling thread. A file that cannot be read or decoded (or
    is not a regular file, or is larger than ``max_bytes``) is reported as
    (path, reason) and the pass goes on.
    """
    path_of = dict(images)
    sizes = [w.extractor.decode_size() for w in work]

    def prepare(image_id: int) -> tuple[int, list[Any] | None, str | None]:
        try:
            data = read_bytes(path_of[image_id], max_bytes)
            # One decode per size asked for: the full one feeds every extractor that needs it; a pass of
            # CNN sets recording `decode: draft` decodes JPEGs at a reduced scale only (issue 29).
            decoded: dict[tuple[int, int] | None, Any] = {}
            prepared: list[Any] = []
            for w, size in zip(work, sizes, strict=True):
                if image_id not in w.needed:
                    prepared.append(None)
                    continue
                if size not in decoded:
                    decoded[size] = decode_bytes(data, max_pixels, draft=size).image
                prepared.append(w.extractor.prepare(decoded[size]))
            return image_id, prepared, None
        except ImageDecodeError as exc:
            return image_id, None, str(exc)
        except Exception as exc:  # a broken file must not stop the pass
            return image_id, None, f"{type(exc).__name__}: {exc}"

    for batch in prefetch_batches(pool, prepare, [i for i, _ in images], batch_size):
        failed = [(path_of[i], err) for i, _, err in batch if err is not None]
        ok = [(i, prep) for i, prep, _ in batch if prep is not None]
        out = Featurized({}, {}, failed, len(ok), len(batch))
        for k, w in enumerate(work):
            rows = [(i, prep[k]) for i, prep in ok if prep[k] is not None]
            if not rows:
                continue
            ids = np.array([i for i, _ in rows], dtype=np.int64)
            computed = w.extractor.compute([p for _, p in rows])
            for name, lacking in w.lacking.items():
                mask = np.fromiter((int(i) in lacking for i in ids), bool, len(ids))
                if mask.any():
                    out.ids[name] = ids[mask]
                    vecs = np.asarray(computed[name], dtype=np.float32)
                    out.vectors[name] = vecs if mask.all() else vecs[mask]  # no copy in the usual case
        yield out


@dataclass
class ExtractPlan:
    """The images to featurize and, per extractor, what each lacks (shared with the cluster path)."""

    work: list[Work]
    sets: dict[str, FeatureSetHandle]
    todo: list[tuple[int, str]]  # (image id, source path) of every image lacking a requested set
    runtimes: dict[str, str | None] = field(default_factory=dict)  # what computes each set, kept per shard


def plan_extract(store: Store, extractors: list[Extractor], *, replace: bool, dataset: str | None,
                 image_ids: list[int] | None, summary: ExtractSummary) -> ExtractPlan:
    """Register (or check) every extractor's feature sets and find the images lacking them. Under the lock."""
    if not extractors:
        raise InvalidInputError("nothing to extract: no extractor was given", remedy="extract-what")
    images = store.select_images(dataset=dataset, image_ids=image_ids)
    path_of = {r.id: r.source_path for r in images}
    all_ids = list(path_of)
    work: list[Work] = []
    sets: dict[str, FeatureSetHandle] = {}
    for ex in extractors:
        handles = [store.ensure_feature_set(spec, replace=replace) for spec in ex.outputs()]
        lacking = {fs.name: set(store.images_lacking(fs.name, all_ids)) for fs in handles}
        summary.up_to_date += [fs.name for fs in handles if not lacking[fs.name]]
        if any(lacking.values()):
            work.append(Work(ex, lacking))
            sets.update((fs.name, fs) for fs in handles)
    todo = [(i, p) for i, p in path_of.items() if any(i in w.needed for w in work)]
    runtimes = {name: w.extractor.runtime for w in work for name in w.lacking}
    return ExtractPlan(work, sets, todo, runtimes)


@dataclass
class _Buffer:
    """Vectors waiting to be written, per feature set."""

    ids: dict[str, list[np.ndarray]] = field(default_factory=dict)
    vectors: dict[str, list[np.ndarray]] = field(default_factory=dict)
    images: int = 0
    nbytes: int = 0

    def add(self, out: Featurized) -> None:
        for name, ids in out.ids.items():
            self.ids.setdefault(name, []).append(ids)
            self.vectors.setdefault(name, []).append(out.vectors[name])
            self.nbytes += out.vectors[name].nbytes
        self.images += out.processed

    def flush(self, store: Store, plan: ExtractPlan, summary: ExtractSummary) -> None:
        for name, fs in plan.sets.items():
            ids = self.ids.pop(name, [])
            if ids:
                # the blocks go to the shard one by one: no concatenated copy of large vectors
                store.append_vectors(fs, np.concatenate(ids), self.vectors.pop(name), runtime=plan.runtimes.get(name))
                summary.written[name] = summary.written.get(name, 0) + sum(len(i) for i in ids)
        self.images = self.nbytes = 0


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
    if batch_size < 1:
        raise InvalidParameterError("{batch_size} must be at least 1", "batch_size", value=batch_size)
    summary = ExtractSummary()
    plan = plan_extract(store, extractors, replace=replace, dataset=dataset, image_ids=image_ids, summary=summary)
    if not plan.todo:
        return summary
    start = time.perf_counter()
    buffer = _Buffer()
    done = 0
    threads = reader_threads(store.settings.workers, (path for _, path in plan.todo))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for out in featurize_batches(plan.work, plan.todo, pool=pool, batch_size=batch_size,
                                     max_pixels=store.settings.max_image_pixels,
                                     max_bytes=store.settings.max_file_bytes):
            summary.failed += out.failed
            summary.processed += out.processed
            buffer.add(out)
            done += out.seen
            if buffer.images >= flush_rows or buffer.nbytes >= flush_bytes:
                buffer.flush(store, plan, summary)
            if progress:
                progress(done, len(plan.todo))
    buffer.flush(store, plan, summary)
    summary.seconds = time.perf_counter() - start
    return summary
