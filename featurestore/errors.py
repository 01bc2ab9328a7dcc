"""Errors a person can act on.

Every error the library raises on purpose derives from :class:`FeatureStoreError`.
Subclasses build their message from the facts and also inherit the matching
builtin so callers that only know Python's exceptions still catch them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class FeatureStoreError(Exception):
    """Base class: the CLI prints ``Error: <message>`` and exits 1.

    The message states facts: what happened, to which file, set, image or value.
    What to run next belongs to the front end: ``remedy`` names that step (a key
    that ``featurestore.cli.hints`` words as an `fs` command line), and the facts
    it needs are attributes of the error (``facts`` lists them). A message that
    names parameters of the call (``folds``, ``test_dataset``) gives them as
    ``params`` and writes each as a ``{field}`` of the message: it reads with
    the Python names, and a front end puts its own spelling (see :meth:`worded`).

    Parameters
    ----------
    *args
        The message (as for any exception); a ``str.format`` template when ``params`` is given.
    remedy
        The next step, as a key of the CLI's hints; empty when there is none to suggest.
    params
        Names of the parameters the message names; other template fields come from ``facts``.
    **facts
        Values the message or the remedy names (a feature set, a file, a run id...), kept as attributes.

    Examples
    --------
    >>> str(FeatureStoreError("{folds} and {test_dataset} exclude each other", params=("folds", "test_dataset")))
    'folds and test_dataset exclude each other'
    >>> str(InvalidParameterError("{trees} must be at least 1, got {value}", "trees", value=0))
    'trees must be at least 1, got 0'
    """

    remedy: str = ""
    template: str = ""
    params: tuple[str, ...] = ()

    def __init__(self, *args: object, remedy: str = "", params: Iterable[str] = (), **facts: Any) -> None:
        self.facts: dict[str, Any] = {**getattr(self, "facts", {}), **facts}
        if params:
            self.template, self.params = str(args[0]), tuple(params)
            args = (self.worded(str), *args[1:])
        super().__init__(*args)
        if remedy:
            self.remedy = remedy
        for key, value in facts.items():
            setattr(self, key, value)

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with each parameter it names spelled by ``name`` (the CLI: its ``--flag``)."""
        if not self.params:
            return str(self)
        try:
            return self.template.format_map({**self.facts, **{p: name(p) for p in self.params}})
        except (KeyError, IndexError, ValueError):  # a value with braces already in the text: leave it as it is
            return self.template


class NotFoundError(FeatureStoreError, LookupError):
    """Something named by the user does not exist (feature set, run, model...)."""

    def __init__(self, what: str, name: str, available: Iterable[str] = (), hint: str = "", *, remedy: str = ""):
        avail = sorted(available)
        msg = f"unknown {what} {name!r}"
        if avail:
            msg += f"; available: {', '.join(avail)}"
        elif what:
            msg += f"; no {what}s exist yet"
        if hint:
            msg += f". {hint}"
        super().__init__(msg, remedy=remedy, what=what)
        self.name = name
        self.available = avail


class InvalidInputError(FeatureStoreError, ValueError):
    """A value or file given by the user cannot be used."""


class InvalidParameterError(InvalidInputError):
    """An argument out of range, or two that exclude each other, named as the Python API names them.

    ``InvalidParameterError(template, *params, **facts)`` is
    ``InvalidInputError(template, params=params, **facts)``: the message names
    each parameter as a ``{field}`` (see :class:`FeatureStoreError`).
    """

    def __init__(self, template: str, *params: str, remedy: str = "", **facts: Any) -> None:
        super().__init__(template, remedy=remedy, params=params, **facts)


class DimensionMismatchError(FeatureStoreError, ValueError):
    """Vectors or parameters do not have the shape the feature set records."""


class ParamsMismatchError(FeatureStoreError, ValueError):
    """A feature set exists under this name with different parameters."""

    def __init__(self, name: str, stored: dict, requested: dict):
        diff = sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))
        shown = ", ".join(f"{k}: stored {stored.get(k)!r} vs requested {requested.get(k)!r}" for k in diff)
        super().__init__(f"feature set {name!r} already exists with different parameters ({shown})",
                         remedy="replace-set", name=name, stored=stored, requested=requested)


class MissingFeaturesError(FeatureStoreError, LookupError):
    """Some selected images have no vector in a requested feature set.

    ``stored`` is the feature set's catalog row (its kind and params say how to
    compute the missing vectors); ``command`` is the older way callers said it.
    """

    def __init__(self, feature_set: str, missing: int, command: str = "", *, stored: Any = None):
        super().__init__(f"{missing} image(s) lack {feature_set}", remedy="extract-missing",
                         feature_set=feature_set, command=command, stored=stored)
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
        super().__init__(f"the catalog {path} is not a readable SQLite database ({reason})",
                         remedy="catalog-corrupt", path=path, reason=reason)


class UnsupportedMediaError(InvalidInputError):
    """Bytes that are not an image, or an image in a format the store cannot keep (HTTP 415)."""


class PayloadTooLargeError(InvalidInputError):
    """An upload over the size limit, or an image over the pixel limit (HTTP 413)."""


class ImageNotFoundError(NotFoundError, InvalidInputError):
    """No image has this id (also an :class:`InvalidInputError`: the id was given by the user).

    ``absent`` counts the ids of the same request that do not exist either (when more than one was given).
    """

    def __init__(self, image_id: int, absent: int = 0, *, remedy: str = ""):
        msg = f"no image with id {image_id} in the catalog"
        if absent:
            msg += f"; {absent} of the ids given do not exist"
        FeatureStoreError.__init__(self, msg, remedy=remedy, image_id=image_id, absent=absent)
        self.name = str(image_id)
        self.available = []


class NoVectorError(MissingFeaturesError, InvalidInputError):
    """One image has no vector in a feature set (HTTP 409: its vectors are still to be extracted).

    ``stored`` is the feature set's catalog row, as for :class:`MissingFeaturesError`.
    """

    def __init__(self, image_id: int, feature_set: str, command: str = "", *, stored: Any = None,
                 remedy: str = "extract-first"):
        FeatureStoreError.__init__(self, f"image {image_id} has no vector in {feature_set}", remedy=remedy,
                                   image_id=image_id, feature_set=feature_set, command=command, stored=stored)
        self.missing = 1


class RuntimeUnavailableError(FeatureStoreError, RuntimeError):
    """A model cannot run on the requested runtime (e.g. its graph could not be exported to ONNX)."""


class ClusterError(FeatureStoreError, RuntimeError):
    """A cluster (Ray) job cannot start or run: Ray missing, a node without the store, SQLite on several nodes."""
