"""Predictions of a trained run: for stored images (``fs predict``) and for one upload (HTTP).

Both paths featurize with the store's cached extractors (rebuilt from the
feature sets' catalog rows, so new images are embedded like the training
images) and the store's cached, sha256-verified run model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from featurestore.catalog.repository import Catalog
from featurestore.catalog.schema import Run, utcnow
from featurestore.errors import FeatureStoreError, InvalidParameterError, UnsupportedMediaError
from featurestore.io.atomic import write_bytes_atomic
from featurestore.io.images import DecodedImage
from featurestore.pipelines.extract import extract
from featurestore.pipelines.train import check_features_unchanged
from featurestore.store import Store

Progress = Callable[[int, int], None]
TOP = 5
# Pillow format -> file extension that `fs ingest` accepts.
UPLOAD_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


@dataclass
class PredictSummary:
    run_id: int
    predicted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _top(run: Run, model: Any, proba: np.ndarray, image_ids: Sequence[int], k: int = TOP) -> list[dict[str, Any]]:
    """One prediction row per image: best label, its probability and the top-k labels."""
    classes = np.asarray(model.classes_)
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    rows = []
    for i, image_id in enumerate(image_ids):
        top = [{"label": str(classes[j]), "probability": float(proba[i, j])} for j in order[i]]
        rows.append({"run_id": run.id, "image_id": int(image_id), "label": top[0]["label"],
                     "probability": top[0]["probability"], "top5": top})
    return rows


def predict(store: Store, run_id: int, image_ids: Sequence[int], batch_size: int = 32,
            progress: Progress | None = None) -> PredictSummary:
    """Featurize what is missing, predict, and replace this run's prediction rows for those images.

    Call under ``store.writing()``.
    """
    run = store.catalog.run(run_id)
    stored = check_features_unchanged(store, run)  # the versions of the sets the run was trained on
    model = store.run_model(run)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise InvalidParameterError("no images to predict: give {dataset}, {unlabelled} or image paths", "dataset",
                                    "unlabelled")
    skipped: list[tuple[str, str]] = []
    lacking = sorted(set().union(*(store.images_lacking(stored[f], ids) for f in run.features)))
    if lacking:
        _check_extendable(store, run, stored, len(lacking))
        lacking = sorted(set().union(*(store.images_lacking(f, lacking) for f in run.features)))
    if lacking:
        extractors = [store.extractor(f, batch_size)[0] for f in run.features]
        summary = extract(store, extractors, image_ids=lacking, batch_size=batch_size, progress=progress)
        skipped = summary.failed
    image_ids_out, X = _run_matrix(store, run, stored, ids)
    if len(image_ids_out) == 0:
        raise FeatureStoreError("none of the images could be featurized; see the skipped files above")
    rows = _top(run, model, np.asarray(model.predict_proba(X)), image_ids_out.tolist())
    store.catalog.replace_predictions(run.id, rows)
    return PredictSummary(run.id, len(rows), skipped, rows)


def _run_matrix(store: Store, run: Run, stored: dict[str, str], ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, X) of ``ids`` in the versions the run read; an image without a vector in such an older
    version takes the newest version's (allowed only when both have the same params, see
    :func:`_check_extendable`). Images lacking a vector in either are left out."""
    fm = store.read_matrix([stored[f] for f in run.features], image_ids=ids, skip_missing=True)
    rest = sorted(set(ids) - set(fm.image_ids.tolist()))
    if not rest or all(stored[f] == f for f in run.features):
        return fm.image_ids, fm.X
    blocks = []
    for name in run.features:
        got: dict[int, np.ndarray] = {}
        for row_name in dict.fromkeys((stored[name], name)):  # the run's version first, then the newest
            part = store.read_matrix([row_name], image_ids=[i for i in ids if i not in got], skip_missing=True)
            got.update(zip(part.image_ids.tolist(), part.X, strict=True))
        blocks.append(got)
    keep = [i for i in ids if all(i in b for b in blocks)]
    if not keep:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    return np.asarray(keep, dtype=np.int64), np.hstack([np.stack([b[i] for i in keep]) for b in blocks])


def _check_extendable(store: Store, run: Run, stored: dict[str, str], lacking: int) -> None:
    """Refuse new vectors for a run that read an older version of a set with other params than the newest.

    An older version is kept as it was: new vectors go to the newest version. When it has the same
    kind, dim and params (``--replace`` only recomputed them), the newest version's vectors stand in
    for an image the older one lacks; otherwise there is no extractor that reproduces the older one.
    """
    old = []
    for name, row in stored.items():
        if row == name:
            continue
        was, now = store.feature_set(row), store.feature_set(name)
        if (was.kind, was.dim, was.params) != (now.kind, now.dim, now.params):
            old.append(f"{name} (kept as {row})")
    if old:
        raise FeatureStoreError(
            f"run {run.id} was trained on an older version of {', '.join(old)}, and {lacking} image(s) lack a "
            f"vector in it; older versions are kept read-only and the newest has other params: predict images "
            f"that have one, or retrain on the newest version", remedy="retrain-newest",
            features=",".join(run.features))


@dataclass
class UploadPrediction:
    """The prediction for one uploaded image; ``image_id`` when it was stored."""

    run_id: int
    top: list[dict[str, Any]]
    image_id: int | None = None


