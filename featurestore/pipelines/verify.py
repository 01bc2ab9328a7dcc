"""Check every registered shard against the catalog (``fs verify``), and unregister the damaged ones.

For each shard the catalog lists: the file exists and is a regular file, its
bytes have the sha256 recorded at registration (so a file of another set swapped
or symlinked in, or a value rewritten through h5py, is found), it opens, has the
shape the catalog records (rows x the set's dim), every chunk passes its
Fletcher-32 checksum (the whole file is read), and the catalog's rows point at
the image ids the shard actually holds. Index files, run artifacts and model
checkpoints are checked against their recorded sha256 too (:class:`FileProblem`).
A damaged shard's vectors cannot be trusted or read; :func:`unregister`
removes it from the catalog in one transaction, so coverage drops to the truth
and the next ``fs extract`` recomputes just those images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.errors import IntegrityError
from featurestore.io.objects import ObjectNotFoundError
from featurestore.io.verified import check_file
from featurestore.shards import ShardSource, check_shard
from featurestore.store import Store

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ShardProblem:
    """One damaged shard: ``problem`` is ``missing``, ``corrupt`` or ``mismatch``."""

    feature_set: str
    shard_id: int
    path: str
    rows: int
    problem: str
    detail: str


@dataclass(frozen=True)
class FileProblem:
    """A damaged file other than a shard: ``kind`` is ``index``, ``artifact`` or ``model``.

    ``owner`` is the feature set (index), ``run <id>`` (artifact) or ``model <name>``.
    Only indexes are repaired (unregistered and deleted: ``fs index build`` makes a new one).
    """

    kind: str
    owner: str
    path: str
    problem: str
    detail: str


@dataclass
class VerifyReport:
    """What :func:`verify` found."""

    feature_sets: int = 0
    shards: int = 0
    rows: int = 0
    problems: list[ShardProblem] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    """Readable shards written before checksums were added (not verifiable byte for byte)."""
    undigested: list[str] = field(default_factory=list)
    """Shards registered before their sha256 was recorded (catalog migration 0011)."""
    files: int = 0
    file_problems: list[FileProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.file_problems


def _mismatch(ids: np.ndarray, pairs: np.ndarray) -> str | None:
    """Why the catalog's (image_id, row) pairs do not match the shard's ids, or None."""
    if not len(pairs):
        return None
    rows = pairs[:, 1]
    outside = int(((rows < 0) | (rows >= len(ids))).sum())
    if outside:
        return f"{outside} catalog row(s) point past the shard's {len(ids)} rows"
    wrong = int((ids[rows] != pairs[:, 0]).sum())
    if wrong:
        return f"{wrong} catalog row(s) name an image id the shard does not hold at that row"
    return None


def verify(store: Store, feature_set: str | None = None, progress: Progress | None = None) -> VerifyReport:
    """Check every registered shard (of one feature set, or all) by reading it fully.

    Reads only; safe beside other readers. See the module docstring for the checks.
    """
    sets = [store.feature_set(feature_set)] if feature_set is not None else store.feature_sets()
    shards = [(fs.name, fs.dim, sh.id, sh.path, sh.rows, sh.sha256) for fs in sets
              for sh in store.catalog.shards(fs.id)]
    report = VerifyReport(feature_sets=len({s[0] for s in shards}), shards=len(shards))
    for k, (name, dim, shard_id, rel, rows, sha256) in enumerate(shards, start=1):
        path = store.root / rel
        report.rows += rows

        def problem(kind: str, detail: str, name: str = name, shard_id: int = shard_id, rel: str = rel,
                    rows: int = rows) -> None:
            report.problems.append(ShardProblem(name, shard_id, rel, rows, kind, detail))

        try:
            source = _source(store, rel, sha256)
            gone = isinstance(source, Path) and not source.exists() and not source.is_symlink()
            check = None if gone else check_shard(source, rows, dim, sha256=sha256)
        except IntegrityError as exc:
            problem("corrupt", str(exc))
            check = None
            gone = False
        if gone:
            problem("missing", f"{store.bucket.url + rel if store.bucket else path} does not exist")
        elif check is not None:
            if not check.checksummed:
                report.unchecked.append(rel)
            if sha256 is None:
                report.undigested.append(rel)
            why = _mismatch(check.image_ids, store.catalog.live_rows_of_shard(shard_id))
            if why:
                problem("mismatch", why)
        if progress:
            progress(k, len(shards))
    _verify_files(store, {fs.id for fs in sets}, feature_set is None, report)
    return report


def _source(store: Store, rel: str, sha256: str | None) -> ShardSource:
    """The shard to check: its file, or for a bucket store its object through the sha256-checked read cache
    (an :class:`IntegrityError` when the bytes no longer match; a path that does not exist when it is gone)."""
    if store.bucket is None:
        return store.root / rel
    try:
        return store.shard_source(rel, sha256)
    except ObjectNotFoundError:
        return store.root / rel


def _verify_files(store: Store, set_ids: set[int], everything: bool, report: VerifyReport) -> None:
    """Check index files (of ``set_ids``) and, when ``everything``, run artifacts and model checkpoints."""
    todo: list[tuple[str, str, str, str | None]] = [
        ("index", r.feature_set, r.path, r.sha256) for r in store.catalog.list_indexes()
        if r.feature_set_id in set_ids]
    if everything:
        todo += [("artifact", f"run {r.id}", r.artifact_path, r.artifact_sha256) for r in store.catalog.runs()
                 if r.artifact_path and r.artifact_sha256]
        for m in store.catalog.models().values():
            todo += [("model", f"model {m.name}", m.symbol_path, m.symbol_sha256),
                     ("model", f"model {m.name}", m.params_path, m.params_sha256)]
            if m.onnx_path and m.onnx_sha256:
                todo.append(("model", f"model {m.name}", m.onnx_path, m.onnx_sha256))
    for kind, owner, rel, sha256 in todo:
        report.files += 1
        try:
            path = store.local_file(rel, sha256)  # a bucket store: fetched (and checked) first
        except ObjectNotFoundError:
            path = store.root / rel
        except IntegrityError as exc:
            report.file_problems.append(FileProblem(kind, owner, rel, "corrupt", str(exc).rstrip("; ")))
            continue
        if not path.exists() and not path.is_symlink():
            report.file_problems.append(FileProblem(kind, owner, rel, "missing", f"{path} does not exist"))
            continue
        try:
            check_file(path, sha256, f"{kind} file", "")
        except IntegrityError as exc:
            report.file_problems.append(FileProblem(kind, owner, rel, "corrupt", str(exc).rstrip("; ")))


def drop_damaged_indexes(store: Store, problems: Sequence[FileProblem]) -> list[str]:
    """Unregister and delete the damaged index files among ``problems``; call under ``store.writing()``.

    Returns the feature sets whose index was dropped (``fs index build`` makes a new one).
    """
    dropped = []
    for p in problems:
        if p.kind != "index":
            continue
        fs = store.feature_set(p.owner)
        rel = store.catalog.drop_index(fs.id)
        if rel is not None:
            path = store.root / rel
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            if store.bucket is not None:
                store.bucket.delete(rel)
            dropped.append(p.owner)
    store.ann_indexes.clear()
    return dropped


def unregister(store: Store, problems: Sequence[ShardProblem]) -> tuple[int, dict[str, int]]:
    """Remove damaged shards and their rows from the catalog in one transaction; call under ``store.writing()``.

    Only shards still registered under the same path are removed (a concurrent
    ``fs compact`` may have replaced them). Their files become orphans that the
    next writer deletes. Returns the number of shards removed and of vectors
    dropped per feature set.
    """
    removed = store.catalog.unregister_shards({p.shard_id: p.path for p in problems})
    dropped: dict[str, int] = {}
    by_id = {p.shard_id: p.feature_set for p in problems}
    for shard_id, rows in removed.items():
        dropped[by_id[shard_id]] = dropped.get(by_id[shard_id], 0) + rows
    return len(removed), dropped
