"""``GET /v1/images/{id}``: one image's catalog row."""

from __future__ import annotations

from fastapi import APIRouter, Request

from featurestore.errors import ImageNotFoundError
from featurestore.http.access import paths_visible
from featurestore.http.deps import Authenticated, StoreDep
from featurestore.http.params import ImageId
from featurestore.http.schemas import AUTH_ERRORS, ERRORS, ImageOut

router = APIRouter(prefix="/v1/images", tags=["catalog"], dependencies=[Authenticated],
                   responses=AUTH_ERRORS)


@router.get("/{image_id}", responses=ERRORS)
def get_image(request: Request, image_id: ImageId, store: StoreDep) -> ImageOut:
    """One image's catalog row and the feature sets it has a vector in."""
    found = store.catalog.image_detail(image_id)
    if found is None:
        raise ImageNotFoundError(image_id)
    img, datasets, sets = found
    return ImageOut.from_row(img, datasets, sets, paths_visible(request))
