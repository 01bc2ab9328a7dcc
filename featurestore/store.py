"""The store: a folder with the SQL catalog and the HDF5 feature shards.

``Store`` is the Python API the CLI (and anyone else) builds on::

    store = Store.open("./.fs")
    fm = store.read_matrix(["rp128", "efficientnet-lite0"], labelled_only=True)
    fm.X.shape, fm.blocks, fm.labels

Layout of the folder::

    catalog.db          SQLite catalog (unless FS_DATABASE_URL points elsewhere)
    features/<set>/     HDF5 shards of each feature set
    models/             CNN checkpoints registered with `fs models add`
    artifacts/          fitted models of training runs
    write.lock          one writer at a time
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from featurestore.catalog import database
from featurestore.catalog.schema import (
    Dataset,
    FeatureRow,
    FeatureSet,
    FeatureShard,
    Image,
    IngestError,
)
from featurestore.config import Settings
from featurestore.errors import (
    DimensionMismatchError,
    FeatureStoreError,
    InvalidInputError,
    MissingFeaturesError,
    NotFoundError,
    ParamsMismatchError,
)
from featurestore.features.base import FeatureSpec
from featurestore.io.atomic import TMP_PREFIX
from featurestore.io.lock import write_lock
from featurestore.shards import place, read_rows_into, read_shard, remove_orphans, write_shard

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(what: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' (max 200 characters)"
        )
    return name


@dataclass(frozen=True)
class ShardPart:
    """The live rows of one shard: all ``live`` rows when ``rows`` is None, else these (with their ids)."""

    path: Path
    live: int
    ids: np.ndarray | None
    rows: np.ndarray | None


@dataclass
class FeatureMatrix:
    """Feature sets assembled into one aligned matrix (rows = images, in id order)."""

    image_ids: np.ndarray
    X: np.ndarray
    blocks: dict[str, tuple[int, int]]
    labels: np.ndarray
    superclasses: np.ndarray
    paths: list[str] = field(default_factory=list)


class Store:
    """A feature store folder plus its catalog connection."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.root = settings.store
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, settings: Settings | None = None, *, create: bool = False) -> Store:
        """Open the store described by ``settings`` (``Settings.from_env()`` by default).

        ``create=True`` (writers) makes the folder and the schema on first use;
        readers get a clear error when there is no store yet.
        """
        settings = settings or Settings.from_env()
        root = settings.store
        if not root.exists():
            if not create:
                raise FeatureStoreError(
                    f"no store at {root}: run `fs ingest PATH` to create one, or pass --store/FS_STORE"
                )
            root.mkdir(parents=True)
        elif not root.is_dir():
            raise InvalidInputError(f"store path {root} is a file, not a folder; pass another --store")
        for sub in ("features", "models", "artifacts"):
            (root / sub).mkdir(exist_ok=True)
        url = settings.catalog_url
        engine = database.make_engine(url)
        try:
            database.ensure_schema(engine, url, create=create)
        except Exception:
            engine.dispose()
            raise
        return cls(settings, engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store's write lock; clean up what a crashed writer left."""
        with write_lock(self.root, self.settings.lock_timeout):
            self._remove_orphans()
            yield

    def _remove_orphans(self) -> None:
        with self.session() as s:
            registered = set(s.scalars(select(FeatureShard.path)))
        features = self.root / "features"
        names = {Path(p).name for p in registered}
        for folder in features.iterdir() if features.exists() else []:
            if folder.is_dir():
                remove_orphans(folder, names)
        # Half-written files of other writers (projections, model conversions, artifacts) and
        # artifacts whose run was never recorded because the writer died first.
        from featurestore.catalog.schema import Run

        with self.session() as s:
            artifacts = {Path(p).name for p in s.scalars(select(Run.artifact_path)) if p}
        sweep = [self.root / "projections", self.root / "artifacts", *(self.root / "models").glob("*/")]
        for folder in sweep:
            for path in folder.iterdir() if folder.is_dir() else []:
                temp = path.name.startswith(".") and (path.name.startswith(TMP_PREFIX) or path.suffix == ".tmp")
                lost = folder.name == "artifacts" and path.suffix == ".pkl" and path.name not in artifacts
                if path.is_file() and (temp or lost):
                    path.unlink(missing_ok=True)

    # -- datasets and images -----------------------------------------------------
    def dataset_id(self, s: Session, name: str, create: bool = False) -> int:
        check_name("dataset", name)
        ds = s.scalar(select(Dataset).where(Dataset.name == name))
        if ds is None:
            if not create:
                raise NotFoundError("dataset", name, s.scalars(select(Dataset.name)))
            ds = Dataset(name=name)
            s.add(ds)
            s.flush()
        return ds.id

    def select_images(
        self,
        dataset: str | None = None,
        labelled_only: bool = False,
        image_ids: Sequence[int] | None = None,
    ) -> list[tuple[int, str, str | None, str | None]]:
        """(id, source_path, label, superclass) of the selected images, by id."""
        return self._image_rows(dataset, labelled_only, image_ids, ids_only=False)

    def _image_rows(self, dataset: str | None, labelled_only: bool, image_ids: Sequence[int] | None,
                    ids_only: bool) -> list[Any]:
        cols = [Image.id] if ids_only else [Image.id, Image.source_path, Image.label, Image.superclass]
        q = select(*cols).order_by(Image.id)
        if dataset is not None:
            with self.session() as s:
                q = q.where(Image.dataset_id == self.dataset_id(s, dataset))
        if labelled_only:
            q = q.where(Image.label.is_not(None))
        wanted = {int(i) for i in image_ids} if image_ids is not None else None
        if wanted is not None and len(wanted) <= 10_000:  # a few images: let the database pick them
            q = q.where(Image.id.in_(sorted(wanted)))
        # Plain DB-API tuples: ORM/Row objects cost seconds per million images. The only
        # bound values are integers we produced, so rendering them inline is safe.
        sql = str(q.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}))
        with self.engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            cur.execute(sql)
            rows = cur.fetchall()
            cur.close()
        if wanted is not None and len(wanted) > 10_000:
            rows = [r for r in rows if r[0] in wanted]
        return rows  # type: ignore[return-value]

    # -- feature sets --------------------------------------------------------------
    def feature_sets(self) -> list[FeatureSet]:
        with self.session() as s:
            return list(s.scalars(select(FeatureSet).order_by(FeatureSet.name)))

    def feature_set(self, name: str) -> FeatureSet:
        with self.session() as s:
            fs = s.scalar(select(FeatureSet).where(FeatureSet.name == name))
            if fs is None:
                names = list(s.scalars(select(FeatureSet.name)))
                raise NotFoundError(
                    "feature set", name, names, "Create it with `fs extract` (see `fs extract --help`)"
                )
            return fs

    def ensure_feature_set(self, spec: FeatureSpec, replace: bool = False) -> FeatureSet:
        """Register ``spec`` or check it matches what is stored. Call under :meth:`writing`."""
        check_name("feature set", spec.name)
        params = _jsonable(spec.params)
        with self.session() as s:
            fs = s.scalar(select(FeatureSet).where(FeatureSet.name == spec.name))
            if fs is not None and replace:
                self._drop_feature_set(s, fs)
                fs = None
            if fs is not None:
                stored = dict(fs.params)
                if stored != params or fs.dim != spec.dim or fs.kind != spec.kind:
                    if fs.dim != spec.dim:
                        stored = {**stored, "dim": fs.dim}
                        params = {**params, "dim": spec.dim}
                    raise ParamsMismatchError(spec.name, stored, params)
                return fs
            fs = FeatureSet(name=spec.name, kind=spec.kind, params=params, dim=spec.dim, dtype=spec.dtype)
            s.add(fs)
            s.flush()
            return fs

    def drop_feature_set(self, name: str) -> None:
        with self.session() as s:
            fs = s.scalar(select(FeatureSet).where(FeatureSet.name == name))
            if fs is None:
                raise NotFoundError("feature set", name, s.scalars(select(FeatureSet.name)))
            self._drop_feature_set(s, fs)

    def _drop_feature_set(self, s: Session, fs: FeatureSet) -> None:
        s.execute(delete(FeatureRow).where(FeatureRow.feature_set_id == fs.id))
        s.execute(delete(FeatureShard).where(FeatureShard.feature_set_id == fs.id))
        s.delete(fs)
        s.flush()
        # Files go after the rows: a crash in between leaves orphans, removed later.
        shutil.rmtree(self.root / "features" / fs.name, ignore_errors=True)

    def images_lacking(self, feature_set: str, image_ids: Sequence[int] | None = None) -> list[int]:
        """Ids of images (all, or among ``image_ids``) without a vector in ``feature_set``."""
        with self.session() as s:
            fs_id = s.scalar(select(FeatureSet.id).where(FeatureSet.name == feature_set))
            have: set[int] = set()
            if fs_id is not None:
                have = set(s.scalars(select(FeatureRow.image_id).where(FeatureRow.feature_set_id == fs_id)))
            ids = image_ids if image_ids is not None else list(s.scalars(select(Image.id).order_by(Image.id)))
        return [int(i) for i in ids if int(i) not in have]

    def append_vectors(self, feature_set: FeatureSet, image_ids: Sequence[int], vectors: np.ndarray) -> Path:
        """Write one shard and register it with its rows in one transaction. Call under :meth:`writing`."""
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != feature_set.dim:
            raise DimensionMismatchError(
                f"vectors for {feature_set.name} have shape {vecs.shape}, expected (n, {feature_set.dim})"
            )
        return self._write_and_register(feature_set, np.asarray(image_ids, dtype=np.int64), vecs)

    def _write_and_register(self, fs: FeatureSet, ids: np.ndarray, vecs: np.ndarray,
                            replaces: set[int] | None = None) -> Path:
        """Write a shard, then register it and its rows (dropping the ``replaces`` shards) in one transaction.

        If registration fails the new file is removed; if the process dies first
        the file is an orphan that the next writer removes.
        """
        path = write_shard(self.root / "features" / fs.name, fs.name, fs.kind, fs.params, ids, vecs)
        try:
            with self.session() as s:
                shard = FeatureShard(feature_set_id=fs.id, path=str(path.relative_to(self.root)), rows=len(ids))
                s.add(shard)
                s.flush()
                if replaces:
                    s.execute(delete(FeatureRow).where(FeatureRow.shard_id.in_(replaces)))
                s.execute(insert(FeatureRow), [
                    {"feature_set_id": fs.id, "image_id": int(i), "shard_id": shard.id, "row": r}
                    for r, i in enumerate(ids)])
                if replaces:
                    s.execute(delete(FeatureShard).where(FeatureShard.id.in_(replaces)))
        except Exception:
            path.unlink(missing_ok=True)
            raise
        return path

    def coverage(self) -> list[tuple[str, str, int, int, int]]:
        """(name, kind, dim, images with a vector, shards) per feature set."""
        with self.session() as s:
            rows = s.execute(
                select(
                    FeatureSet.name,
                    FeatureSet.kind,
                    FeatureSet.dim,
                    select(func.count()).where(FeatureRow.feature_set_id == FeatureSet.id).scalar_subquery(),
                    select(func.count())
                    .where(FeatureShard.feature_set_id == FeatureSet.id)
                    .scalar_subquery(),
                ).order_by(FeatureSet.name)
            )
            return [tuple(r) for r in rows]  # type: ignore[misc]

    # -- reading -------------------------------------------------------------------
    def read_matrix(
        self,
        feature_sets: Sequence[str],
        *,
        dataset: str | None = None,
        labelled_only: bool = False,
        image_ids: Sequence[int] | None = None,
        skip_missing: bool = False,
    ) -> FeatureMatrix:
        """Assemble ``feature_sets`` into one matrix aligned on image ids.

        Each shard is read once. Images lacking a set raise
        :class:`MissingFeaturesError` naming the ``fs extract`` command, unless
        ``skip_missing`` drops them.
        """
        if not feature_sets:
            raise InvalidInputError("no feature sets given; list them like --features rp128,efficientnet-lite0")
        sets = [self.feature_set(n) for n in feature_sets]
        ids = np.array([r[0] for r in self._image_rows(dataset, labelled_only, image_ids, ids_only=True)],
                       dtype=np.int64)
        with self.engine.connect() as conn:
            plans = {fs.id: self._shard_plan(conn, fs.id) for fs in sets}
        # One pass: every shard is opened once, its ids and vectors read together and placed
        # by image id. Rows are dropped afterwards only if some image lacks a set.
        X = np.empty((len(ids), sum(fs.dim for fs in sets)), dtype=np.float32)
        present = {fs.id: np.zeros(len(ids), dtype=bool) for fs in sets}
        blocks: dict[str, tuple[int, int]] = {}
        jobs = []
        col = 0
        for fs in sets:
            cols = slice(col, col + fs.dim)
            jobs += [(fs.id, part.path, part.ids, part.rows, cols) for part in plans[fs.id]]
            blocks[fs.name] = (col, col + fs.dim)
            col += fs.dim

        def load(fs_id: int, path: Path, shard_ids: np.ndarray | None, rows: np.ndarray | None, cols: slice) -> None:
            file_ids, block = read_shard(path)
            if block.shape[1] != cols.stop - cols.start:
                raise DimensionMismatchError(
                    f"feature shard {path} has dim {block.shape[1]}, catalog says {cols.stop - cols.start}"
                )
            if rows is None:
                shard_ids, rows = file_ids, np.arange(len(file_ids))
            assert shard_ids is not None
            if not len(ids):
                return
            pos = np.minimum(np.searchsorted(ids, shard_ids), len(ids) - 1)
            hit = ids[pos] == shard_ids
            if not hit.all():
                pos, rows = pos[hit], rows[hit]
            present[fs_id][pos] = True
            place(X, block, pos, rows, cols)

        # HDF5 reads are serial (h5py holds a global lock) but numpy copies release the GIL:
        # two workers each read a shard and place it, so one copies while the other reads.
        # The images' paths and labels are fetched by a third thread meanwhile.
        with ThreadPoolExecutor(max_workers=3) as pool:
            meta = pool.submit(self.select_images, dataset, labelled_only, image_ids)
            for future in [pool.submit(load, *job) for job in jobs]:
                future.result()
            images = meta.result()
        if len(images) != len(ids):  # an ingest committed in between: keep the rows we placed
            by_id = {r[0]: r for r in images}
            images = [by_id.get(int(i), (int(i), "", None, None)) for i in ids]
        keep = np.ones(len(ids), dtype=bool)
        for fs in sets:
            if not present[fs.id].all() and not skip_missing:
                raise MissingFeaturesError(fs.name, int((~present[fs.id]).sum()), _extract_hint(fs))
            keep &= present[fs.id]
        if not keep.all():
            X = X[keep]
        kept = [r for r, k in zip(images, keep, strict=True) if k]
        return FeatureMatrix(
            image_ids=ids[keep],
            X=X,
            blocks=blocks,
            labels=np.array([r[2] for r in kept], dtype=object),
            superclasses=np.array([r[3] for r in kept], dtype=object),
            paths=[r[1] for r in kept],
        )

    def _shard_plan(self, conn: Any, feature_set_id: int) -> list[ShardPart]:
        """The live rows of each shard of a feature set, in shard order.

        When the catalog points at every row of a shard (the normal case) ``ids``
        and ``rows`` are None: the shard's own ``image_ids`` are used, which is much
        faster than fetching one catalog row per vector. Otherwise the catalog's
        image ids and rows for that shard are given.
        """
        fid = int(feature_set_id)
        shards = conn.execute(select(FeatureShard.id, FeatureShard.path, FeatureShard.rows).where(
            FeatureShard.feature_set_id == fid).order_by(FeatureShard.id)).all()
        counts = dict(conn.execute(select(FeatureRow.shard_id, func.count()).where(
            FeatureRow.feature_set_id == fid).group_by(FeatureRow.shard_id)).all())
        plan: list[ShardPart] = []
        for shard_id, rel, nrows in shards:
            live = counts.get(shard_id, 0)
            if live == nrows:
                plan.append(ShardPart(self.root / rel, live, None, None))
            elif live:
                rows = np.array(conn.execute(select(FeatureRow.image_id, FeatureRow.row).where(
                    FeatureRow.shard_id == shard_id).order_by(FeatureRow.row)).all(), dtype=np.int64)
                plan.append(ShardPart(self.root / rel, live, rows[:, 0], rows[:, 1]))
        return plan

    def _plan(self, feature_set: str) -> list[ShardPart]:
        fs = self.feature_set(feature_set)
        with self.engine.connect() as conn:
            return self._shard_plan(conn, fs.id)

    def iter_shards(self, feature_set: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image_ids, vectors) per shard, only rows the catalog points at; one shard in memory at a time."""
        for part in self._plan(feature_set):
            ids, vecs = read_shard(part.path)
            if part.rows is not None:
                ids, vecs = ids[part.rows], vecs[part.rows]
            yield ids, vecs

    def read_set(self, feature_set: str) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, vectors) of every live row of one feature set, in shard order.

        Read straight into one preallocated matrix (whole shards without an
        intermediate copy), e.g. to load an in-memory search index.
        """
        fs = self.feature_set(feature_set)
        plan = self._plan(feature_set)
        n = sum(part.live for part in plan)
        ids = np.empty(n, dtype=np.int64)
        mat = np.empty((n, fs.dim), dtype=np.float32)
        pos = 0
        for part in plan:
            read_rows_into(part.path, part.rows, ids, mat, pos)
            pos += part.live
        return ids, mat

    def search(self, feature_set: str, query: Any, k: int = 10, **kwargs: Any) -> list[Any]:
        """Exact nearest images in a feature set; see :func:`featurestore.search.service.search`."""
        from featurestore.search.service import search

        return search(self, feature_set, query, k, **kwargs)

    # -- maintenance ---------------------------------------------------------------
    def compact(self, feature_set: str | None = None, min_rows: int = 10_000) -> list[tuple[str, int, int]]:
        """Merge shards smaller than ``min_rows`` of each set into one. Call under :meth:`writing`.

        Returns (feature set, shards merged, rows) per set that changed.
        """
        names = [feature_set] if feature_set else [fs.name for fs in self.feature_sets()]
        done = []
        for name in names:
            fs = self.feature_set(name)
            with self.session() as s:
                small = list(s.execute(select(FeatureShard.id, FeatureShard.path).where(
                    FeatureShard.feature_set_id == fs.id, FeatureShard.rows < min_rows)))
                live = s.execute(select(FeatureRow.image_id, FeatureRow.shard_id, FeatureRow.row).where(
                    FeatureRow.feature_set_id == fs.id)).all()
            if len(small) < 2:
                continue
            small_ids = {sid for sid, _ in small}
            parts_ids, parts_vecs = [], []
            wanted: dict[int, list[tuple[int, int]]] = {}
            for image_id, shard_id, row in live:
                if shard_id in small_ids:
                    wanted.setdefault(shard_id, []).append((row, image_id))
            for shard_id, rel_old in small:
                ids, vecs = read_shard(self.root / rel_old)
                pairs = sorted(wanted.get(shard_id, []))
                if pairs:
                    idx = np.array([r for r, _ in pairs])
                    parts_ids.append(ids[idx])
                    parts_vecs.append(vecs[idx])
            all_ids = np.concatenate(parts_ids)
            order = np.argsort(all_ids, kind="stable")
            all_ids, all_vecs = all_ids[order], np.concatenate(parts_vecs)[order]
            self._write_and_register(fs, all_ids, all_vecs, replaces=small_ids)
            for _, old in small:
                (self.root / old).unlink(missing_ok=True)
            done.append((fs.name, len(small), len(all_ids)))
        return done

    # -- reporting -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Datasets, label counts, ingest failures and feature-set coverage."""
        with self.session() as s:
            datasets = [
                {"dataset": name, "images": n}
                for name, n in s.execute(
                    select(Dataset.name, func.count(Image.id))
                    .join(Image, Image.dataset_id == Dataset.id, isouter=True)
                    .group_by(Dataset.name)
                    .order_by(Dataset.name)
                )
            ]
            labels = [
                {"superclass": sc, "label": lb, "images": n}
                for sc, lb, n in s.execute(
                    select(Image.superclass, Image.label, func.count())
                    .group_by(Image.superclass, Image.label)
                    .order_by(Image.superclass, Image.label)
                )
            ]
            errors = [
                {"path": p, "reason": r}
                for p, r in s.execute(select(IngestError.path, IngestError.reason).order_by(IngestError.path))
            ]
            total = s.scalar(select(func.count(Image.id))) or 0
        coverage = [
            {"feature_set": n, "kind": k, "dim": d, "images": c, "coverage": (c / total if total else 0.0),
             "shards": sh}
            for n, k, d, c, sh in self.coverage()
        ]
        return {"images": total, "datasets": datasets, "labels": labels, "ingest_errors": errors,
                "feature_sets": coverage}


def _extract_hint(fs: FeatureSet) -> str:
    p = fs.params or {}
    if fs.kind == "random_projection":
        return f"fs extract --rp {p.get('k', fs.dim)}"
    if fs.kind == "pixels":
        size = p.get("size", ["W", "H"])
        return f"fs extract --pixels {size[0]}x{size[1]}"
    if fs.kind == "lowlevel":
        return "fs extract --lowlevel"
    if fs.kind == "cnn":
        layer = p.get("layer")
        model = p.get("model", fs.name)
        extra = f" --layers {layer}" if layer and fs.name != model else ""
        return f"fs extract --model {model}{extra}"
    return "fs extract"


def _jsonable(value: Any) -> Any:
    """Normalise params to what a JSON column gives back (tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
