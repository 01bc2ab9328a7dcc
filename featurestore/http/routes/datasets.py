"""``GET /v1/datasets``: the datasets and their image counts."""

from __future__ import annotations

from fastapi import APIRouter

from featurestore.http.deps import Authenticated, StoreDep
from featurestore.http.schemas import AUTH_ERRORS, DatasetOut

router = APIRouter(prefix="/v1/datasets", tags=["catalog"], dependencies=[Authenticated],
                   responses=AUTH_ERRORS)


@router.get("")
def list_datasets(store: StoreDep) -> list[DatasetOut]:
    """Datasets with their image counts."""
    return [DatasetOut(name=d.name, images=d.images, created_at=d.created_at) for d in store.catalog.dataset_counts()]
