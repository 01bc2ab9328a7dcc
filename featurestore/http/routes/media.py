"""``GET /v1/images/{id}/thumbnail`` and ``GET /v1/images/{id}/file``: pixels of catalogued images.

Only images in the catalog are served, found by id: no path from the client ever
reaches the file system. The file's bytes are checked against the size and sha256
recorded at ingest before anything is sent (a file replaced since, even by a
symlink to another file, is refused with 409), and only regular files are read.
Both answers carry an ``ETag`` (the content's sha256), so a browser revalidates
with ``If-None-Match`` and gets 304 without the bytes. Same access rule as the
JSON API: with ``FS_API_TOKEN`` set, the bearer token or the web app's session
cookie is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from featurestore.catalog.repository import ImageFile
from featurestore.errors import ImageNotFoundError
from featurestore.http.deps import Authenticated, settings_of_app, store_of_app
from featurestore.http.schemas import ErrorOut
from featurestore.io.images import ImageDecodeError
from featurestore.io.thumbnails import (
    THUMBNAIL_SIZES,
    SourceChangedError,
    SourceUnavailableError,
    read_source,
    sweep_temp_files,
    thumbnail,
)

MAX_ID = 2**63 - 1
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
               "GIF": "image/gif", "TIFF": "image/tiff", "MPO": "image/jpeg"}
CACHE = "private, max-age=3600"
_swept: set[Path] = set()

router = APIRouter(tags=["images"], dependencies=[Authenticated])

ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="Image id (see GET /v1/images/{id}).")]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


MEDIA_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("missing or wrong bearer token"),
    404: _error("no such image, or its file is gone"),
    409: _error("the file changed since it was ingested"),
    422: _error("invalid parameters, or the file cannot be decoded"),
}


def _catalogued(request: Request, image_id: int) -> ImageFile:
    found = store_of_app(request).catalog.image_file(image_id)
    if found is None:
        raise ImageNotFoundError(image_id)
    return found


def _not_modified(request: Request, etag: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE})
    return None


def _failed(exc: Exception) -> HTTPException:
    if isinstance(exc, SourceUnavailableError):
        return HTTPException(404, str(exc))
    if isinstance(exc, SourceChangedError):
        return HTTPException(409, str(exc))
    return HTTPException(422, f"image cannot be decoded: {exc}")


@router.get("/v1/images/{image_id}/thumbnail", response_class=Response, responses={
    200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail (EXIF orientation applied)."},
    304: {"description": "Not modified (If-None-Match matched the ETag)."}, **MEDIA_ERRORS})
async def image_thumbnail(
    request: Request,
    image_id: ImageId,
    size: Annotated[int, Query(description=f"Longest side in pixels: one of {', '.join(map(str, THUMBNAIL_SIZES))}. "
                                           "Images are never enlarged.")] = 256,
) -> Response:
    """A JPEG thumbnail of a catalogued image, made with Pillow on first use and cached in the store."""
    if size not in THUMBNAIL_SIZES:
        raise HTTPException(422, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
    # One thread-pool hop for the catalog lookup and the (usually cached) file: a grid asks for 100 at once.
    return await run_in_threadpool(_thumbnail_response, request, image_id, size)


def _thumbnail_response(request: Request, image_id: int, size: int) -> Response:
    found = _catalogued(request, image_id)
    etag = f'"{found.sha256[:32]}-{size}"'
    if (cached := _not_modified(request, etag)) is not None:
        return cached
    settings = settings_of_app(request)
    store = store_of_app(request)
    folder = store.root  # a bucket store's local copies are in its working folder, the thumbnails in its bucket
    if folder not in _swept:  # once per process: temp files of cache writers that crashed
        _swept.add(folder)
        sweep_temp_files(folder)
    try:
        jpeg = thumbnail(folder, found.source_path, found.sha256, found.bytes, size,
                         settings.max_image_pixels, store.files.bucket)
    except (SourceUnavailableError, SourceChangedError, ImageDecodeError) as exc:
        raise _failed(exc) from None
    return Response(jpeg, media_type="image/jpeg", headers={"ETag": etag, "Cache-Control": CACHE,
                                                             "X-Content-Type-Options": "nosniff"})


@router.get("/v1/images/{image_id}/file", response_class=Response, responses={
    200: {"content": {t: {} for t in sorted(set(MEDIA_TYPES.values()))},
          "description": "The original file, as ingested."},
    304: {"description": "Not modified (If-None-Match matched the ETag)."}, **MEDIA_ERRORS})
async def image_original(request: Request, image_id: ImageId) -> Response:
    """The original bytes of a catalogued image, checked against the sha256 recorded at ingest."""
    found = await run_in_threadpool(_catalogued, request, image_id)
    etag = f'"{found.sha256[:32]}"'
    if (cached := _not_modified(request, etag)) is not None:
        return cached
    try:
        data = await run_in_threadpool(read_source, found.source_path, found.sha256, found.bytes)
    except (SourceUnavailableError, SourceChangedError) as exc:
        raise _failed(exc) from None
    media_type = MEDIA_TYPES.get(found.format.upper(), "application/octet-stream")
    ext = media_type.rsplit("/", 1)[-1].replace("jpeg", "jpg") if "/" in media_type else "bin"
    return Response(data, media_type=media_type, headers={
        "ETag": etag, "Cache-Control": CACHE, "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": f'inline; filename="image-{found.id}.{ext}"'})
