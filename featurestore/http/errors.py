"""HTTP status of each library error (one mapping, used by the JSON API and the web pages)."""

from __future__ import annotations

from featurestore.errors import (
    DimensionMismatchError,
    FeatureStoreError,
    IntegrityError,
    InvalidInputError,
    MissingFeaturesError,
    NotFoundError,
    StoreBusyError,
)


def status_for(exc: FeatureStoreError) -> int:
    """The HTTP status of a library error."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, InvalidInputError | DimensionMismatchError):
        return 422
    if isinstance(exc, MissingFeaturesError):
        return 409
    if isinstance(exc, IntegrityError):
        return 500
    if isinstance(exc, StoreBusyError):
        return 503
    return 400
