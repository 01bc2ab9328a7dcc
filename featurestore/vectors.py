"""Reading a feature set's live vectors, and what the layers below the store may ask of it.

A feature set's vectors live in HDF5 shards (:mod:`featurestore.shards`); the
catalog says which rows of each shard are live (a row can be taken over by a
newer shard). This module is the one place that joins the two: the store, the
exact search and the ANN index all read live rows through :func:`live_part`
and :func:`read_part`, and subsets of images through :func:`read_images`.

It also defines the narrow interfaces the store satisfies for the layers below
it, so that search and features never import :mod:`featurestore.store`, not even
for type hints:

* :class:`StoredSet` / :class:`RegisteredSet` -- a stored feature set's catalog
  facts without / with its catalog id (a catalog row, a snapshot or the store's handle);
* :class:`StoreView` -- the store's folder, settings, catalog and its few
  reads the feature extractors need (``feature_set``, ``select_images``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from featurestore.catalog.repository import Catalog, ImageRow, LiveShard
from featurestore.errors import DimensionMismatchError, IntegrityError
from featurestore.shards import (
    ShardSource,
    place,
    read_rows_into,
    read_selected,
    read_shard,
    read_shard_ids,
    read_shard_placed,
    read_span_rows,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from featurestore.config import Settings


@dataclass(frozen=True)
class FeatureMatrix:
    """Feature sets assembled into one aligned matrix (rows = images, in id order)."""

    image_ids: np.ndarray
    X: np.ndarray
    blocks: dict[str, tuple[int, int]]
    labels: np.ndarray
    superclasses: np.ndarray
    paths: list[str] = field(default_factory=list)


class StoredSet(Protocol):
    """What rebuilding a stored feature set's extractor needs: a catalog row, a snapshot, the store's handle."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def params(self) -> dict[str, Any]: ...


class RegisteredSet(StoredSet, Protocol):
    """A feature set registered in the catalog: its facts plus its catalog ``id``."""

    @property
    def id(self) -> int: ...


class StoreView(Protocol):
    """What the feature extractors (and :class:`featurestore.search` on top) ask of a store.

    :class:`featurestore.store.Store` satisfies it; the layers below the store
    name this type instead of the store's.
    """

    @property
    def settings(self) -> Settings: ...
    @property
    def root(self) -> Path: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def catalog(self) -> Catalog: ...

    def feature_set(self, name: str) -> RegisteredSet: ...

    def shard_source(self, rel: str, sha256: str | None) -> ShardSource: ...

    # files under the store's root: for a bucket store these put, fetch and delete its objects too
    def publish(self, path: Path) -> None: ...

    def local_file(self, rel: str, sha256: str | None = None) -> Path: ...

    def delete_file(self, rel: str) -> None: ...

    def present(self, rels: Sequence[str]) -> set[str]: ...

    def select_images(self, dataset: str | None = None, labelled_only: bool = False,
                      image_ids: Sequence[int] | None = None) -> list[ImageRow]: ...


@dataclass(frozen=True)
class ShardPart:
    """The live rows of one shard: all ``live`` rows when ``rows`` is None, else these (with their ids)."""

    path: Path
    live: int
    ids: np.ndarray | None
    rows: np.ndarray | None
    sha256: str | None = None  # of the file's bytes, as the catalog recorded them


def live_part(root: Path, catalog: Catalog, shard: LiveShard) -> ShardPart:
    """Where the live rows of ``shard`` are; the catalog's row list is fetched only for a partly live shard.

    When the catalog points at every row of a shard (the normal case) the
    shard's own ``image_ids`` are used, which is much faster than fetching one
    catalog row per vector.
    """
    if shard.live == shard.rows:
        return ShardPart(root / shard.path, shard.live, None, None, shard.sha256)
    pairs = catalog.live_rows_of_shard(shard.id)
    ids, rows = pairs[:, 0].copy(), pairs[:, 1].copy()
    return ShardPart(root / shard.path, len(ids), ids, rows, shard.sha256)


def live_parts(root: Path, catalog: Catalog, feature_set_id: int) -> list[ShardPart]:
    """The live rows of each shard of a feature set that has any, in shard order."""
    return [live_part(root, catalog, sh) for sh in catalog.live_shards(feature_set_id) if sh.live]


