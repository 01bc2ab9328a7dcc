"""HDF5 feature shards: written atomically, read as aligned matrices.

A shard is one file ``features/<feature_set>/<feature_set>-<stamp>.h5`` with

* ``image_ids``: int64 ``(n,)`` -- catalog ids of the images, in row order;
* ``vectors``: float32 ``(n, dim)``;
* attributes ``feature_set``, ``kind``, ``params`` (JSON), ``dim``, ``dtype``,
  ``format``, ``created_at`` and, for CNN sets, ``runtime``, so ``h5dump`` or plain h5py users can read it
  without featurestore.

Both datasets are chunked (about 1 MiB per chunk) with HDF5's Fletcher-32
checksum filter: every read of a chunk verifies it, so bytes scrambled on disk
raise :class:`~featurestore.errors.IntegrityError` naming the file instead of
returning other vectors. Shards written before checksums were added (no
filter) are still read, unverified; :func:`check_shard` reports them as
unchecked, and recomputing the set (``fs extract ... --replace``) rewrites them
with checksums.

Shards are written to a temp file in the same folder, fsynced and renamed;
only then does the caller register them in the catalog (one transaction). A
crash leaves at most a temp file or an unregistered shard, both removed by
:func:`remove_orphans` under the next writer's lock.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from featurestore.errors import DimensionMismatchError, IntegrityError
from featurestore.io.atomic import atomic_path, fsync_dir, is_temp
from featurestore.io.verified import check_file

if TYPE_CHECKING:
    import h5py

SHARD_FORMAT = "featurestore-shard/1"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardBytes:
    """A shard's bytes held in memory (an object of a bucket store, already checked against its sha256)."""

    name: str  # its URL, for messages
    data: bytes

    def __str__(self) -> str:
        return self.name


ShardSource = Path | ShardBytes  # a local file, or the verified bytes of an object


def _open(path: ShardSource, sha256: str | None) -> h5py.File:
    """Open a shard for reading once it is known to be a regular file with the recorded bytes.

    Nothing else reaches h5py: a FIFO would block the open, ``/dev/zero`` or a
    directory cannot be a shard, and a file of another set (or one rewritten
    through h5py, whose own checksums the writer recomputes) differs from the
    sha256 the catalog recorded for this shard (see :mod:`featurestore.io.verified`).
    """
    if isinstance(path, ShardBytes):
        import h5py  # ~0.1 s: only when a shard is opened (`fs status`, `fs sql` never do)

        return h5py.File(io.BytesIO(path.data), "r")
    check_file(path, sha256, "feature shard", remedy="verify-shards")
    import h5py  # ~0.1 s: only when a shard is opened (`fs status`, `fs sql` never do)

    return h5py.File(path, "r")


