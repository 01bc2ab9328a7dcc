"""The extract pass: decode each image once, feed every requested extractor, store the vectors.

Decoding and per-image preparation (resize, normalise) run in a thread pool,
one batch ahead of the batched math in the main thread, so decode overlaps
with projection / CNN inference. Only images lacking a feature set are
processed (re-running is a no-op). Vectors are flushed to a new shard every
``flush_rows`` images, each shard registered in one transaction, so a crash
loses at most the unflushed tail. Images whose file vanished or became
unreadable since ingest are reported and skipped.
"""

from __future__ import annotations

import json
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
from featurestore.store import Store

Progress = Callable[[int, int], None]


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
    extractor: Extractor
    sets: list[Any]  # FeatureSet rows, one per output
    needed: set[int]  # image ids lacking at least one of the outputs
    lacking: dict[str, set[int]]  # per output name: image ids lacking it
    buf_ids: dict[str, list[int]] = field(default_factory=dict)
    buf_vecs: dict[str, list[np.ndarray]] = field(default_factory=dict)


def extract(
    store: Store,
    extractors: list[Extractor],
    *,
    replace: bool = False,
    dataset: str | None = None,
    image_ids: list[int] | None = None,
    batch_size: int = 32,
    flush_rows: int = 4096,
    progress: Progress | None = None,
) -> ExtractSummary:
    """Compute the missing vectors of every extractor's feature sets. Call under ``store.writing()``."""
    if not extractors:
        raise InvalidInputError("nothing to extract: give --rp K, --pixels WxH, --lowlevel or --model NAME")
    if batch_size < 1:
        raise InvalidInputError("--batch must be at least 1")
    summary = ExtractSummary()
    images = store.select_images(dataset=dataset, image_ids=image_ids)
    all_ids = [r[0] for r in images]
    path_of = {r[0]: r[1] for r in images}
    jobs: list[_Job] = []
    for ex in extractors:
        sets = [store.ensure_feature_set(spec, replace=replace) for spec in ex.outputs()]
        lacking = {fs.name: set(store.images_lacking(fs.name, all_ids)) for fs in sets}
        needed = set().union(*lacking.values()) if lacking else set()
        for fs in sets:
            if not lacking[fs.name]:
                summary.up_to_date.append(fs.name)
        if needed:
            jobs.append(_Job(ex, sets, needed, lacking))
    todo = [i for i in all_ids if any(i in j.needed for j in jobs)]
    if not todo:
        return summary
    start = time.perf_counter()
    workers = store.settings.workers

    def prepare(image_id: int) -> tuple[int, list[Any] | None, str | None]:
        try:
            img = decode_bytes(read_bytes(Path(path_of[image_id])), store.settings.max_image_pixels).image
            return image_id, [j.extractor.prepare(img) if image_id in j.needed else None for j in jobs], None
        except ImageDecodeError as exc:
            return image_id, None, str(exc)
        except Exception as exc:  # a broken file must not stop the pass
            return image_id, None, f"{type(exc).__name__}: {exc}"

    done = 0
    pending = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in prefetch_batches(pool, prepare, todo, batch_size):
            ok = [(i, prep) for i, prep, err in batch if prep is not None]
            for i, _, err in batch:
                if err is not None:
                    summary.failed.append((path_of[i], err))
            for k, job in enumerate(jobs):
                rows = [(i, prep[k]) for i, prep in ok if prep[k] is not None]
                if not rows:
                    continue
                out = job.extractor.compute([p for _, p in rows])
                ids = np.array([i for i, _ in rows], dtype=np.int64)
                for fs in job.sets:
                    mask = np.fromiter((int(i) in job.lacking[fs.name] for i in ids), bool, len(ids))
                    if mask.any():
                        job.buf_ids.setdefault(fs.name, []).extend(ids[mask].tolist())
                        job.buf_vecs.setdefault(fs.name, []).append(np.asarray(out[fs.name])[mask])
            summary.processed += len(ok)
            pending += len(ok)
            done += len(batch)
            if pending >= flush_rows:
                _flush(store, jobs, summary)
                pending = 0
            if progress:
                progress(done, len(todo))
    _flush(store, jobs, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _flush(store: Store, jobs: list[_Job], summary: ExtractSummary) -> None:
    for job in jobs:
        for fs in job.sets:
            ids = job.buf_ids.pop(fs.name, [])
            vecs = job.buf_vecs.pop(fs.name, [])
            if ids:
                store.append_vectors(fs, ids, np.concatenate(vecs).astype(np.float32, copy=False))
                summary.written[fs.name] = summary.written.get(fs.name, 0) + len(ids)


def projection_extractor(
    store: Store,
    k: int,
    size: tuple[int, int] = (640, 480),
    rule: str = "stretch",
    seed: int = 0,
    replace: bool = False,
    name: str | None = None,
) -> Extractor:
    """The ``rp<K>`` extractor, with its projection matrix persisted in the store.

    The matrix is generated from ``seed`` once and saved under
    ``<store>/projections/``; later runs (next month's images, a newer
    library) load that file, checked against the sha256 the feature set
    records, so every image of a feature set is projected identically.
    """
    from featurestore.errors import IntegrityError, NotFoundError, ParamsMismatchError
    from featurestore.features.projection import RandomProjectionExtractor, SparseRandomProjection
    from featurestore.features.resize import check_rule, check_size

    if k < 1:
        raise InvalidInputError(f"--rp must be a positive number of dimensions, got {k}")
    check_size(size)
    check_rule(rule)
    name = name or f"rp{k}"
    folder = store.root / "projections"
    requested = {"k": k, "size": [size[0], size[1]], "resize_rule": rule, "seed": seed}
    existing = None
    if not replace:
        try:
            existing = store.feature_set(name)
        except NotFoundError:
            existing = None
    if existing is not None:
        stored = {key: existing.params.get(key) for key in requested}
        if stored != requested:
            raise ParamsMismatchError(name, stored, requested)
        sha = existing.params["projection_sha256"]
        path = folder / f"{name}-{sha[:16]}.npz"
        if not path.is_file():
            raise IntegrityError(
                f"the projection matrix of {name} ({path}) is missing; without it new images cannot be "
                f"projected like the stored ones: run `fs extract --rp {k} --replace` to recompute all"
            )
        projection = SparseRandomProjection.load(path, expected_sha256=sha)
    else:
        projection = SparseRandomProjection.generate(size[0] * size[1] * 3, k, seed)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{projection.sha256()[:16]}.npz"
        if not path.is_file():
            projection.save(path)
    return RandomProjectionExtractor(projection, size=size, rule=rule, name=name)


def _canonical(params: Any) -> Any:
    """Params as the catalog's JSON column gives them back (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(params, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _build_extractor(store: Store, fs: Any, batch_size: int = 32) -> Extractor:
    """The extractor that produced ``fs``, rebuilt from its catalog row."""
    from featurestore.errors import FeatureStoreError

    p: dict[str, Any] = dict(fs.params or {})
    try:
        if fs.kind == "random_projection":
            return projection_extractor(
                store, k=int(p["k"]), size=(int(p["size"][0]), int(p["size"][1])),
                rule=p["resize_rule"], seed=int(p["seed"]), name=fs.name,
            )
        if fs.kind == "pixels":
            from featurestore.features.pixels import PixelsExtractor

            return PixelsExtractor((int(p["size"][0]), int(p["size"][1])), rule=p["resize_rule"], name=fs.name)
        if fs.kind == "lowlevel":
            from featurestore.features.lowlevel import LowLevelExtractor

            # Rebuild every recorded setting (defaults when absent); outputs() is compared below.
            kwargs: dict[str, Any] = {"rule": p["resize_rule"], "name": fs.name}
            if "working_size" in p:
                kwargs["working_size"] = tuple(p["working_size"])
            hsv, hog, gist = p.get("hsv", {}), p.get("hog", {}), p.get("gist", {})
            if "bins" in hsv:
                kwargs["hsv_bins"] = tuple(hsv["bins"])
            if "orientations" in hog:
                kwargs["hog_orientations"] = hog["orientations"]
            if "grid" in hog:
                kwargs["hog_grid"] = tuple(hog["grid"])
            if "size" in gist:
                kwargs["gist_size"] = tuple(gist["size"])
            if "frequencies" in gist:
                kwargs["gist_frequencies"] = tuple(gist["frequencies"])
            if "orientations" in gist:
                kwargs["gist_orientations"] = gist["orientations"]
            if "grid" in gist:
                kwargs["gist_grid"] = tuple(gist["grid"])
            return LowLevelExtractor(**kwargs)
        if fs.kind == "cnn":
            from featurestore.features.cnn.registry import cnn_extractor

            return cnn_extractor(store, p["model"], [p["layer"]], batch_size=batch_size)
    except KeyError as exc:
        raise FeatureStoreError(
            f"feature set {fs.name!r} ({fs.kind}) does not record {exc.args[0]!r} in its params, so new "
            f"images cannot be embedded like its stored ones; recompute it with `fs extract ... --replace`"
        ) from None
    raise InvalidInputError(
        f"feature set {fs.name!r} has kind {fs.kind!r}, which cannot featurize new images; "
        "use images already in the store (e.g. search by --id)"
    )


def extractor_for(store: Store, feature_set: str, batch_size: int = 32) -> Extractor:
    """An extractor that reproduces a stored feature set exactly (same projection, model, preprocessing).

    Used to featurize new images for prediction and search. The extractor is
    rebuilt from the feature set's catalog row and its output params compared
    with the stored ones, so a changed library or model cannot silently
    produce other vectors.
    """
    from featurestore.errors import FeatureStoreError

    fs = store.feature_set(feature_set)
    ex = _build_extractor(store, fs, batch_size)
    specs = {spec.name: spec for spec in ex.outputs()}
    spec = specs.get(fs.name)
    if spec is None:
        raise FeatureStoreError(
            f"the {fs.kind} extractor rebuilt for {fs.name!r} produces {', '.join(sorted(specs))}, not "
            f"{fs.name!r}; recompute the feature set with `fs extract ... --replace`"
        )
    stored, rebuilt = _canonical(fs.params), _canonical(spec.params)
    if stored != rebuilt or spec.dim != fs.dim or spec.kind != fs.kind:
        diff = sorted(k for k in set(stored) | set(rebuilt) if stored.get(k) != rebuilt.get(k))
        if spec.dim != fs.dim:
            diff.append(f"dim (stored {fs.dim} vs now {spec.dim})")
        raise FeatureStoreError(
            f"new images cannot be featurized like the stored vectors of {fs.name!r}: the extractor now "
            f"records different parameters ({', '.join(diff) or 'kind'}); recompute the set with "
            f"`fs extract ... --replace`"
        )
    return ex
