"""The very sparse random projection matrix of ``rp<K>`` sets: generated, checked, saved and applied.

:mod:`featurestore.features.projection` builds the extractor on top. The same
``(n_features, n_components, seed, density)`` always gives the same matrix,
whatever library versions are installed.

Generation (format/generator version 1, ``"pcg64-raw32-rowmajor-v1"``)
-----------------------------------------------------------------------
Only the raw 64-bit output of ``numpy.random.PCG64(seed)`` is used (NumPy keeps
bit-generator streams fixed across releases; the ``Generator`` distribution
methods may change). Each 64-bit output is split into two 32-bit words, low
half first. Cell ``(i, j)`` of the ``(D, K)`` matrix (pixel ``i``, component
``j``) takes word number ``i * K + j``. With ``t = round(density * 2**31)``, a
word ``u`` gives::

    +s   if u < t
    -s   if t <= u < 2t
     0   otherwise,            s = sqrt(1 / density) / sqrt(K)  (stored as float32)

so each entry is non-zero with probability ``density`` (to 2**-32), with a
random sign, independently. Rows are generated in chunks of a few thousand, so
memory is bounded by the chunk plus the non-zeros; a dense ``K x D`` matrix is
never built. ``D = 921,600, K = 128`` at the default density ``1/sqrt(D) =
1/960`` has about 123k non-zeros and takes about half a second to generate.

Transform
---------
All non-zeros share one magnitude ``s``, so ``X @ R`` is ``s`` times, per
component, the sum of the pixels under its ``+`` entries minus the sum under
its ``-`` entries. :meth:`SparseRandomProjection.transform` gathers the
non-zero pixels and does segment sums (``numpy.add.reduceat``). For ``uint8``
input the sums are exact integers and the result is ``float32(sum * s)``
computed in float64, i.e. the correctly rounded value of the exact product, so
a row's vector never depends on the batch it was computed in, and it is 4-8x
faster than scipy's ``X @ R`` (which first converts the whole image to float).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from featurestore.errors import DimensionMismatchError, IntegrityError, InvalidInputError
from featurestore.io.atomic import atomic_open

FORMAT_VERSION = 1
GENERATOR = "pcg64-raw32-rowmajor-v1"
_CHUNK_CELLS = 1 << 21  # words drawn per chunk: ~8 MB of uint32 + 8 MB of raw uint64
_NPZ_KEYS = ("format_version", "generator", "shape", "seed", "density", "indices", "indptr", "data")


def default_density(n_features: int) -> float:
    """Li et al.'s recommended density ``1 / sqrt(n_features)``."""
    return 1.0 / math.sqrt(n_features)


MAX_PROJECTION_BYTES = 4 * 2**30
"""Largest projection to generate, by the memory it needs at its peak: 4 GiB."""

MAX_PROJECTION_DRAWS = 2**35
"""Most random words drawn to generate a projection (``D * K``, about 3.4e10: several minutes)."""

# Measured peak per non-zero of generating a matrix, then loading it with its transform tables and
# projecting (issue 32: 128 bytes at 640x480, K = 6,000; generation alone is 106). The whole
# `fs extract --rp K` stays under MAX_PROJECTION_BYTES plus the gather, itself bounded by _GATHER_BYTES.
_BYTES_PER_NONZERO = 128
_GATHER_BYTES = 256 * 2**20