def write_shard(
    folder: Path,
    feature_set: str,
    kind: str,
    params: dict[str, Any],
    image_ids: np.ndarray,
    vectors: np.ndarray | Sequence[np.ndarray],
    runtime: str | None = None,
) -> Path:
    """Write one shard durably and return its final path (``runtime``: what computed the vectors).

    ``vectors`` may be a list of row blocks: they are written one after the
    other, never concatenated in memory (large vectors, e.g. raw pixels).
    """
    ids = np.asarray(image_ids, dtype=np.int64)
    blocks = [np.ascontiguousarray(b, dtype=np.float32) for b in
              (vectors if isinstance(vectors, list) else [vectors])]
    rows = sum(b.shape[0] for b in blocks)
    if any(b.ndim != 2 or b.shape[1] != blocks[0].shape[1] for b in blocks) or rows != ids.shape[0]:
        raise DimensionMismatchError(
            f"shard for {feature_set}: {ids.shape[0]} ids but vectors of shape {[b.shape for b in blocks]}"
        )
    vecs = blocks[0] if len(blocks) == 1 else None
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    final = folder / f"{feature_set}-{stamp}-{os.urandom(4).hex()}.h5"
    n, dim = rows, blocks[0].shape[1]
    import h5py

    with atomic_path(final) as tmp, h5py.File(tmp, "w") as fh:
        # Fletcher-32 needs chunks; ~1 MiB of rows keeps single-row reads cheap. An empty shard
        # needs an extensible shape for its (non-empty) chunk.
        fh.create_dataset("image_ids", data=ids, chunks=(max(1, min(n, _CHUNK_BYTES // 8)),),
                          maxshape=(None,) if n == 0 else None, fletcher32=True)
        ds = fh.create_dataset("vectors", shape=(n, dim), dtype=np.float32, data=vecs,
                               chunks=(max(1, min(n, _CHUNK_BYTES // max(1, 4 * dim))), max(1, dim)),
                               maxshape=(None, dim) if n == 0 else None, fletcher32=True)
        if vecs is None:
            start = 0
            for b in blocks:
                ds[start : start + b.shape[0]] = b
                start += b.shape[0]
        fh.attrs["format"] = SHARD_FORMAT
        fh.attrs["feature_set"] = feature_set
        fh.attrs["kind"] = kind
        fh.attrs["params"] = json.dumps(params, sort_keys=True)
        fh.attrs["dim"] = int(dim)
        fh.attrs["dtype"] = "float32"
        fh.attrs["rows"] = int(n)
        fh.attrs["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if runtime:
            fh.attrs["runtime"] = runtime
    return final


def read_shard(path: ShardSource, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All ``(image_ids, vectors)`` of one shard (``sha256``: what the catalog recorded for it)."""
    try:
        with _open(path, sha256) as fh:
            return fh["image_ids"][...], fh["vectors"][...]
    except (OSError, KeyError) as exc:
        raise _open_error(path, exc) from None


def read_shard_placed(path: ShardSource, sha256: str | None, out: np.ndarray, cols: slice,
                      start_of: Callable[[np.ndarray], int | None]) -> tuple[np.ndarray, np.ndarray | None]:
    """A shard's ``image_ids``, its vectors read straight into ``out[p0:p0 + rows, cols]`` when
    ``start_of(image_ids)`` gives ``p0`` (then ``None`` is returned for them), else returned.

    Reading into place saves a copy and a fresh buffer per shard (``read_matrix``'s common case: a shard
    whose images are a run of the matrix's rows).
    """
    try:
        with _open(path, sha256) as fh:
            ids = fh["image_ids"][...]
            ds = fh["vectors"]
            p0 = start_of(ids) if ds.ndim == 2 and ds.shape[1] == cols.stop - cols.start else None
            if p0 is None or not out.flags.c_contiguous:
                return ids, ds[...]
            ds.read_direct(out, dest_sel=np.s_[p0 : p0 + len(ids), cols])
            return ids, None
    except (OSError, KeyError) as exc:
        raise _open_error(path, exc) from None


def read_shard_ids(path: ShardSource, sha256: str | None = None) -> np.ndarray:
    """The ``image_ids`` of one shard, without reading its vectors."""
    try:
        with _open(path, sha256) as fh:
            return fh["image_ids"][...]
    except (OSError, KeyError) as exc:
        raise _open_error(path, exc) from None


def _open_error(path: ShardSource, exc: Exception) -> IntegrityError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(path, Path) and not path.exists():
        reason = "no such file"
    elif _is_checksum_failure(exc):
        return IntegrityError(f"feature shard {path} is corrupt: its Fletcher-32 checksum does not match the data "
                              "on disk", remedy="verify-shards", path=path)
    return IntegrityError(f"feature shard {path} is missing or unreadable ({reason})", remedy="verify-shards",
                          path=path)


def _is_checksum_failure(exc: Exception) -> bool:
    text = str(exc).lower()
    return "checksum" in text or "filter returned failure" in text or "data error detected" in text


class ShardCheck(NamedTuple):
    """What :func:`check_shard` found in a readable shard."""

    image_ids: np.ndarray
    checksummed: bool


def check_shard(path: ShardSource, rows: int, dim: int, block_bytes: int = 64 << 20, sha256: str | None = None
                ) -> ShardCheck:
    """Read a whole shard, verifying its layout against the catalog and every chunk's checksum.

    Parameters
    ----------
    rows, dim : int
        What the catalog records for the shard and its feature set.
    block_bytes : int
        Vectors are read in blocks of about this size (memory stays bounded).
    sha256 : str, optional
        The digest the catalog recorded for the file's bytes.

    Raises
    ------
    IntegrityError
        Missing, not a regular file, other bytes than recorded, unreadable,
        corrupt (checksum), or a shape the catalog does not record; the
        message names the file.
    """
    try:
        with _open(path, sha256) as fh:
            ids_ds, vec_ds = fh["image_ids"], fh["vectors"]
            if vec_ds.ndim != 2 or vec_ds.shape != (rows, dim) or ids_ds.shape != (rows,):
                raise IntegrityError(
                    f"feature shard {path} holds {ids_ds.shape[0]} ids and vectors of shape {vec_ds.shape}; the "
                    f"catalog records {rows} x {dim}"
                )
            ids = ids_ds[...]
            step = max(1, block_bytes // max(1, 4 * dim))
            for start in range(0, rows, step):
                vec_ds[start : start + step]  # every chunk read is checked by the Fletcher-32 filter
            return ShardCheck(np.asarray(ids, dtype=np.int64), bool(vec_ds.fletcher32 and ids_ds.fletcher32))
    except (OSError, KeyError, ValueError) as exc:
        raise _open_error(path, exc) from None


def place(out: np.ndarray, block: np.ndarray, positions: np.ndarray, rows: np.ndarray, cols: slice) -> None:
    """``out[positions, cols] = block[rows]``, as one block copy when both sides are contiguous runs."""
    n = block.shape[0]
    p0 = int(positions[0]) if len(positions) else 0
    if len(rows) == n and np.array_equal(rows, np.arange(n)) and np.array_equal(positions, np.arange(p0, p0 + n)):
        out[p0 : p0 + n, cols] = block
    else:
        out[positions, cols] = block[rows]


def read_row(path: ShardSource, row: int, sha256: str | None = None) -> np.ndarray:
    """One vector of a shard."""
    try:
        with _open(path, sha256) as fh:
            return np.asarray(fh["vectors"][row], dtype=np.float32)
    except (OSError, KeyError, IndexError) as exc:
        raise _open_error(path, exc) from None


def read_rows_into(path: ShardSource, rows: np.ndarray | None, ids: np.ndarray, mat: np.ndarray, pos: int,
                   sha256: str | None = None) -> None:
    """Copy a shard's ``rows`` (``None``: all of them) into ``ids``/``mat`` from row ``pos`` on.

    A whole shard goes straight from HDF5 into the contiguous rows of ``mat``.
    """
    try:
        with _open(path, sha256) as fh:
            ds = fh["vectors"]
            if ds.ndim != 2 or ds.shape[1] != mat.shape[1]:
                raise DimensionMismatchError(
                    f"feature shard {path} has shape {ds.shape}, catalog says dim {mat.shape[1]}"
                )
            if rows is None:
                n = ds.shape[0]
                if pos + n > mat.shape[0]:
                    raise IntegrityError(f"feature shard {path} has more rows than the catalog records; re-extract")
                ds.read_direct(mat, dest_sel=np.s_[pos : pos + n])
                ids[pos : pos + n] = fh["image_ids"][...]
            else:
                mat[pos : pos + len(rows)] = ds[...][rows]
                ids[pos : pos + len(rows)] = fh["image_ids"][...][rows]
    except (OSError, KeyError) as exc:
        raise _open_error(path, exc) from None


def remove_orphans(folder: Path, registered: Iterable[str]) -> list[Path]:
    """Delete temp files and shards the catalog does not know. Call under the write lock.

    A folder found in a shard's place (not a file) is left alone: it is not ours to delete.
    """
    if not folder.exists():
        return []
    keep = {Path(p).name for p in registered}
    removed = []
    for path in folder.iterdir():
        if (is_temp(path) or (path.suffix == ".h5" and path.name not in keep)) and not path.is_dir():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        fsync_dir(folder)
    return removed


def read_selected(path: ShardSource, rows: np.ndarray, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image_ids, vectors)`` of some rows of a shard (``rows`` ascending, no repeats).

    A few rows are read as one point selection; more (h5py selects them one by
    one, which is slow) by reading the whole shard and picking them.
    """
    sel = np.asarray(rows, dtype=np.int64)
    try:
        with _open(path, sha256) as fh:
            ids_ds, vec_ds = fh["image_ids"], fh["vectors"]
            if len(sel) > 32:
                return ids_ds[...][sel], vec_ds[...][sel]
            return ids_ds[...][sel], vec_ds[sel.tolist()] if len(sel) else vec_ds[:0]
    except (OSError, KeyError) as exc:
        raise _open_error(path, exc) from None


def read_span_rows(path: ShardSource, rows: np.ndarray, window: int = 16_384, sha256: str | None = None) -> np.ndarray:
    """The vectors at ``rows`` (ascending, no repeats) of one shard, read as contiguous slices.

    Rows close together are read as one slice of at most ``window`` rows (HDF5
    reads whole chunks anyway), so memory stays bounded by the window however
    large the shard, and scattered rows never fall back to reading the whole shard.
    With ``sha256`` the file is first checked against it, like every other read.
    """
    sel = np.asarray(rows, dtype=np.int64)
    try:
        with _open(path, sha256) as fh:
            ds = fh["vectors"]
            out = np.empty((len(sel), ds.shape[1]), dtype=np.float32)
            i = 0
            while i < len(sel):
                lo = int(sel[i])
                j = int(np.searchsorted(sel, lo + window, side="left"))
                hi = int(sel[j - 1]) + 1
                out[i:j] = ds[lo:hi][sel[i:j] - lo]
                i = j
            return out
    except (OSError, KeyError, IndexError) as exc:
        raise _open_error(path, exc) from None
