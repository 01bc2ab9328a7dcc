"""Settings: the only reader of ``FS_*`` environment variables (pydantic-settings).

Precedence is option > environment > default: the CLI passes explicit options
as keyword arguments, everything else falls back to ``FS_<FIELD>`` in the
environment, then to the defaults below. Nothing in featurestore writes into
the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from featurestore.errors import InvalidInputError

CnnRuntime = Literal["onnxruntime", "mxnet"]
CNN_RUNTIMES: tuple[str, ...] = get_args(CnnRuntime)


def check_cnn_runtime(value: str) -> str:
    """``value`` if it names a CNN runtime, else an error listing them."""
    if value not in CNN_RUNTIMES:
        raise InvalidInputError(f"unknown CNN runtime {value!r}; use {' or '.join(CNN_RUNTIMES)}")
    return value


class Settings(BaseSettings):
    """Where the store lives and how hard it may work.

    Attributes
    ----------
    store:
        Folder holding ``catalog.db`` (SQLite), ``features/``, ``models/`` and
        ``artifacts/``, or ``s3://bucket/prefix`` for a store in a bucket (which
        needs ``database_url``: PostgreSQL). ``FS_STORE``; default ``./.fs``.
    database_url:
        SQLAlchemy URL of the catalog when it is not the store's SQLite file
        (e.g. PostgreSQL). ``FS_DATABASE_URL``.
    lock_timeout:
        Seconds a writer waits for another writer before failing with
        "store is busy". ``FS_LOCK_TIMEOUT``; default 5.
    workers:
        Decode threads, and the intra-op threads of an onnxruntime session
        (`fs serve --workers N` gives each process a share). ``FS_WORKERS``;
        default: number of CPUs.
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
        (also needs ``api_token``). ``FS_ALLOW_WRITES`` (1/true); default false.
    host, port:
        Where `fs serve` listens. ``FS_HOST`` (default 127.0.0.1) and
        ``FS_PORT`` (default 8000).
    sql_timeout:
        Seconds a user query (`fs sql`, ``--where``) may run before it is
        stopped. ``FS_SQL_TIMEOUT``; default 30.
    readonly_database_url:
        PostgreSQL URL used for user queries instead of ``database_url``,
        e.g. logging in as a role made by `fs db create-readonly-role NAME
        --login`. ``FS_READONLY_DATABASE_URL``; default none.
    readonly_role:
        PostgreSQL role user queries switch to (``SET ROLE``), e.g. one made
        by `fs db create-readonly-role NAME`. ``FS_READONLY_ROLE``.
    max_file_mb:
        Image files larger than this many MiB are refused unread (ingest,
        extract, search by file). ``FS_MAX_FILE_MB``; default 200.
    cnn_runtime:
        What runs CNN models: ``onnxruntime`` (the model's ONNX export) or
        ``mxnet`` (the checkpoint itself; the reference). Used by extraction,
        search by image, predict and serve. ``FS_CNN_RUNTIME``; default onnxruntime.
    ray_address:
        Run `fs extract`, `fs evaluate` and `fs train` on a Ray cluster:
        ``auto`` joins the cluster running on this machine (``ray start``),
        ``local`` starts a private one on this machine, anything else is the
        address of the head (``HOST:6379``). ``FS_RAY_ADDRESS``; default none
        (run locally).
    allowed_hosts:
        Comma-separated ``Host`` header names a token-less `fs serve` accepts
        besides ``localhost``, ``127.0.0.1`` and ``[::1]`` (any other is a 400,
        so a web page cannot reach the service through DNS rebinding).
        ``FS_ALLOWED_HOSTS`` or `fs serve --allowed-host`; default none.
    s3_endpoint:
        URL of an S3-compatible server (MinIO, SeaweedFS, Ceph...) for
        ``s3://`` paths; none means AWS itself. ``FS_S3_ENDPOINT``.
    aws_access_key_id, aws_secret_access_key, aws_region:
        Credentials and region of ``s3://`` paths, under their standard names
        ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``
        (region default ``us-east-1``). Without a key, requests are unsigned
        (anonymous).
    s3_timeout:
        Seconds an object-storage request may take before it fails (a connect
        gets at most a fifth of it). ``FS_S3_TIMEOUT``; default 30.
    cache_dir:
        Local folder of a bucket store's read cache (verified copies of its
        shards) and working files. ``FS_CACHE_DIR``; default
        ``~/.cache/featurestore``.
    cache_bytes:
        Size cap of the read cache in bytes; least recently used copies are
        evicted beyond it. ``FS_CACHE_BYTES``; default 8 GiB.
    orphan_grace:
        Seconds an unregistered object in a bucket store must be old before
        the orphan sweep deletes it (a writer on another machine may be about
        to register it). ``FS_ORPHAN_GRACE``; default 3600.
    """

    model_config = SettingsConfigDict(env_prefix="FS_", frozen=True, extra="ignore")

    store: Path = Path(".fs")
    database_url: str | None = None
    lock_timeout: float = 5.0
    workers: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1)
    max_image_pixels: int = Field(default=89_478_485, ge=1)
    search_memory_mb: int = Field(default=1024, ge=0)
    api_token: str | None = Field(default=None, repr=False)  # a secret: kept out of repr()
    max_upload_mb: int = Field(default=20, ge=0)
    allow_writes: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # issue 11: user SQL, file size cap
    sql_timeout: float = Field(default=30.0, gt=0, le=2_147_483, allow_inf_nan=False)  # PostgreSQL: int ms
    readonly_database_url: str | None = Field(default=None, repr=False)  # may hold a password
    readonly_role: str | None = None
    max_file_mb: float = Field(default=200.0, gt=0)
    # issue 12: what runs CNN models
    cnn_runtime: CnnRuntime = "onnxruntime"
    ray_address: str | None = None
    # issue 32: Host names a token-less server answers besides loopback (DNS rebinding)
    allowed_hosts: str | None = None
    # issue 26: object storage (s3:// paths); the AWS_* fields keep the standard names, not FS_*
    s3_endpoint: str | None = None
    aws_access_key_id: str | None = Field(default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID"),
                                          repr=False)
    aws_secret_access_key: str | None = Field(default=None, repr=False,
                                              validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"))
    aws_region: str = Field(default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    s3_timeout: float = Field(default=30.0, gt=0)
    cache_dir: Path | None = None
    cache_bytes: int = Field(default=8 << 30, ge=0)
    orphan_grace: float = Field(default=3600.0, ge=0)

    def __init__(self, **values: Any):
        # An empty variable means "unset", as for most command-line tools.
        for key in list(os.environ):
            if key.startswith("FS_") and os.environ[key] == "" and key[3:].lower() not in values:
                values[key[3:].lower()] = None
        clean = {k: v for k, v in values.items() if v is not None}
        try:
            super().__init__(**clean)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first.get("loc") else "setting"
            given = first.get("input")
            raise InvalidInputError(
                f"FS_{field.upper()}={given!r} is invalid ({first['msg'].lower()}); unset it or give a valid value"
            ) from None
        self._refuse_bucket_store()

    def _refuse_bucket_store(self) -> None:
        url = self.store_url
        if url is None:
            return
        if not url[len("s3://"):].split("/")[0]:
            raise InvalidInputError(f"FS_STORE={url} names no bucket; set FS_STORE=s3://BUCKET/PREFIX")
        if not self.database_url or self.database_url.startswith("sqlite"):
            raise InvalidInputError(
                f"FS_STORE={url}: a store in a bucket needs a PostgreSQL catalog that every machine reaches; "
                "set FS_DATABASE_URL=postgresql+psycopg2://USER@HOST/DB"
            )

    @property
    def store_url(self) -> str | None:
        """``s3://bucket/prefix`` when the store is in a bucket, else None (a folder)."""
        # Path() folds "s3://b/p" to "s3:/b/p": without this the store would be a local folder named "s3:".
        text = str(self.store)
        if not text.startswith("s3:"):
            return None
        return "s3://" + text[3:].lstrip("/")

    @property
    def cache_folder(self) -> Path:
        """``cache_dir``, or ``~/.cache/featurestore`` (``$XDG_CACHE_HOME`` respected)."""
        if self.cache_dir is not None:
            return self.cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "featurestore"

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from ``FS_*`` variables with the non-None ``overrides`` applied on top."""
        return cls(**overrides)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (None values are ignored)."""
        return self.model_copy(update={k: v for k, v in changes.items() if v is not None})

    @property
    def max_file_bytes(self) -> int:
        """``max_file_mb`` in bytes."""
        return int(self.max_file_mb * 1024 * 1024)

    @property
    def catalog_url(self) -> str:
        """The catalog's SQLAlchemy URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.store / 'catalog.db').resolve()}"
