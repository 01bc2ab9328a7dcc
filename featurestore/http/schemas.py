"""Response models of the HTTP API (they also document it in ``/openapi.json``).

Field names match the CLI's JSON and the Python API: search hits carry
``distance`` (lower is better, any metric) and, for cosine, ``similarity``.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from featurestore.catalog.schema import Image, Run
from featurestore.io.images import DecodedImage
from featurestore.search.service import SearchResult

PATH_DOC = ("Absolute path of the image file on the server; null unless the caller is authenticated (or, on a "
            "server without FS_API_TOKEN, connects from loopback).")


class ErrorOut(BaseModel):
    """Every error: ``{"detail": "<what was wrong and what to do>"}``."""

    detail: str


class HealthOut(BaseModel):
    status: str
    version: str
    allow_writes: bool


class DatasetOut(BaseModel):
    name: str
    images: int
    created_at: datetime | None


class FeatureSetOut(BaseModel):
    name: str
    kind: str
    dim: int
    images: int
    coverage: float
    shards: int


class ImageOut(BaseModel):
    id: int
    sha256: str
    path: str | None = Field(description=PATH_DOC)
    datasets: list[str]
    label: str | None
    superclass: str | None
    width: int
    height: int
    format: str
    mode: str
    bytes: int
    ingested_at: datetime | None
    feature_sets: list[str]

    @classmethod
    def from_row(cls, img: Image, datasets: list[str], feature_sets: list[str], show_path: bool) -> ImageOut:
        path = img.source_path if show_path else None
        return cls(id=img.id, sha256=img.sha256, path=path, datasets=datasets, label=img.label,
                   superclass=img.superclass, width=img.width, height=img.height, format=img.format,
                   mode=img.mode, bytes=img.bytes, ingested_at=img.ingested_at, feature_sets=feature_sets)


class VectorOut(BaseModel):
    feature_set: str
    image_id: int
    dim: int
    vector: list[float | None]

    @staticmethod
    def finite_or_none(values: list[float]) -> list[float | None]:
        """JSON has no NaN or infinity: non-finite values become null."""
        return [v if math.isfinite(v) else None for v in values]


class SearchHit(BaseModel):
    rank: int
    image_id: int
    path: str | None = Field(description=PATH_DOC)
    label: str | None
    distance: float
    similarity: float | None = None
    method: Literal["index", "exact"] = Field("exact", description="How this hit was found: through the "
                                              "feature set's ANN index, or by scoring vectors exactly.")

    @classmethod
    def from_result(cls, r: SearchResult, show_path: bool) -> SearchHit:
        return cls(**{**r.as_dict(), "path": r.path if show_path else None})


class UploadInfo(BaseModel):
    sha256: str
    width: int
    height: int
    format: str

    @classmethod
    def from_decoded(cls, d: DecodedImage) -> UploadInfo:
        return cls(sha256=d.sha256, width=d.width, height=d.height, format=d.format)


class SearchOut(BaseModel):
    feature_set: str
    metric: str
    image_id: int | None = None
    upload: UploadInfo | None = None
    results: list[SearchHit]
    method: Literal["index", "exact"] = Field("exact", description='"index" when the feature set\'s ANN index '
                                              'answered (`fs index build`), else "exact".')
    note: str = Field("", description="How the search ran, for a person: the index used, vectors added since "
                                      "its build that were scored exactly, or why it was not used.")


class RunOut(BaseModel):
    id: int
    created_at: datetime | None
    status: str
    features: list[str]
    classifier: str
    target: str
    n_images: int
    n_splits: int
    test_size: float
    accuracy_mean: float | None
    accuracy_std: float | None
    macro_f1_mean: float | None
    superclass_accuracy_mean: float | None
    has_model: bool
    comparison_group: str | None

    @staticmethod
    def fields(run: Run) -> dict[str, Any]:
        return {"id": run.id, "created_at": run.created_at, "status": run.status, "features": list(run.features),
                "classifier": run.classifier, "target": run.target, "n_images": run.n_images,
                "n_splits": run.n_splits, "test_size": run.test_size, "accuracy_mean": run.accuracy_mean,
                "accuracy_std": run.accuracy_std, "macro_f1_mean": run.macro_f1_mean,
                "superclass_accuracy_mean": run.superclass_accuracy_mean, "has_model": bool(run.artifact_path),
                "comparison_group": run.comparison_group}


class RunDetailOut(RunOut):
    split_accuracies: list[float]
    feature_versions: dict[str, int] = Field(default_factory=dict, description="The version of each feature set "
                                             "the run read (`fs versions SET`); prediction reads the same.")


class LabelProbability(BaseModel):
    label: str
    probability: float


class PredictOut(BaseModel):
    run_id: int
    label: str
    probability: float
    top: list[LabelProbability]
    upload: UploadInfo
    stored: bool
    image_id: int | None = None


# -- documented error responses of the operations ------------------------------------------
Responses = dict[int | str, dict[str, Any]]


def _errors(**codes: str) -> Responses:
    return {int(code.lstrip("_")): {"model": ErrorOut, "description": text} for code, text in codes.items()}


AUTH_ERRORS: Responses = _errors(_401="missing or wrong bearer token")
ERRORS: Responses = _errors(_401="missing or wrong bearer token", _404="unknown feature set, image, run or dataset",
                            _409="the image lacks a vector in this feature set", _422="invalid parameters")
UPLOAD_ERRORS: Responses = {**ERRORS, **_errors(_413="upload too large or decompression bomb",
                                                _415="the upload is not an image")}
WRITE_ERRORS: Responses = {**UPLOAD_ERRORS, **_errors(_403="writes are disabled on this server",
                                                      _503="another process is writing to the store")}