def read_part(part: ShardPart, source: ShardSource | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The live ``(image_ids, vectors)`` of one shard (float32).

    ``source``: what to open instead of ``part.path`` (a bucket store's cached copy or bytes).
    """
    src = part.path if source is None else source
    if part.rows is None:
        return read_shard(src, part.sha256)
    assert part.ids is not None
    _, vecs = read_selected(src, part.rows, part.sha256)
    return part.ids, np.asarray(vecs, dtype=np.float32)


def part_ids(part: ShardPart, source: ShardSource | None = None) -> np.ndarray:
    """The live image ids of one shard, without reading its vectors."""
    return part.ids if part.ids is not None else read_shard_ids(part.path if source is None else source, part.sha256)


def place_part(ids: np.ndarray, part: ShardPart, out: np.ndarray, cols: slice, present: np.ndarray,
               source: ShardSource | None = None) -> None:
    """Copy the live rows of one shard whose image is among ``ids`` (ascending) into ``out[:, cols]``.

    Row ``i`` of ``out`` is image ``ids[i]``; ``present[i]`` is set for every row placed.
    """
    if part.rows is None:  # a whole shard: read in place when its images are a run of ``ids``
        def start_of(shard_ids: np.ndarray) -> int | None:
            n = len(shard_ids)
            p0 = int(np.searchsorted(ids, shard_ids[0])) if n else 0
            return p0 if n and p0 + n <= len(ids) and np.array_equal(ids[p0 : p0 + n], shard_ids) else None

        shard_ids, placed = read_shard_placed(part.path if source is None else source, part.sha256, out, cols,
                                              start_of)
        if placed is None:
            p0 = int(np.searchsorted(ids, shard_ids[0]))
            present[p0 : p0 + len(shard_ids)] = True
            return
        block = np.asarray(placed, dtype=np.float32)
    else:
        shard_ids, block = read_part(part, source)
    if block.shape[1] != cols.stop - cols.start:
        raise DimensionMismatchError(
            f"feature shard {part.path} has dim {block.shape[1]}, catalog says {cols.stop - cols.start}"
        )
    if not len(ids):
        return
    rows = np.arange(len(shard_ids))
    pos = np.minimum(np.searchsorted(ids, shard_ids), len(ids) - 1)
    hit = ids[pos] == shard_ids
    if not hit.all():
        pos, rows = pos[hit], rows[hit]
    present[pos] = True
    place(out, block, pos, rows, cols)


def read_parts_into(parts: Sequence[ShardPart], dim: int, source: Callable[[int], ShardSource] | None = None,
                    done: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every live row of ``parts`` in one preallocated matrix, in part order (whole shards without a copy).

    ``source(i)``: what to open for ``parts[i]`` instead of its path (a bucket store's fetched copy);
    ``done(i)`` is called once it has been read.
    """
    n = sum(part.live for part in parts)
    ids = np.empty(n, dtype=np.int64)
    mat = np.empty((n, dim), dtype=np.float32)
    pos = 0
    for k, part in enumerate(parts):
        try:
            read_rows_into(part.path if source is None else source(k), part.rows, ids, mat, pos, part.sha256)
        finally:
            if done is not None:
                done(k)
        pos += part.live
    return ids, mat


# read_images reads each shard in slices of at most this many bytes of vectors (HDF5 reads whole chunks anyway)
_WINDOW_BYTES = 8 * 2**20


def read_images(root: Path, catalog: Catalog, fs: RegisteredSet, image_ids: Sequence[int] | np.ndarray,
                open_shard: Callable[[str, str | None], ShardSource] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image ids, vectors)`` of just these images (those with a vector), grouped by shard.

    Only their rows are read (in bounded windows of each shard), so memory and
    disk reads follow the images asked for, not the size of the set. A shard
    replaced by ``fs compact`` between locating and reading makes it locate again once.
    """
    window = max(64, _WINDOW_BYTES // (4 * max(1, int(fs.dim))))
    for attempt in range(2):
        loc = catalog.locate(fs.id, image_ids)
        shards = {s.id: s for s in catalog.live_shards(fs.id, count=[])}
        try:
            got_ids, blocks = [], []
            bounds = np.flatnonzero(np.r_[True, loc[1:, 1] != loc[:-1, 1], True]) if len(loc) else [0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                shard, rows = shards[int(loc[a, 1])], loc[a:b, 2]
                src = root / shard.path if open_shard is None else open_shard(shard.path, shard.sha256)
                if len(rows) <= 32:  # one point selection touches only their chunks
                    vecs = read_selected(src, rows, shard.sha256)[1]
                else:
                    vecs = read_span_rows(src, rows, window, shard.sha256)
                blocks.append(np.asarray(vecs, dtype=np.float32))
                got_ids.append(loc[a:b, 0])
            break
        except (IntegrityError, KeyError):
            if attempt:  # `fs compact` replaced a shard between locating and reading: locate again once
                raise
    mat = np.concatenate(blocks) if blocks else np.empty((0, int(fs.dim)), dtype=np.float32)
    return (np.concatenate(got_ids) if got_ids else np.empty(0, np.int64)), mat