def check_projection(n_features: int, n_components: int, density: float | None = None) -> None:
    """Refuse a projection too large to generate, before any work.

    Generation draws one random word per cell (``D * K``) and keeps about
    ``D * K * density`` non-zeros; both are bounded
    (:data:`MAX_PROJECTION_DRAWS`, :data:`MAX_PROJECTION_BYTES`), and ``K`` may
    not exceed ``D`` (a projection reduces dimensions).

    Raises
    ------
    InvalidInputError
        The message gives what it would need, the limit, and the largest ``K``
        that fits at this input size.
    """
    d, k = int(n_features), int(n_components)
    if d < 1 or k < 1:
        raise InvalidInputError(f"projection needs n_features >= 1 and n_components >= 1, got {d}, {k}")
    density = default_density(d) if density is None else float(density)
    if k > d:
        raise InvalidInputError(
            f"a random projection of {d:,} input values to {k:,} dimensions would not reduce them; K must be at "
            f"most {d:,} (typical: 64 to 1,024)"
        )
    nonzeros = d * k * density
    need = nonzeros * _BYTES_PER_NONZERO
    if need > MAX_PROJECTION_BYTES or d * k > MAX_PROJECTION_DRAWS:
        k_max = int(min(d, MAX_PROJECTION_BYTES / (_BYTES_PER_NONZERO * d * density), MAX_PROJECTION_DRAWS // d))
        raise InvalidInputError(
            f"a random projection of {d:,} input values to {k:,} dimensions would draw {d * k:,.0f} random numbers "
            f"and hold about {nonzeros:,.0f} non-zeros ({need / 2**30:,.1f} GiB while generating and projecting); "
            f"the limits are {MAX_PROJECTION_DRAWS:,} draws (minutes of work) and {MAX_PROJECTION_BYTES / 2**30:g} "
            f"GiB, so at this input size K can be at most {k_max:,} (typical: 64 to 1,024; or use a smaller {{size}})",
            params=("size",), k_max=k_max)


def _scale(density: float, n_components: int) -> np.float32:
    return np.float32(math.sqrt(1.0 / density) / math.sqrt(n_components))


class SparseRandomProjection:
    """A fixed very sparse random projection matrix ``R`` of shape ``(D, K)``.

    Build one with :meth:`generate` or :meth:`load`; the constructor takes an
    existing matrix and checks it.

    Parameters
    ----------
    matrix : scipy.sparse matrix, shape (n_features, n_components)
        Non-zeros must all be ``+s`` or ``-s`` with
        ``s = float32(sqrt(1/density) / sqrt(n_components))``.
    seed : int or None
        Seed it was generated from (recorded, not used), ``None`` if unknown.
    density : float
        Fraction of non-zero entries the matrix was drawn with.

    Attributes
    ----------
    n_features, n_components : int
        ``D`` and ``K``.
    scale : numpy.float32
        The magnitude ``s`` of every non-zero entry.
    """

    def __init__(self, matrix: Any, seed: int | None, density: float):
        if not sp.issparse(matrix):
            raise InvalidInputError("projection matrix must be a scipy.sparse matrix")
        m = sp.csc_matrix(matrix, dtype=np.float32)
        m.sort_indices()
        n_features, n_components = (int(x) for x in m.shape)
        if n_features < 1 or n_components < 1:
            raise InvalidInputError(f"projection matrix has an empty shape {m.shape}")
        density = float(density)
        if not 0.0 < density <= 1.0:
            raise InvalidInputError(f"projection density must be in (0, 1], got {density}")
        self.n_features = n_features
        self.n_components = n_components
        self.seed = None if seed is None else int(seed)
        self.density = density
        self.scale = _scale(density, n_components)
        if m.nnz and not np.all(np.abs(m.data) == self.scale):
            raise InvalidInputError(
                f"projection matrix entries must all be +/-{self.scale} for density {density} and "
                f"{n_components} components"
            )
        self._matrix = m
        self._sha256: str | None = None
        self._prepare_transform()

    # ------------------------------------------------------------------ build
    @classmethod
    def generate(
        cls, n_features: int, n_components: int, seed: int, density: float | None = None
    ) -> SparseRandomProjection:
        """Draw the matrix for ``(n_features, n_components, seed, density)``.

        Deterministic: the same arguments give a bitwise identical matrix in
        any process (see the module docstring for the exact layout).

        Parameters
        ----------
        n_features : int
            ``D``, the input dimension (921,600 for 640x480 RGB).
        n_components : int
            ``K``, the output dimension.
        seed : int
            Non-negative seed for ``numpy.random.PCG64``.
        density : float, optional
            Probability that an entry is non-zero; defaults to ``1/sqrt(D)``.

        Returns
        -------
        SparseRandomProjection
        """
        n_features, n_components = int(n_features), int(n_components)
        check_projection(n_features, n_components, density)
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise InvalidInputError(f"projection seed must be a non-negative integer, got {seed!r}")
        seed = int(seed)
        density = default_density(n_features) if density is None else float(density)
        if not 0.0 < density <= 1.0:
            raise InvalidInputError(f"projection density must be in (0, 1], got {density}")
        t = round(density * 2**31)
        if t < 1:
            raise InvalidInputError(
                f"projection density {density} is below the generator's 2**-31 resolution"
            )
        t2 = 2 * t  # may equal 2**32 (density 1): every cell is then non-zero

        bitgen = np.random.PCG64(seed)
        k = n_components
        chunk_rows = max(2, (_CHUNK_CELLS // k) & ~1)  # even, so chunks start on a 64-bit boundary
        rows_parts: list[np.ndarray] = []
        cols_parts: list[np.ndarray] = []
        neg_parts: list[np.ndarray] = []
        for r0 in range(0, n_features, chunk_rows):
            r1 = min(n_features, r0 + chunk_rows)
            cells = (r1 - r0) * k
            raw = bitgen.random_raw((cells + 1) // 2)
            words = np.empty(2 * raw.size, dtype=np.uint32)
            words[0::2] = raw & np.uint64(0xFFFFFFFF)
            words[1::2] = raw >> np.uint64(32)
            words = words[:cells]
            hit = np.flatnonzero(words < t2) if t2 < 2**32 else np.arange(cells)
            rows_parts.append((hit // k + r0).astype(np.int32))
            cols_parts.append((hit % k).astype(np.int32))
            neg_parts.append(words[hit] >= t)
        rows = np.concatenate(rows_parts)
        cols = np.concatenate(cols_parts)
        neg = np.concatenate(neg_parts)
        # Cells came in row-major order; a stable sort by column gives CSC order (rows ascending).
        order = np.argsort(cols, kind="stable")
        scale = _scale(density, k)
        data = np.where(neg[order], -scale, scale).astype(np.float32)
        indptr = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(np.bincount(cols, minlength=k), out=indptr[1:])
        matrix = sp.csc_matrix((data, rows[order], indptr), shape=(n_features, k))
        return cls(matrix, seed=seed, density=density)

    @property
    def matrix(self) -> sp.csc_matrix:
        """The ``(D, K)`` float32 CSC matrix (a copy; the projection stays immutable)."""
        return self._matrix.copy()

    @property
    def nnz(self) -> int:
        """Number of non-zero entries."""
        return int(self._matrix.nnz)

    def __repr__(self) -> str:
        return (
            f"SparseRandomProjection(n_features={self.n_features}, n_components={self.n_components}, "
            f"seed={self.seed}, density={self.density:.6g}, nnz={self.nnz})"
        )

    # -------------------------------------------------------------- transform
    def _prepare_transform(self) -> None:
        m = self._matrix
        k = self.n_components
        cols = np.repeat(np.arange(k), np.diff(m.indptr))
        neg = m.data < 0
        # Segment 2j holds component j's "+" pixels, 2j+1 its "-" pixels, rows ascending.
        seg = 2 * cols + neg
        order = np.lexsort((m.indices, seg))
        self._gather_idx = m.indices[order].astype(np.intp)
        seg_len = np.bincount(seg, minlength=2 * k)
        starts = np.zeros(2 * k, dtype=np.intp)
        np.cumsum(seg_len[:-1], out=starts[1:])
        # reduceat mishandles empty segments, so reduce over non-empty ones and scatter.
        self._seg_nonempty = np.flatnonzero(seg_len)
        self._seg_starts = starts[self._seg_nonempty]
        # For batches: gather in ascending pixel order (cache friendly), then permute.
        by_pixel = np.argsort(self._gather_idx, kind="stable")
        self._sorted_idx = self._gather_idx[by_pixel]
        self._perm = np.empty_like(by_pixel)
        self._perm[by_pixel] = np.arange(by_pixel.size)
        max_seg = int(seg_len.max()) if seg_len.size else 0
        self._int_dtype: type[np.number[Any]] = np.int32 if 255 * max_seg < 2**31 else np.int64

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project rows of ``X``: ``(n, D)`` -> ``(n, K)`` float32.

        Parameters
        ----------
        X : numpy.ndarray
            ``(n, D)`` or ``(D,)`` array, ``uint8`` (exact integer sums) or any
            real dtype (summed in float64). A 1-D input gives a 1-D output.

        Returns
        -------
        numpy.ndarray
            float32 ``(n, K)`` (or ``(K,)``). Each row depends only on the
            corresponding input row, never on the rest of the batch.

        Raises
        ------
        DimensionMismatchError
            If the last dimension is not ``n_features``.
        """
        X = np.asarray(X)
        one = X.ndim == 1
        if one:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise DimensionMismatchError(
                f"projection expects rows of {self.n_features} values, got an array of shape "
                f"{X.shape if not one else X.shape[1:]}"
            )
        acc: type[np.number[Any]]
        if X.dtype == np.uint8:
            acc = self._int_dtype
        elif X.dtype.kind in "biuf":
            acc = np.float64
        else:
            raise InvalidInputError(f"projection input must be numeric, got dtype {X.dtype}")
        n = X.shape[0]
        out = np.zeros((n, self.n_components), dtype=np.float32)
        if n == 0 or self._gather_idx.size == 0:
            return out[0] if one else out
        # The gather holds (rows x non-zeros) input values twice: a batch of 32 images at the largest
        # K took gigabytes. Rows are independent, so a few at a time keep it under _GATHER_BYTES.
        step = max(1, _GATHER_BYTES // (2 * X.dtype.itemsize * self._gather_idx.size))
        for start in range(0, n, step):
            self._project(X[start : start + step], acc, out[start : start + step])
        return out[0] if one else out

    def _project(self, X: np.ndarray, acc: type[np.number[Any]], out: np.ndarray) -> None:
        n, k = X.shape[0], self.n_components
        if n == 1:
            gathered = X[:, self._gather_idx]
        else:
            gathered = X[:, self._sorted_idx][:, self._perm]
        sums = np.zeros((n, 2 * k), dtype=acc)
        sums[:, self._seg_nonempty] = np.add.reduceat(gathered, self._seg_starts, axis=1, dtype=acc)
        diff = np.subtract(sums[:, 0::2], sums[:, 1::2])
        out[:] = diff.astype(np.float64) * np.float64(self.scale)

    __call__ = transform

    # ------------------------------------------------------------ persistence
    def sha256(self) -> str:
        """Hex sha256 of the matrix in canonical form.

        The digest covers a header ``featurestore-srp/1`` with the shape, then
        ``indptr`` as little-endian int64, ``indices`` as little-endian int32
        and ``data`` as little-endian float32 (CSC, rows sorted). Seed and
        density are not hashed: two files with the same matrix hash equal.
        """
        if self._sha256 is None:
            m = self._matrix
            h = hashlib.sha256()
            header = {"format": "featurestore-srp", "version": FORMAT_VERSION, "shape": list(m.shape)}
            h.update(json.dumps(header, sort_keys=True).encode() + b"\0")
            h.update(np.ascontiguousarray(m.indptr, dtype="<i8").tobytes())
            h.update(np.ascontiguousarray(m.indices, dtype="<i4").tobytes())
            h.update(np.ascontiguousarray(m.data, dtype="<f4").tobytes())
            self._sha256 = h.hexdigest()
        return self._sha256

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the projection to an ``.npz`` file atomically.

        The file appears complete or not at all: it is written to a temp file in
        the same folder, flushed, fsynced and renamed over ``path``.

        Returns
        -------
        pathlib.Path
            The path written.
        """
        path = Path(path)
        m = self._matrix
        arrays = {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "generator": np.array(GENERATOR),
            "shape": np.array(m.shape, dtype=np.int64),
            "seed": np.array(-1 if self.seed is None else self.seed, dtype=np.int64),
            "density": np.array(self.density, dtype=np.float64),
            "indices": m.indices.astype(np.int32),
            "indptr": m.indptr.astype(np.int64),
            "data": m.data.astype(np.float32),
        }
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_sha256: str | None = None) -> SparseRandomProjection:
        """Read a projection written by :meth:`save`, checking it.

        Parameters
        ----------
        path : path-like
            The ``.npz`` file.
        expected_sha256 : str, optional
            If given (e.g. from the catalog), the loaded matrix must hash to it.

        Raises
        ------
        InvalidInputError
            If the file is missing, unreadable or not a valid projection.
        IntegrityError
            If ``expected_sha256`` is given and does not match.
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"projection file {path} does not exist")

        def bad(why: str) -> InvalidInputError:
            return InvalidInputError(
                f"projection file {path} is not a valid featurestore projection ({why}); "
                "regenerate it with the same seed and density"
            )

        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [key for key in _NPZ_KEYS if key not in z.files]
                if missing:
                    raise bad(f"missing {', '.join(missing)}")
                a = {key: z[key] for key in _NPZ_KEYS}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise bad(str(exc)) from exc
        _check_arrays(a, bad)
        d, k = (int(x) for x in a["shape"])
        indptr, indices, data = a["indptr"], a["indices"], a["data"]
        seed = int(a["seed"])
        try:
            proj = cls(
                sp.csc_matrix((data, indices, indptr), shape=(d, k)),
                seed=None if seed < 0 else seed,
                density=float(a["density"]),
            )
        except InvalidInputError as exc:
            raise bad(str(exc)) from None
        if expected_sha256 is not None and proj.sha256() != expected_sha256:
            raise IntegrityError(
                f"projection file {path} has sha256 {proj.sha256()}, the catalog records "
                f"{expected_sha256}; restore the original file or recompute the feature set"
            )
        return proj


def _check_arrays(a: dict[str, np.ndarray], bad: Any) -> None:
    """Raise ``bad(why)`` unless the arrays form a valid CSC projection of the current format."""
    version = int(a["format_version"])
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}, this featurestore reads {FORMAT_VERSION}")
    shape = a["shape"]
    if shape.shape != (2,) or (shape < 1).any():
        raise bad(f"shape {shape.tolist()}")
    d, k = int(shape[0]), int(shape[1])
    indptr, indices, data = a["indptr"], a["indices"], a["data"]
    if indptr.shape != (k + 1,) or indptr[0] != 0 or (np.diff(indptr) < 0).any():
        raise bad("indptr")
    nnz = int(indptr[-1])
    if indices.shape != (nnz,) or data.shape != (nnz,) or data.dtype != np.float32:
        raise bad("indices/data length or dtype")
    if nnz and (indices.min() < 0 or indices.max() >= d):
        raise bad("row index out of range")
    if nnz > 1:
        cols = np.repeat(np.arange(k), np.diff(indptr))
        if not ((np.diff(indices) > 0) | (cols[1:] != cols[:-1])).all():
            raise bad("row indices not strictly increasing within a column")
