"""The feature registry: feature kind -> extractor class, and rebuilding an extractor from its catalog row.

Every stored feature set records its ``kind`` and the ``params`` needed to
reproduce its vectors. :func:`extractor_for` is the one way to rebuild the
extractor of a stored set (extract continues it, search embeds a new image
with it, predict and the HTTP service featurize uploads with it); it checks
that the rebuilt extractor records exactly the stored params, so a changed
library or model cannot silently produce other vectors.

A new feature kind is one module with an :class:`~featurestore.features.base.Extractor`
subclass plus one :class:`FeatureKind` registered by a plugin's ``register_feature_kinds``
hook (the built-ins: :mod:`featurestore.plugins.feature_kinds`). A kind whose one extractor
produces several sets in one pass (the taps of a CNN) also gives ``build_many``,
so :func:`extractor_for_sets` rebuilds them as one extractor (the cluster path's
workers use it: one forward pass per image, as on the local path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from featurestore.errors import FeatureStoreError, InvalidInputError, NotFoundError
from featurestore.features.base import Extractor
from featurestore.io.params import canonical
from featurestore.vectors import StoredSet, StoreView

Builder = Callable[[StoreView, str, dict[str, Any], int], Extractor]
Hint = Callable[[str, dict[str, Any], int], str]
ManyBuilder = Callable[[StoreView, Sequence[StoredSet], int], Extractor]
Creator = Callable[[StoreView, dict[str, Any]], Extractor]


@dataclass(frozen=True)
class FeatureKind:
    """One feature family: how to rebuild its extractor and which command computes it.

    Registered by the hook ``register_feature_kinds`` (:mod:`featurestore.plugins.hookspecs`).
    ``build(store, name, params, batch_size)`` rebuilds the extractor of a stored
    set from its params; ``command(name, params, dim)`` is the command that
    computes it (for messages); ``build_many`` (optional) rebuilds one extractor
    producing several stored sets of this kind at once; ``create(store, options)``
    (optional) makes a new extractor from request options (strings from
    ``--feature KIND:key=value``, typed values from the built-in options).
    """

    kind: str
    extractor: type[Extractor]
    build: Builder
    command: Hint
    build_many: ManyBuilder | None = None
    create: Creator | None = None
    description: str = ""


def feature_kinds() -> dict[str, FeatureKind]:
    """Every feature kind the built-ins and plugins register (hook ``register_feature_kinds``), by kind."""
    from featurestore import plugins

    kinds: dict[str, FeatureKind] = plugins.named("register_feature_kinds", "kind", "feature kind")
    return kinds


def new_extractor(store: StoreView, kind: str, options: dict[str, Any]) -> Extractor:
    """A new extractor of ``kind`` from request options (``fs extract --feature KIND:key=value,...``).

    Raises
    ------
    NotFoundError
        No built-in or plugin registers ``kind``.
    InvalidInputError
        The kind cannot be computed on request (it has no ``create``), or its options are wrong.
    """
    kinds = feature_kinds()
    found = kinds.get(kind)
    if found is None:
        raise NotFoundError("feature kind", kind, [k for k, v in kinds.items() if v.create is not None],
                            "A plugin adds kinds (installed plugins are listed with their hooks)")
    if found.create is None:
        raise InvalidInputError(f"feature kind {kind!r} cannot be computed from options; it has its own options")
    return found.create(store, dict(options))


def build_extractor(store: StoreView, fs: StoredSet, batch_size: int = 32) -> Extractor:
    """The extractor that produced ``fs``, rebuilt from its kind and params (not yet checked)."""
    kind = feature_kinds().get(fs.kind)
    if kind is None:
        raise InvalidInputError(
            f"feature set {fs.name!r} has kind {fs.kind!r}, which cannot featurize new images; "
            "use images already in the store (e.g. search by {image_id})", params=("image_id",), feature_set=fs.name
        )
    try:
        return kind.build(store, fs.name, dict(fs.params or {}), batch_size)
    except KeyError as exc:
        raise FeatureStoreError(
            f"feature set {fs.name!r} ({fs.kind}) does not record {exc.args[0]!r} in its params, so new "
            "images cannot be embedded like its stored ones", remedy="recompute-it", feature_set=fs.name
        ) from None


def extractor_for(store: StoreView, fs: StoredSet | str, batch_size: int = 32) -> Extractor:
    """An extractor that reproduces a stored feature set exactly (same projection, model, preprocessing).

    The extractor is rebuilt from the set's catalog row and its output params
    compared with the stored ones.

    Raises
    ------
    NotFoundError
        No such feature set.
    FeatureStoreError
        The extractor cannot be rebuilt, or it now records other params.
    """
    if isinstance(fs, str):
        fs = store.feature_set(fs)
    ex = build_extractor(store, fs, batch_size)
    _check_rebuilt(ex, fs)
    return ex


def extractor_for_sets(store: StoreView, sets: Sequence[StoredSet], batch_size: int = 32) -> Extractor:
    """One extractor that reproduces every set of ``sets`` exactly (the sets one extractor produced together).

    Several taps of one CNN are rebuilt as one network with several outputs, so
    each image still goes through it once. Every rebuilt output is checked
    against its stored params as in :func:`extractor_for`.

    Raises
    ------
    FeatureStoreError
        The sets are of different kinds or models, or cannot be rebuilt as stored.
    """
    if len(sets) == 1:
        return extractor_for(store, sets[0], batch_size)
    names = ", ".join(fs.name for fs in sets)
    kind = feature_kinds().get(sets[0].kind)
    if kind is None or kind.build_many is None or any(fs.kind != kind.kind for fs in sets):
        raise FeatureStoreError(f"the feature sets {names} are not produced by one extractor; rebuild them one by one")
    try:
        ex = kind.build_many(store, sets, batch_size)
    except KeyError as exc:
        raise FeatureStoreError(
            f"feature sets {names} ({kind.kind}) do not record {exc.args[0]!r} in their params",
            remedy="recompute-them", feature_sets=[fs.name for fs in sets]
        ) from None
    for fs in sets:
        _check_rebuilt(ex, fs)
    return ex


def _check_rebuilt(ex: Extractor, fs: StoredSet) -> None:
    """Refuse an extractor that does not produce ``fs`` with exactly its stored kind, dim and params."""
    specs = {spec.name: spec for spec in ex.outputs()}
    spec = specs.get(fs.name)
    if spec is None:
        raise FeatureStoreError(
            f"the {fs.kind} extractor rebuilt for {fs.name!r} produces {', '.join(sorted(specs))}, not "
            f"{fs.name!r}", remedy="recompute-the-set", feature_set=fs.name
        )
    stored, rebuilt = canonical(fs.params), canonical(spec.params)
    if stored != rebuilt or spec.dim != fs.dim or spec.kind != fs.kind:
        diff = sorted(k for k in set(stored) | set(rebuilt) if stored.get(k) != rebuilt.get(k))
        if spec.dim != fs.dim:
            diff.append(f"dim (stored {fs.dim} vs now {spec.dim})")
        raise FeatureStoreError(
            f"new images cannot be featurized like the stored vectors of {fs.name!r}: the extractor now "
            f"records different parameters ({', '.join(diff) or 'kind'})", remedy="recompute-set", feature_set=fs.name
        )
