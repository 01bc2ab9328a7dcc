"""Errors a person can act on.

Every error the library raises on purpose derives from :class:`FeatureStoreError`.
Subclasses build their message from the facts and also inherit the matching
builtin so callers that only know Python's exceptions still catch them.
"""

from __future__ import annotations

from collections.abc import Iterable


class FeatureStoreError(Exception):
    """Base class: the CLI prints ``Error: <message>`` and exits 1."""


class NotFoundError(FeatureStoreError, LookupError):
    """Something named by the user does not exist (feature set, run, model...)."""

    def __init__(self, what: str, name: str, available: Iterable[str] = (), hint: str = ""):
        avail = sorted(available)
        msg = f"unknown {what} {name!r}"
        if avail:
            msg += f"; available: {', '.join(avail)}"
        elif what:
            msg += f"; no {what}s exist yet"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.name = name
        self.available = avail


class InvalidInputError(FeatureStoreError, ValueError):
    """A value or file given by the user cannot be used."""


class DimensionMismatchError(FeatureStoreError, ValueError):
    """Vectors or parameters do not have the shape the feature set records."""


class ParamsMismatchError(FeatureStoreError, ValueError):
    """A feature set exists under this name with different parameters."""

    def __init__(self, name: str, stored: dict, requested: dict):
        diff = sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))
        shown = ", ".join(f"{k}: stored {stored.get(k)!r} vs requested {requested.get(k)!r}" for k in diff)
        super().__init__(
            f"feature set {name!r} already exists with different parameters ({shown}); "
            "choose a new name or pass --replace to drop and recompute it"
        )


class MissingFeaturesError(FeatureStoreError, LookupError):
    """Some selected images have no vector in a requested feature set."""

    def __init__(self, feature_set: str, missing: int, command: str):
        super().__init__(
            f"{missing} image(s) lack {feature_set}: run `{command}` (or pass --skip-missing)"
        )
        self.missing = missing


class StoreBusyError(FeatureStoreError, RuntimeError):
    """Another process holds the store's write lock."""

    def __init__(self, pid: int | None, path: str):
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"store is busy ({who} holds {path}); wait for it to finish and retry")


class SchemaOutdatedError(FeatureStoreError, RuntimeError):
    """The catalog schema is older than this version of featurestore."""


class IntegrityError(FeatureStoreError, RuntimeError):
    """A stored file does not match the checksum recorded in the catalog."""


class ModelFilesMissingError(FeatureStoreError, FileNotFoundError):
    """A model's checkpoint files are not available."""


class CatalogCorruptError(FeatureStoreError, RuntimeError):
    """The catalog's SQLite file is not a database (overwritten, truncated or another file)."""

    def __init__(self, path: object, reason: str):
        super().__init__(
            f"the catalog {path} is not a readable SQLite database ({reason}); move it aside "
            f"(mv {path} {path}.bad) and restore it from a backup, or point --store/FS_STORE at another store"
        )
        self.path = path


class UnsupportedMediaError(InvalidInputError):
    """Bytes that are not an image, or an image in a format the store cannot keep (HTTP 415)."""


class PayloadTooLargeError(InvalidInputError):
    """An upload over the size limit, or an image over the pixel limit (HTTP 413)."""


class ImageNotFoundError(NotFoundError, InvalidInputError):
    """No image has this id (also an :class:`InvalidInputError`: the id was given by the user)."""

    def __init__(self, image_id: int, hint: str = ""):
        FeatureStoreError.__init__(self, f"no image with id {image_id} in the catalog" + (f"; {hint}" if hint else ""))
        self.name = str(image_id)
        self.available = []


class NoVectorError(MissingFeaturesError, InvalidInputError):
    """One image has no vector in a feature set (HTTP 409: run `fs extract` first)."""

    def __init__(self, image_id: int, feature_set: str, command: str, hint: str = ""):
        msg = f"image {image_id} has no vector in {feature_set}: run `{command}` first"
        FeatureStoreError.__init__(self, msg + (f", {hint}" if hint else ""))
        self.missing = 1


class RuntimeUnavailableError(FeatureStoreError, RuntimeError):
    """A model cannot run on the requested runtime (e.g. its graph could not be exported to ONNX)."""


class ClusterError(FeatureStoreError, RuntimeError):
    """A cluster (Ray) job cannot start or run: Ray missing, a node without the store, SQLite on several nodes."""
