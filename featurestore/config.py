"""Settings: the only place that reads ``FS_*`` environment variables.

Precedence is option > environment > default: the CLI passes explicit options as
overrides, everything else falls back to the environment, then to the defaults
below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from featurestore.errors import InvalidInputError

ENV_PREFIX = "FS_"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(f"{name}={raw!r} is not an integer; unset it or give a number") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidInputError(f"{name}={raw!r} is not a number; unset it or give a number") from None


def _env_bool(name: str, default: bool) -> bool:
    raw = (os.environ.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError(f"{name}={raw!r} is not a boolean; use 1/true or 0/false")


@dataclass(frozen=True)
class Settings:
    """Where the store lives and how hard it may work.

    Attributes
    ----------
    store:
        Folder holding ``catalog.db`` (SQLite), ``features/``, ``models/`` and
        ``artifacts/``. ``FS_STORE``; default ``./.fs``.
    database_url:
        SQLAlchemy URL of the catalog when it is not the store's SQLite file
        (e.g. PostgreSQL). ``FS_DATABASE_URL``.
    lock_timeout:
        Seconds a writer waits for another writer before failing with
        "store is busy". ``FS_LOCK_TIMEOUT``; default 5.
    workers:
        Decode threads. ``FS_WORKERS``; default: number of CPUs.
    max_image_pixels:
        Images with more pixels are refused as decompression bombs.
        ``FS_MAX_IMAGE_PIXELS``; default Pillow's limit (89,478,485).
    search_memory_mb:
        Memory budget of an in-memory search index; larger feature sets are
        streamed shard by shard. ``FS_SEARCH_MEMORY_MB``; default 1024.
    api_token:
        Bearer token of the HTTP service (`fs serve`); when set, every request
        but the health check must carry it. ``FS_API_TOKEN``; default none.
    max_upload_mb:
        Largest image upload the HTTP service accepts, in MiB.
        ``FS_MAX_UPLOAD_MB``; default 20.
    allow_writes:
        Whether the HTTP service accepts requests that write to the store
        (also needs ``api_token``). ``FS_ALLOW_WRITES`` (1/true); set by
        `fs serve --allow-writes`; default false.
    """

    store: Path = field(default_factory=lambda: Path(".fs"))
    database_url: str | None = None
    lock_timeout: float = 5.0
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    max_image_pixels: int = 89_478_485
    search_memory_mb: int = 1024
    api_token: str | None = field(default=None, repr=False)  # a secret: kept out of repr()
    max_upload_mb: int = 20
    allow_writes: bool = False

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Build settings from ``FS_*`` variables, then apply non-None overrides."""
        base = cls(
            store=Path(os.environ.get("FS_STORE") or ".fs"),
            database_url=os.environ.get("FS_DATABASE_URL") or None,
            lock_timeout=_env_float("FS_LOCK_TIMEOUT", 5.0),
            workers=max(1, _env_int("FS_WORKERS", os.cpu_count() or 2)),
            max_image_pixels=_env_int("FS_MAX_IMAGE_PIXELS", 89_478_485),
            search_memory_mb=_env_int("FS_SEARCH_MEMORY_MB", 1024),
            api_token=os.environ.get("FS_API_TOKEN") or None,
            max_upload_mb=_env_int("FS_MAX_UPLOAD_MB", 20),
            allow_writes=_env_bool("FS_ALLOW_WRITES", False),
        )
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "store" in clean:
            clean["store"] = Path(clean["store"])
        return replace(base, **clean)

    @property
    def catalog_url(self) -> str:
        """The catalog's SQLAlchemy URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.store / 'catalog.db').resolve()}"