def featurize(store: Store, run: Run, image: Image.Image) -> dict[str, np.ndarray]:
    """Each of the run's feature vectors of one decoded RGB image, with the cached extractors."""
    out = {}
    for name in run.features:
        ex, lock = store.extractor(name)
        prepared = ex.prepare(image)
        with lock:  # CNN executors are not safe to call from several threads at once
            vec = ex.compute([prepared])[name]
        out[name] = np.asarray(vec, dtype=np.float32).reshape(1, -1)
    return out


def predict_upload(store: Store, run_id: int, upload: DecodedImage, data: bytes, k: int = TOP,
                   keep: bool = False) -> UploadPrediction:
    """Classify one decoded upload; with ``keep``, also ingest it and store its vectors and prediction row.

    The upload is decoded once (by the caller) and featurized once. With
    ``keep`` the storing runs beside the classification (see :class:`_UploadWriter`):
    the file is saved while the image is featurized, the image row and vector
    shard are written while the model predicts, and the image, its vectors and
    the prediction row are committed in one transaction. The write lock is held
    only while those are written.
    """
    run = store.catalog.run(run_id)
    _check_extendable(store, run, check_features_unchanged(store, run), 1)
    model = store.run_model(run)
    writer = _UploadWriter(store, run, upload, data) if keep else None
    try:
        vectors = featurize(store, run, upload.image)
        if writer:
            writer.vectors.set_result(vectors)
        X = np.hstack([vectors[name] for name in run.features])
        row = _top(run, model, np.asarray(model.predict_proba(X)), [0], k=max(k, TOP))[0]
    except BaseException:
        if writer:
            writer.abandon()
        raise
    image_id = writer.finish(row) if writer else None
    return UploadPrediction(run.id, row["top5"][:k], image_id=image_id)


class _UploadWriter:
    """Stores one upload in a thread of its own while the caller featurizes and classifies it.

    The caller hands over the vectors (``vectors.set_result``), then the
    prediction row (:meth:`finish`). The thread saves ``uploads/<sha256>.<ext>``
    (atomically; no lock needed, the name is the content), then under the
    store's write lock inserts the image row (dataset "uploads"), writes the
    vector shards, and commits them with the prediction row in one transaction
    once the row arrives. If the caller fails, :meth:`abandon` makes the thread
    roll back (a written shard is an orphan that the next sweeping writer, e.g.
    `fs extract`, removes).
    """

    def __init__(self, store: Store, run: Run, upload: DecodedImage, data: bytes):
        ext = UPLOAD_EXTENSIONS.get(upload.format)
        if ext is None:
            raise UnsupportedMediaError(
                f"{upload.format} images cannot be stored; upload JPEG, PNG, WebP, BMP, GIF or TIFF"
            )
        self.path = Path(store.root) / "uploads" / f"{upload.sha256}.{ext}"
        self.vectors: Future[dict[str, np.ndarray]] = Future()
        self.row: Future[dict[str, Any]] = Future()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-store-upload")
        self._done = self._pool.submit(self._store, store, run, upload, data)

    def finish(self, row: dict[str, Any]) -> int:
        """Hand over the prediction row and wait for the commit; the stored image's id."""
        self.row.set_result(row)
        try:
            return self._done.result()
        finally:
            self._pool.shutdown()

    def abandon(self) -> None:
        """The caller failed: roll back whatever the thread wrote, and wait until it has."""
        for pending in (self.vectors, self.row):
            if not pending.done():
                pending.set_exception(FeatureStoreError("the prediction failed; the upload was not stored"))
        wait([self._done])
        self._pool.shutdown()

    def _store(self, store: Store, run: Run, upload: DecodedImage, data: bytes) -> int:
        catalog = store.catalog
        if catalog.image_id_by_sha256(upload.sha256) is None and not self.path.is_file():
            write_bytes_atomic(self.path, data)  # content already in the store is not saved twice
        vectors = self.vectors.result()
        with store.writing(sweep=False), catalog.session() as s:  # sweeping lists every shard: not per upload
            image_id = catalog.image_id_by_sha256(upload.sha256)  # under the lock: no writer can add it now
            new = image_id is None
            if image_id is None:
                image_id = _add_upload(catalog, s, upload, self.path)
            for name, vec in vectors.items():
                fs = store.feature_set(name)
                if new or not catalog.has_vector(fs.id, image_id):
                    store.append_vectors(fs, [image_id], vec, session=s)
            row = self.row.result()
            catalog.replace_predictions(run.id, [{**row, "image_id": int(image_id), "top5": row["top5"][:TOP]}], s=s)
        return int(image_id)


def _add_upload(catalog: Catalog, s: Session, upload: DecodedImage, path: Path) -> int:
    """Insert the upload saved at ``path`` as `fs ingest` would (unlabelled, member of dataset "uploads")."""
    dataset_id = catalog.dataset_id(s, "uploads", create=True)
    now, source = utcnow(), str(path.resolve())
    image_id = catalog.add_images(s, [{
        "sha256": upload.sha256, "source_path": source, "width": upload.width, "height": upload.height,
        "format": upload.format, "mode": upload.mode, "bytes": upload.nbytes, "label": None, "superclass": None,
        "dataset_id": dataset_id, "ingested_at": now}])[0]
    catalog.add_members(s, dataset_id, [(image_id, source)], now)
    return image_id
