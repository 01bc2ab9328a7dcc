"""``/v1/runs``: training / evaluation runs, one run's splits, and predicting an uploaded image.

Prediction is :func:`featurestore.pipelines.predict.predict_upload`: the upload
is decoded once (by :func:`~featurestore.http.deps.read_upload`), featurized
once with the store's cached extractors and model, and with ``store=true`` the
write lock is held only while the image, its vectors and the row are written.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form

from featurestore.http.deps import Authenticated, StoreDep, StoreRequested, UploadDep
from featurestore.http.params import MAX_K, RunId
from featurestore.http.schemas import (
    AUTH_ERRORS,
    ERRORS,
    WRITE_ERRORS,
    LabelProbability,
    PredictOut,
    RunDetailOut,
    RunOut,
    UploadInfo,
)
from featurestore.pipelines.predict import predict_upload
from featurestore.pipelines.train import list_runs

router = APIRouter(prefix="/v1/runs", tags=["runs"], dependencies=[Authenticated], responses=AUTH_ERRORS)

TopLabels = Annotated[int, Form(ge=1, le=MAX_K, description="Number of labels returned.")]


@router.get("")
def get_runs(store: StoreDep) -> list[RunOut]:
    """Training and evaluation runs with their mean scores over the splits."""
    return [RunOut(**RunOut.fields(r)) for r in list_runs(store)]


@router.get("/{run_id}", responses=ERRORS)
def get_run(run_id: RunId, store: StoreDep) -> RunDetailOut:
    """One run with its per-split test accuracy."""
    run = store.catalog.run(run_id)
    return RunDetailOut(**RunOut.fields(run), split_accuracies=store.catalog.split_scores(run_id),
                        feature_versions=store.catalog.run_pins([run_id]).get(run_id, {}))


@router.post("/{run_id}/predict", responses=WRITE_ERRORS)
def predict(run_id: RunId, store: StoreDep, keep: StoreRequested, upload: UploadDep, k: TopLabels = 5) -> PredictOut:
    """Classify an uploaded image with a run's final model (top-k labels with probabilities).

    With ``store=true`` (a server started with ``--allow-writes``, and the
    token) the image is also ingested into the dataset ``uploads`` with its
    vectors and the prediction row.
    """
    out = predict_upload(store, run_id, upload.decoded, upload.data, k=k, keep=keep)
    top = [LabelProbability(**t) for t in out.top]
    return PredictOut(run_id=out.run_id, label=top[0].label, probability=top[0].probability, top=top,
                      upload=UploadInfo.from_decoded(upload.decoded), stored=keep, image_id=out.image_id)
