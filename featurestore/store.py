"""The store: a folder with the SQL catalog and the HDF5 feature shards, and the object a user holds.

``featurestore.connect(path)`` returns a :class:`Store`::

    store = featurestore.connect(".fs")
    vectors = store.feature_set("efficientnet-lite0")
    hits = vectors.search("shoe.jpg", k=10, where="label = 'sneaker'")
    fm = store.read_matrix(["rp128", "efficientnet-lite0"], labelled_only=True)

Layout of the folder::

    catalog.db          SQLite catalog (unless FS_DATABASE_URL points elsewhere)
    features/<set>/     HDF5 shards of each feature set
    projections/        random-projection matrices
    models/             CNN checkpoints
    artifacts/          fitted models of training runs
    write.lock          one writer at a time

The store owns the caches that make repeated work cheap in one process (the
HTTP service, a notebook): rebuilt extractors (keyed by the feature set's
params), fitted run models (keyed by the artifact's sha256) and in-memory
search indexes (keyed by the feature set's shard list).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from sqlalchemy.orm import Session

from featurestore import vectors
from featurestore.catalog import feature_versions as versions
from featurestore.catalog.repository import Catalog, ImageRow, SetCoverage, ShardTally, check_name
from featurestore.catalog.schema import FeatureSet as FeatureSetRow
from featurestore.catalog.schema import Run
from featurestore.config import Settings
from featurestore.errors import (
    DimensionMismatchError,
    FeatureStoreError,
    IntegrityError,
    InvalidParameterError,
    MissingFeaturesError,
    ParamsMismatchError,
)
from featurestore.files import StoreFiles, open_engine, work_folder
from featurestore.handles import FeatureSetHandle
from featurestore.io import memory
from featurestore.io.lock import write_lock
from featurestore.io.params import canonical, params_key
from featurestore.io.verified import digest_written
from featurestore.shards import ShardSource, write_shard
from featurestore.vectors import FeatureMatrix, RegisteredSet, ShardPart

if TYPE_CHECKING:

    from featurestore.features.base import Extractor, FeatureSpec
    from featurestore.io.storage import BucketStorage
    from featurestore.search import index as ann_index
    from featurestore.search.cache import SearchCache, SetState
    from featurestore.search.kernel import VectorIndex


class Compacted(NamedTuple):
    """What :meth:`Store.compact` did to one feature set."""

    feature_set: str
    shards_merged: int
    rows: int


class Store:
    """A feature store folder plus its catalog connection and caches."""

    def __init__(self, settings: Settings, engine: Any):
        self.settings = settings
        self.url = settings.store_url  # s3://bucket/prefix/ of a store in a bucket, else None
        # A bucket store works in a local folder (temp files, files being written, copies of small files)
        # and keeps every file that matters in the bucket; the catalog's relative paths are the same.
        self.root = work_folder(settings) if self.url else settings.store
        self.catalog = Catalog(engine)
        self.files = StoreFiles(settings, self.catalog, self.root, self.url)
        self.bucket: BucketStorage | None = self.files.bucket
        self.engine = engine
        self._lock = threading.Lock()
        self._extractors: dict[tuple[Any, ...], tuple[Extractor, threading.Lock]] = {}
        self._models: dict[tuple[int, str], Any] = {}
        self._indexes: OrderedDict[tuple[int, str], tuple[tuple[Any, ...], VectorIndex, int]] = OrderedDict()
        self._search_cache: SearchCache | None = None
        self._ann_indexes: ann_index.OpenedIndexes | None = None

    @property
    def search_cache(self) -> SearchCache:
        """Per-set facts and compiled filters of searches (issue 31; search/cache.py), made on first use."""
        from featurestore.search.cache import SearchCache

        with self._lock:
            if self._search_cache is None:
                self._search_cache = SearchCache()
            return self._search_cache

    @property
    def ann_indexes(self) -> ann_index.OpenedIndexes:
        """The memory-mapped HNSW indexes opened so far (issue 14; search/index.py), made on first use
        so that commands that never search (``fs status``) do not import the search stack."""
        from featurestore.search import index as ann_index

        with self._lock:
            if self._ann_indexes is None:
                self._ann_indexes = ann_index.OpenedIndexes()
            return self._ann_indexes

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings | None = None, *, create: bool = False) -> Store:
        """Open the store described by ``settings`` (``Settings()`` from FS_* by default).

        ``create=True`` (writers) makes the folder and the schema on first use,
        under the write lock so two first writers cannot both migrate; readers
        get a clear error when there is no store yet, and never write
        (:func:`featurestore.files.open_engine`).
        """
        settings = settings or Settings()
        return cls(settings, open_engine(settings, create))

    def close(self) -> None:
        self.clear_caches()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A catalog session in one transaction: committed on success, rolled back on error."""
        with self.catalog.session() as s:
            yield s

    @contextmanager
    def writing(self, sweep: bool = True) -> Iterator[None]:
        """Hold the store's write lock; clean up what a crashed or finished writer left.

        ``sweep=False`` skips the clean-up (it lists every shard): for small,
        frequent writes such as one stored upload; the next sweeping writer does it.
        """
        for sub in ("features", "models", "artifacts"):
            (self.root / sub).mkdir(exist_ok=True)
        if self.url:
            from featurestore.catalog.database import advisory_lock

            lock = advisory_lock(self.engine, self.url, self.settings.lock_timeout)
        else:
            lock = write_lock(self.root, self.settings.lock_timeout)
        with lock:
            if sweep:
                self._remove_orphans()
            yield

    # -- files (featurestore/files.py) ----------------------------------------------------
    def publish(self, path: Path) -> None:
        """Upload a file just written under :attr:`root` to the bucket, before the catalog registers it
        (:meth:`StoreFiles.publish <featurestore.files.StoreFiles.publish>`; no-op for a folder store)."""
        self.files.publish(path)

    def local_file(self, rel: str, sha256: str | None = None) -> Path:
        """A local path holding the store file ``rel``, fetched and checked against ``sha256`` if needed
        (:meth:`StoreFiles.local_file <featurestore.files.StoreFiles.local_file>`)."""
        return self.files.local_file(rel, sha256)

    def delete_file(self, rel: str) -> None:
        """Delete a store file (its local copy and, for a bucket store, its object)."""
        self.files.delete_file(rel)

    def shard_source(self, rel: str, sha256: str | None) -> ShardSource:
        """What the shard readers open for the shard ``rel`` (its file, or a bucket store's verified copy)."""
        return self.files.shard_source(rel, sha256)

    def present(self, rels: Sequence[str]) -> set[str]:
        """Which of the store files ``rels`` exist."""
        return self.files.present(rels)

    def remove_orphan_objects(self, prefixes: Sequence[str], grace: float | None = None) -> list[str]:
        """Delete bucket objects under ``prefixes`` the catalog does not know, older than ``grace`` seconds
        (:meth:`StoreFiles.remove_orphan_objects <featurestore.files.StoreFiles.remove_orphan_objects>`)."""
        return self.files.remove_orphan_objects(prefixes, grace)

    def _remove_orphans(self) -> None:
        """Delete what crashed or finished writers left (files, objects, index files). Under the lock."""
        self.files.sweep()
        from featurestore.search import backends

        backends.remove_orphans(self)  # issue 14: index files of crashed builds and dropped sets

    # -- images ----------------------------------------------------------------------
    def select_images(
        self,
        dataset: str | None = None,
        labelled_only: bool = False,
        image_ids: Sequence[int] | None = None,
    ) -> list[ImageRow]:
        """(id, source_path, label, superclass) of the selected images, by id."""
        return self.catalog.image_rows(dataset, labelled_only, image_ids)

    # -- feature sets ----------------------------------------------------------------
    def feature_sets(self) -> list[FeatureSetHandle]:
        return [FeatureSetHandle(self, row) for row in self.catalog.feature_sets()]

    def feature_set(self, name: str, version: int | None = None) -> FeatureSetHandle:
        """The stored feature set ``name`` (:class:`NotFoundError` lists the existing ones).

        ``version`` picks an older version kept by ``fs extract --replace`` (default: the newest);
        a version that does not exist raises :class:`~featurestore.catalog.feature_versions.VersionNotFoundError`
        listing those that do. An older version's handle has the row name ``<name>@v<N>``.
        """
        return FeatureSetHandle(self, self.catalog.feature_set(self.catalog.resolve_version(name, version)))

    def pin_versions(self, names: Sequence[str], version: int | Mapping[str, int] | None = None) -> dict[str, int]:
        """The version of each set in ``names`` a read would use (``version``: one for all, or per set;
        default the newest), every one checked to exist."""
        return self.catalog.pin_versions(names, version)

    def search_state(self, name: str) -> SetState:
        """What a search of set ``name`` caches (its facts and compiled filters), valid at one catalog version.

        The state is reused without asking the catalog; the search checks the
        catalog's change counter when it is done (see :mod:`featurestore.search.cache`).
        """
        return self.search_cache.state(self.catalog, name, lambda snap: FeatureSetHandle(self, snap),
                                       lambda: self.feature_set(name))

    def ensure_feature_set(self, spec: FeatureSpec, replace: bool = False) -> FeatureSetHandle:
        """Register ``spec`` or check it matches what is stored. Call under :meth:`writing`.

        With ``replace`` an existing set of that name is kept as an older
        version (renamed ``<name>@v<N>``, its files untouched; ``fs gc`` deletes
        old versions) and a new version is registered under the name.
        """
        check_name("feature set", spec.name)
        params = canonical(spec.params)
        with self.session() as s:
            row = self.catalog.find_feature_set(s, spec.name)
            if row is not None and replace:
                versions.retire(s, row)  # the old vectors stay, as version N (`fs versions`, `fs gc`)
                row = None
            if row is not None:
                stored = dict(row.params)
                if stored != params or row.dim != spec.dim or row.kind != spec.kind:
                    if row.dim != spec.dim:
                        stored = {**stored, "dim": row.dim}
                        params = {**params, "dim": spec.dim}
                    raise ParamsMismatchError(spec.name, stored, params)
            else:
                row = self.catalog.add_feature_set(s, spec.name, spec.kind, params, spec.dim, spec.dtype)
                versions.record_new(s, row)
        return FeatureSetHandle(self, row)

    def drop_feature_set(self, name: str) -> None:
        """Delete a feature set: catalog first, then its files. Call under :meth:`writing`."""
        with self.session() as s:
            row = self.catalog.find_feature_set(s, name)
            if row is None:
                self.catalog.feature_set(name)  # raises NotFoundError with the names
                return
            dropped = self.catalog.delete_feature_set(s, row)
        self._discard_files(name, dropped)

    def delete_versions(self, feature_set_ids: Sequence[int]) -> list[str]:
        """Delete the given feature-set rows (old versions) and then their files. Call under :meth:`writing`.

        One catalog transaction unregisters every version, its rows, shards and
        index; the files go after it commits, so the catalog never points at a
        deleted file. A crash in between leaves unregistered files, which the next
        writer's orphan sweep deletes. Returns the shard paths deleted.
        """
        dropped: list[str] = []
        with self.session() as s:
            for fid in feature_set_ids:
                row = s.get(FeatureSetRow, int(fid))
                if row is not None:
                    dropped += self.catalog.delete_feature_set(s, row)
        self._discard_files("", dropped)
        from featurestore.search import index as ann_index

        ann_index.remove_orphans(self)  # the deleted versions' index files
        return dropped

    def _discard_files(self, name: str, paths: list[str]) -> None:
        """Delete a dropped set's shard files, after the commit that unregistered them.

        A crash before this leaves unregistered files, which the next writer's
        orphan sweep removes; the catalog never points at a deleted file.
        """
        for rel in paths:
            self.delete_file(rel)

    def images_lacking(self, feature_set: str, image_ids: Sequence[int] | None = None) -> list[int]:
        """Ids of images (all, or among ``image_ids``) without a vector in ``feature_set``."""
        have = self.catalog.image_ids_with_vector(feature_set)
        ids = image_ids if image_ids is not None else self.catalog.all_image_ids()
        return [int(i) for i in ids if int(i) not in have]

    def append_vectors(self, feature_set: RegisteredSet, image_ids: Sequence[int] | np.ndarray,
                       vectors: np.ndarray | list[np.ndarray], session: Session | None = None,
                       runtime: str | None = None) -> Path:
        """Write one shard and register it with its rows in one transaction. Call under :meth:`writing`.

        With ``session`` the rows join that open transaction (the caller commits;
        if it rolls back, the file is an orphan the next writer removes). ``runtime``
        (what computed the vectors, e.g. ``"onnxruntime"``) is recorded with the shard.
        """
        # a list of 2-D arrays is a list of row blocks (written one after the other, never concatenated)
        is_blocks = isinstance(vectors, list) and bool(vectors) and all(
            isinstance(b, np.ndarray) and b.ndim == 2 for b in vectors)
        blocks = [np.asarray(b, dtype=np.float32) for b in (vectors if is_blocks else [vectors])]
        for vecs in blocks:
            if vecs.ndim != 2 or vecs.shape[1] != feature_set.dim:
                raise DimensionMismatchError(
                    f"vectors for {feature_set.name} have shape {vecs.shape}, expected (n, {feature_set.dim})"
                )
        rows: np.ndarray | list[np.ndarray] = blocks[0] if len(blocks) == 1 else blocks
        return self._write_and_register(feature_set, np.asarray(image_ids, dtype=np.int64), rows, session=session,
                                        runtime=runtime)

    def _write_and_register(self, fs: RegisteredSet, ids: np.ndarray, vecs: np.ndarray | list[np.ndarray],
                            replaces: set[int] | None = None, session: Session | None = None,
                            runtime: str | None = None) -> Path:
        """Write a shard, then register it (taking over the ``replaces`` shards) in one transaction.

        If registration fails the new file is removed; if the process dies first
        the file is an orphan that the next writer removes.
        """
        path = write_shard(self.root / "features" / fs.name, fs.name, fs.kind, fs.params, ids, vecs, runtime)
        rel = path.relative_to(self.root).as_posix()
        try:
            digest = digest_written(path)
            self.publish(path)  # complete in the bucket before the catalog points at it
            self.catalog.register_shard(fs.id, rel, ids, replaces, s=session, runtime=runtime, sha256=digest)
        except BaseException:
            self.files.discard(path)
            raise
        self.files.adopt(path, digest)  # the first read of the shard needs no download
        return path

    def coverage(self) -> list[SetCoverage]:
        """(name, kind, dim, images with a readable vector, shards present) per feature set.

        Rows of a registered shard whose file is missing do not count (the next
        writer unregisters such shards; `fs verify` also checks the bytes).
        """
        refs = self.catalog.shard_refs()
        found = self.present(list(refs.values()))
        gone = [i for i, p in refs.items() if p not in found]
        lost = self.catalog.rows_in_shards(gone) if gone else {}
        none = ShardTally(0, 0)
        return [row._replace(images=row.images - lost.get(row.name, none).rows,
                             shards=row.shards - lost.get(row.name, none).shards) for row in self.catalog.coverage()]

    # -- reading -------------------------------------------------------------------
    def read_matrix(
        self,
        feature_sets: Sequence[str],
        *,
        dataset: str | None = None,
        labelled_only: bool = False,
        image_ids: Sequence[int] | None = None,
        skip_missing: bool = False,
        version: int | Mapping[str, int] | None = None,
    ) -> FeatureMatrix:
        """Assemble ``feature_sets`` into one matrix aligned on image ids.

        ``version`` reads older versions kept by ``fs extract --replace``: one
        number for every set, or ``{set: version}`` (sets not named: the newest).
        ``blocks`` are keyed by the names given, whatever the version.

        Each shard is read once. Images lacking a set raise
        :class:`MissingFeaturesError` naming the ``fs extract`` command, unless
        ``skip_missing`` drops them. A shard replaced by a concurrent ``fs
        compact`` between planning and reading makes the read re-plan once.
        """
        if not feature_sets:
            raise InvalidParameterError("no feature sets given; list them like {feature_sets} rp128,efficientnet-lite0",
                                        "feature_sets")
        return self._replanned(lambda: self._read_matrix(feature_sets, dataset, labelled_only, image_ids,
                                                         skip_missing, version))

    def _replanned(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except IntegrityError:
            # `fs compact` commits the new shard, then deletes the old ones: plan again once.
            return read()

    def _read_matrix(self, feature_sets: Sequence[str], dataset: str | None, labelled_only: bool,
                     image_ids: Sequence[int] | None, skip_missing: bool,
                     version: int | Mapping[str, int] | None = None) -> FeatureMatrix:
        sets = [self.feature_set(n, version.get(n) if isinstance(version, Mapping) else version)
                for n in feature_sets]
        ids = np.array(self.catalog.selected_image_ids(dataset, labelled_only, image_ids), dtype=np.int64)
        X = np.empty((len(ids), sum(fs.dim for fs in sets)), dtype=np.float32)
        present = {fs.id: np.zeros(len(ids), dtype=bool) for fs in sets}
        blocks: dict[str, tuple[int, int]] = {}
        jobs: list[tuple[ShardPart, slice, np.ndarray]] = []
        col = 0
        for fs in sets:
            cols = slice(col, col + fs.dim)
            jobs += [(part, cols, present[fs.id]) for part in self._plan(fs)]
            blocks[versions.public_name(fs.name)] = (col, col + fs.dim)
            col += fs.dim

        # HDF5 reads are serial (h5py holds a global lock) but numpy copies release the GIL:
        # two workers each read a shard and place it, so one copies while the other reads.
        # The images' paths and labels are fetched by a third thread, and the matrix's fresh
        # pages faulted in by a fourth (io.memory), meanwhile. Each worker
        # waits for its shard itself (a bucket store's is still downloading), so a shard is
        # decoded as soon as its copy is verified.
        with self.files.fetching([job[0] for job in jobs]) as source, ThreadPoolExecutor(max_workers=4) as pool:
            pool.submit(memory.populate, X)  # the matrix's pages faulted in meanwhile, not under HDF5's lock
            meta = pool.submit(self.select_images, dataset, labelled_only, image_ids)

            def place(k: int, part: ShardPart, cols: slice, seen: np.ndarray) -> None:
                try:
                    vectors.place_part(ids, part, X, cols, seen, source(k))
                finally:
                    source.done(k)

            for future in [pool.submit(place, k, *job) for k, job in enumerate(jobs)]:
                future.result()
            images = meta.result()
        if len(images) != len(ids):  # an ingest committed in between: keep the rows we placed
            by_id = {r.id: r for r in images}
            images = [by_id.get(int(i), ImageRow(int(i), "", None, None)) for i in ids]
        keep = np.ones(len(ids), dtype=bool)
        for fs in sets:
            if not present[fs.id].all() and not skip_missing:
                raise MissingFeaturesError(fs.name, int((~present[fs.id]).sum()), stored=fs)
            keep &= present[fs.id]
        if not keep.all():
            X = X[keep]
        kept = [r for r, k in zip(images, keep, strict=True) if k]
        return FeatureMatrix(
            image_ids=ids[keep], X=X, blocks=blocks,
            labels=np.array([r.label for r in kept], dtype=object),
            superclasses=np.array([r.superclass for r in kept], dtype=object),
            paths=[r.source_path for r in kept],
        )

    def _plan(self, fs: RegisteredSet) -> list[ShardPart]:
        """The live rows of each shard of a feature set, in shard order (:func:`featurestore.vectors.live_parts`)."""
        return vectors.live_parts(self.root, self.catalog, fs.id)

    def iter_shards(self, feature_set: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image_ids, vectors) per shard, only rows the catalog points at; one shard in memory at a time."""
        for part in self._plan(self.feature_set(feature_set)):
            yield vectors.read_part(part, self.files.part_source(part))

    def read_set(self, feature_set: str) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, vectors) of every live row of one feature set, in shard order.

        Read straight into one preallocated matrix (whole shards without an
        intermediate copy), e.g. to load an in-memory search index.
        """
        return self._replanned(lambda: self._read_set(self.feature_set(feature_set)))  # type: ignore[no-any-return]

    def _read_set(self, fs: RegisteredSet) -> tuple[np.ndarray, np.ndarray]:
        plan = self._plan(fs)
        with self.files.fetching(plan) as source:
            return vectors.read_parts_into(plan, int(fs.dim), source, source.done)

    # -- caches ----------------------------------------------------------------------
    def extractor(self, feature_set: str, batch_size: int = 1) -> tuple[Extractor, threading.Lock]:
        """The extractor that reproduces ``feature_set`` (cached), with the lock to hold around ``compute``.

        Keyed by the set's id and params, so a replaced set gets a new one.
        """
        fs = self.feature_set(feature_set)
        key = (fs.id, fs.name, params_key(fs.params), batch_size)
        with self._lock:
            hit = self._extractors.get(key)
        if hit is None:
            from featurestore.features.registry import extractor_for  # every feature kind's code

            hit = (extractor_for(self, fs, batch_size=batch_size), threading.Lock())
            with self._lock:
                hit = self._extractors.setdefault(key, hit)
        return hit

    def run_model(self, run: Run) -> Any:
        """A run's fitted final model (cached), its artifact verified against the recorded sha256 first."""
        if not run.artifact_path or not run.artifact_sha256:
            raise FeatureStoreError(f"run {run.id} has no final model (it was evaluated, not trained)",
                                    remedy="train-final", run_id=run.id, features=",".join(run.features))
        key = (int(run.id), str(run.artifact_sha256))
        with self._lock:
            model = self._models.get(key)
        if model is None:
            from featurestore.training.artifacts import load_artifact

            model = load_artifact(self.local_file(run.artifact_path, run.artifact_sha256), run.artifact_sha256)
            with self._lock:
                model = self._models.setdefault(key, model)
        return model

    def vector_index(self, fs: RegisteredSet, metric: str, shard_key: tuple[Any, ...], size: int) -> VectorIndex:
        """The in-memory exact index of ``fs`` (cached), reloaded when its shards changed.

        Least recently used indexes are dropped so the cache stays within
        ``settings.search_memory_mb``.
        """
        key = (fs.id, metric)
        with self._lock:
            entry = self._indexes.get(key)
            if entry is not None and entry[0] == shard_key:
                self._indexes.move_to_end(key)
                return entry[1]
            self._indexes.pop(key, None)
        ids, mat = self.read_set(fs.name)
        from featurestore.search.kernel import VectorIndex

        index = VectorIndex(ids, mat, metric, copy=False)
        del mat
        budget = self.settings.search_memory_mb * 2**20
        with self._lock:
            while self._indexes and sum(e[2] for e in self._indexes.values()) + size > budget:
                self._indexes.popitem(last=False)
            self._indexes[key] = (shard_key, index, size)
        return index

    def clear_caches(self) -> None:
        """Drop cached extractors, run models and search indexes (frees their memory)."""
        with self._lock:
            self._extractors.clear()
            self._models.clear()
            self._indexes.clear()
        if self._search_cache is not None:
            self._search_cache.clear()
        if self._ann_indexes is not None:
            self._ann_indexes.clear()

    # -- maintenance ---------------------------------------------------------------
    def compact(self, feature_set: str | None = None, min_rows: int = 10_000) -> list[Compacted]:
        """Merge shards smaller than ``min_rows`` of each set into one. Call under :meth:`writing`.

        The merged shard is registered (taking over the old shards' rows) in one
        transaction; the old files are deleted after it commits. Returns
        (feature set, shards merged, rows) per set that changed.
        """
        names = [feature_set] if feature_set else [fs.name for fs in self.feature_sets()]
        done = []
        for name in names:
            fs = self.feature_set(name)
            small = self.catalog.shards(fs.id, max_rows=min_rows)
            if len(small) < 2:
                continue
            small_ids = {sh.id for sh in small}
            parts = [part for part in self._plan(fs) if part.path in {self.root / sh.path for sh in small}]
            read = [vectors.read_part(part, self.files.part_source(part)) for part in parts]
            parts_ids, parts_vecs = zip(*read, strict=True) if read else ((), ())
            all_ids = np.concatenate(parts_ids) if parts_ids else np.empty(0, dtype=np.int64)
            order = np.argsort(all_ids, kind="stable")
            all_vecs = np.concatenate(parts_vecs)[order] if parts_vecs else np.empty((0, fs.dim), np.float32)
            runtime = ",".join(sorted({sh.runtime for sh in small if sh.runtime})) or None  # keeps them all
            self._write_and_register(fs, all_ids[order], all_vecs, replaces=small_ids, runtime=runtime)
            for sh in small:
                self.delete_file(sh.path)
            done.append(Compacted(fs.name, len(small), len(all_ids)))
        return done

    # -- reporting -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Datasets, label counts, ingest failures and feature-set coverage."""
        info = self.catalog.status()
        total = info["images"]
        info["feature_sets"] = [
            {"feature_set": row.name, "kind": row.kind, "dim": row.dim, "images": row.images,
             "coverage": (row.images / total if total else 0.0), "shards": row.shards}
            for row in self.coverage()
        ]
        return info

