"""FastAPI dependencies: the store, the settings, authentication, the write switch, uploads.

Routes declare them as ``Annotated`` types (``store: StoreDep``), so a test can
replace any of them with ``app.dependency_overrides[get_store] = ...``. The app
keeps the settings and the open store in ``app.state`` (see
:func:`featurestore.http.app.create_app`).

The dependencies that only read ``app.state`` or headers are ``async def``:
FastAPI runs a plain ``def`` dependency in its thread pool, and each such hop
(a queue put, a thread wake-up and a wake-up of the event loop) cost a search
request more than the work itself (issue 31). Code outside dependency
injection uses :func:`settings_of_app` and :func:`store_of_app`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, File, Form, Request, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image

from featurestore.config import Settings
from featurestore.errors import PayloadTooLargeError
from featurestore.http.access import carries_token
from featurestore.http.errors import UnauthorizedError, WritesDisabledError
from featurestore.http.limits import max_upload_bytes
from featurestore.io.images import DecodedImage, ImageDecodeError, decode_bytes
from featurestore.store import Store


def settings_of_app(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def store_of_app(request: Request) -> Store:
    """The store the app opened at startup (its lifespan)."""
    store: Store | None = getattr(request.app.state, "store", None)
    if store is None:
        raise RuntimeError("the store is not open: run the app under uvicorn or `with TestClient(app)` "
                           "so that its lifespan starts")
    return store


async def get_settings(request: Request) -> Settings:
    """Dependency: the settings the app was created with (:func:`settings_of_app`)."""
    return settings_of_app(request)


async def get_store(request: Request) -> Store:
    """Dependency: the store the app opened at startup (:func:`store_of_app`)."""
    return store_of_app(request)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="FS_API_TOKEN of the server, when it has one.")


async def authenticate(request: Request, settings: SettingsDep,
                       _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Require the token when the server has one (401 otherwise): ``Authorization: Bearer <FS_API_TOKEN>``,
    or the web app's session cookie (see :mod:`featurestore.http.access`).

    The ``HTTPBearer`` parameter documents the scheme in ``/openapi.json``; the
    check itself is :func:`~featurestore.http.access.carries_token`.
    """
    if settings.api_token is not None and not carries_token(request, settings.api_token):
        raise UnauthorizedError()


def require_writes(settings: SettingsDep) -> None:
    """403 unless the server was started with ``--allow-writes``."""
    if not settings.allow_writes:
        raise WritesDisabledError()


def wants_store(
    settings: SettingsDep,
    store_it: Annotated[bool, Form(alias="store", description="Also ingest the image (dataset 'uploads') and "
                                   "store the prediction row; needs a server started with --allow-writes.")] = False,
) -> bool:
    """The ``store`` form field; asking to store on a read-only server is a 403 (before the upload is read)."""
    if store_it:
        require_writes(settings)
    return store_it


@dataclass(frozen=True)
class Upload:
    """An uploaded image: its bytes (for storing) and the decoded RGB pixels with metadata."""

    data: bytes
    decoded: DecodedImage

    @property
    def image(self) -> Image.Image:
        return self.decoded.image


def read_upload(
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, WebP, BMP, GIF, TIFF...), at most "
                                     "FS_MAX_UPLOAD_MB of the server.")],
) -> Upload:
    """Read at most the upload limit (413 beyond) and decode it once (415 / 413 / 422 when it is no image)."""
    return decode_upload(file, settings)


def decode_upload(file: UploadFile, settings: Settings) -> Upload:
    """:func:`read_upload` outside dependency injection (the web app's forms, where the file is optional)."""
    limit = max_upload_bytes(settings)
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"upload larger than the limit of {settings.max_upload_mb} MiB "
                                   "(FS_MAX_UPLOAD_MB on the server)")
    return decode_upload_bytes(data, file.filename, settings)


def decode_upload_bytes(data: bytes, filename: str | None, settings: Settings) -> Upload:
    """Decode bytes already received (an upload the web app keeps for a while, or a stored image's file)."""
    try:
        decoded = decode_bytes(data, settings.max_image_pixels)
    except ImageDecodeError as exc:
        name = f" {filename}" if filename else ""
        raise type(exc)(f"upload{name}: {exc}") from None  # same type, so the same status
    return Upload(data, decoded)


Authenticated = Depends(authenticate)
UploadDep = Annotated[Upload, Depends(read_upload)]
StoreRequested = Annotated[bool, Depends(wants_store)]

