"""Predictions of a trained run: for stored images (``fs predict``) and for one upload (HTTP).

Both paths featurize with the store's cached extractors (rebuilt from the
feature sets' catalog rows, so new images are embedded like the training
images) and the store's cached, sha256-verified run model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featurestore.catalog.schema import Run
from featurestore.errors import FeatureStoreError, InvalidInputError, UnsupportedMediaError
from featurestore.io.atomic import write_bytes_atomic
from featurestore.io.images import DecodedImage
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
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
    check_features_unchanged(store, run)
    model = store.run_model(run)
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise InvalidInputError("no images to predict: give --dataset, --unlabelled or image paths")
    skipped: list[tuple[str, str]] = []
    lacking = sorted(set().union(*(store.images_lacking(f, ids) for f in run.features)))
    if lacking:
        extractors = [store.extractor(f, batch_size)[0] for f in run.features]
        summary = extract(store, extractors, image_ids=lacking, batch_size=batch_size, progress=progress)
        skipped = summary.failed
    fm = store.read_matrix(run.features, image_ids=ids, skip_missing=True)
    if len(fm.image_ids) == 0:
        raise FeatureStoreError("none of the images could be featurized; see the skipped files above")
    rows = _top(run, model, np.asarray(model.predict_proba(fm.X)), fm.image_ids.tolist())
    store.catalog.replace_predictions(run.id, rows)
    return PredictSummary(run.id, len(rows), skipped, rows)


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

    The upload is decoded once (by the caller) and featurized once; the write
    lock is held only while the image, its vectors and the row are written.
    """
    run = store.catalog.run(run_id)
    check_features_unchanged(store, run)
    model = store.run_model(run)
    vectors = featurize(store, run, upload.image)
    X = np.hstack([vectors[name] for name in run.features])
    proba = np.asarray(model.predict_proba(X))
    rows = _top(run, model, proba, [0], k=max(k, TOP))
    result = UploadPrediction(run.id, rows[0]["top5"][:k])
    if keep:
        result.image_id = _store_upload(store, run, upload, data, vectors, rows[0])
    return result


def _store_upload(store: Store, run: Run, upload: DecodedImage, data: bytes, vectors: dict[str, np.ndarray],
                  row: dict[str, Any]) -> int:
    """Save the upload under uploads/, ingest it (dataset "uploads"), add its vectors and prediction row."""
    ext = UPLOAD_EXTENSIONS.get(upload.format)
    if ext is None:
        raise UnsupportedMediaError(
            f"{upload.format} images cannot be stored; upload JPEG, PNG, WebP, BMP, GIF or TIFF"
        )
    path = Path(store.root) / "uploads" / f"{upload.sha256}.{ext}"
    with store.writing():
        image_id = store.catalog.image_id_by_sha256(upload.sha256)
        if image_id is None:  # content already in the store is not saved twice
            if not path.is_file():
                write_bytes_atomic(path, data)
            summary = ingest(store, path, dataset="uploads", labels="none")
            if summary.failed:
                raise InvalidInputError(f"upload could not be ingested: {summary.failed[0][1]}")
            image_id = summary.image_ids[0]
        for name, vec in vectors.items():
            if store.images_lacking(name, [image_id]):
                store.append_vectors(store.feature_set(name), [image_id], vec)
        store.catalog.replace_predictions(run.id, [{**row, "image_id": int(image_id), "top5": row["top5"][:TOP]}])
    return int(image_id)
