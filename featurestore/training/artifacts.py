"""Fitted-model files: written atomically, verified before they are unpickled.

Unpickling runs arbitrary code, so a model file is only loaded when its bytes
match the sha256 recorded at training time. The bytes are read once, hashed,
and the same in-memory bytes are unpickled, so the file cannot change between
the check and the load.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import re
from pathlib import Path
from typing import Any

from featurestore.errors import IntegrityError, InvalidInputError, ModelFilesMissingError
from featurestore.io.atomic import atomic_open, sha256_file
from featurestore.io.verified import regular_stat

PICKLE_PROTOCOL = 5

_SHA256 = re.compile(r"[0-9a-f]{64}")


class _HashingWriter:
    """File wrapper that hashes what pickle writes, so the file is read only once."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self._f.write(data)


def save_artifact(obj: Any, path: Path | str) -> str:
    """Pickle ``obj`` to ``path`` atomically and return the file's sha256.

    The pickle (protocol 5) is written to a temporary file in the same
    folder, flushed and fsynced, then moved over ``path`` with
    :func:`os.replace`: readers see either the old file or the complete new
    one, never a partial write.

    Parameters
    ----------
    obj : object
        Anything picklable (typically a fitted :class:`TwoFlowClassifier`).
    path : Path or str
        Destination; its folder is created if needed.

    Returns
    -------
    str
        sha256 hex digest of the bytes written, to record in the catalog.
    """
    with atomic_open(path, "wb") as f:
        writer = _HashingWriter(f)
        pickle.dump(obj, writer, protocol=PICKLE_PROTOCOL)
    return writer.sha.hexdigest()


def file_sha256(path: Path | str) -> str:
    """sha256 hex digest of a file's bytes."""
    return sha256_file(path)


def load_artifact(path: Path | str, expected_sha256: str) -> Any:
    """Load a pickled model after checking its sha256.

    Parameters
    ----------
    path : Path or str
        File written by :func:`save_artifact`.
    expected_sha256 : str
        Digest returned by :func:`save_artifact` (recorded in the catalog).

    Returns
    -------
    object
        The unpickled object.

    Raises
    ------
    ModelFilesMissingError
        The file does not exist.
    IntegrityError
        The file's bytes do not match ``expected_sha256``; nothing is unpickled.
    InvalidInputError
        ``expected_sha256`` is not a sha256 hex digest.
    """
    path = Path(path)
    expected = str(expected_sha256).strip().lower()
    if not _SHA256.fullmatch(expected):
        raise InvalidInputError(f"expected sha256 for {path} is not a 64-digit hex digest: {expected_sha256!r}")
    try:
        if os.path.exists(path):  # a FIFO would block the read, /dev/zero never end: regular files only
            regular_stat(path, "model file", "restore the file or retrain the model")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFilesMissingError(
            f"model file {path} is missing (moved or deleted since training); retrain the model or restore the file"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise IntegrityError(
            f"model file {path} was modified since training (sha256 {actual[:12]}..., "
            f"recorded {expected[:12]}...); refusing to unpickle it: retrain the model or restore the file"
        )
    return pickle.loads(data)
