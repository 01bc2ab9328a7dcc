"""``/v1/feature-sets``: the sets with their coverage, stored vectors, and search by image id or by upload.

Search is :func:`featurestore.search.service.search`: through the set's ANN index
when it has one (``exact`` forces brute force), else exact; the
label / dataset filters reach SQL only as bound parameters
(:meth:`~featurestore.catalog.repository.Catalog.image_ids_where`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from featurestore.http.access import paths_visible
from featurestore.http.deps import Authenticated, StoreDep, UploadDep
from featurestore.http.params import (
    DatasetName,
    ExactQuery,
    FormDataset,
    FormExact,
    FormLabel,
    FormMetric,
    FormTopK,
    ImageId,
    Label,
    Metric,
    MetricQuery,
    QueryImageId,
    SetName,
    TopK,
)
from featurestore.http.schemas import (
    AUTH_ERRORS,
    ERRORS,
    UPLOAD_ERRORS,
    FeatureSetOut,
    SearchHit,
    SearchOut,
    UploadInfo,
    VectorOut,
)
from featurestore.search.cache import IdFilter
from featurestore.search.service import Found, search, stored_vector
from featurestore.store import Store

router = APIRouter(prefix="/v1/feature-sets", dependencies=[Authenticated], responses=AUTH_ERRORS)


def _allowed(store: Store, label: str | None, dataset: str | None) -> IdFilter | None:
    """The label / dataset filters (their ids fetched once per catalog version by the search), or None
    without filters (unknown dataset: 404)."""
    if label is None and dataset is None:
        return None
    return IdFilter(("label", label, "dataset", dataset),
                    lambda: store.catalog.image_ids_where(label=label, dataset=dataset))


@router.get("", tags=["catalog"])
def list_feature_sets(store: StoreDep) -> list[FeatureSetOut]:
    """Feature sets with their coverage (images with a vector / all images) and shard counts."""
    total = store.catalog.image_count()
    return [FeatureSetOut(name=row.name, kind=row.kind, dim=row.dim, images=row.images,
                          coverage=row.images / total if total else 0.0, shards=row.shards)
            for row in store.coverage()]


@router.get("/{name}/vectors/{image_id}", tags=["feature sets"], responses=ERRORS)
def get_vector(name: SetName, image_id: ImageId, store: StoreDep) -> VectorOut:
    """One image's stored vector in a feature set (non-finite values are null)."""
    fs = store.feature_set(name)
    vec = stored_vector(store, fs.name, image_id)
    return VectorOut(feature_set=fs.name, image_id=image_id, dim=fs.dim,
                     vector=VectorOut.finite_or_none(vec.astype(float).tolist()))


@router.get("/{name}/search", tags=["feature sets"], responses=ERRORS)
async def search_by_id(request: Request, name: SetName, image_id: QueryImageId, store: StoreDep, k: TopK = 10,
                       label: Label = None, dataset: DatasetName = None, metric: MetricQuery = "cosine",
                       exact: ExactQuery = False) -> SearchOut:
    """Images nearest to a stored image (through the set's ANN index if it has one, else exact), optionally
    only those with a label / in a dataset."""
    # async with the search in one worker thread: as a plain def, FastAPI would hop to its thread pool for
    # the route and again to check the returned model, each hop costing more than the check (issue 31)
    return await run_in_threadpool(_search_by_id, request, name, image_id, store, k, label, dataset, metric, exact)


def _search_by_id(request: Request, name: str, image_id: int, store: Store, k: int, label: str | None,
                  dataset: str | None, metric: Metric, exact: bool) -> SearchOut:
    fs = store.search_state(name).handle  # cached with the search's state (issue 31): no catalog query
    allowed = _allowed(store, label, dataset)
    found = search(store, fs.name, image_id, k, metric=metric, id_filter=allowed, exact=exact)
    return SearchOut(feature_set=fs.name, metric=metric, image_id=image_id, **_found(found, request))


@router.post("/{name}/search", tags=["feature sets"], responses=UPLOAD_ERRORS)
def search_by_upload(request: Request, name: SetName, store: StoreDep, upload: UploadDep, k: FormTopK = 10,
                     label: FormLabel = None, dataset: FormDataset = None, metric: FormMetric = "cosine",
                     exact: FormExact = False) -> SearchOut:
    """Images nearest to an uploaded image (not stored), embedded like the feature set's stored vectors."""
    fs = store.feature_set(name)
    allowed = _allowed(store, label, dataset)
    found = search(store, fs.name, upload.decoded.image, k, metric=metric, id_filter=allowed, exact=exact)
    return SearchOut(feature_set=fs.name, metric=metric, upload=UploadInfo.from_decoded(upload.decoded),
                     **_found(found, request))


def _found(found: Found, request: Request) -> dict[str, Any]:
    """The ``results``, ``method`` and ``note`` fields of a :class:`SearchOut`."""
    show = paths_visible(request)
    return {"results": [SearchHit.from_result(h, show) for h in found], "method": found.method, "note": found.note}
