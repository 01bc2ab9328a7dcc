"""Read a legacy (pre-1.6, non-zip) PyTorch ``.pth`` state dict without torch.

The legacy format is a sequence of pickles followed by raw storage bytes::

    pickle(magic number) pickle(protocol version) pickle(sys_info)
    pickle(state dict)   pickle(list of storage keys)
    for each key, in that order: int64 element count + little-endian data

The state dict pickle references ``torch._utils._rebuild_tensor_v2`` and the
``torch.*Storage`` classes, so a plain :func:`pickle.load` would import torch
and, worse, would run whatever callable a crafted file names. Here every pickle
goes through :class:`_RestrictedUnpickler`, whose ``find_class`` hands out local
stand-ins for a short allow-list and refuses anything else *before* it could be
called, so reading a hostile file never executes code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from featurestore.errors import InvalidInputError

__all__ = ["load_legacy_state_dict", "LEGACY_MAGIC_NUMBER", "LEGACY_PROTOCOL_VERSION"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "ByteStorage": np.dtype("u1"),
    "CharStorage": np.dtype("i1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries the dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A persistent id resolved to the storage it names (data read later)."""

    key: str
    dtype: np.dtype
    numel: int
    view_offset: int = 0  # element offset into the root storage for legacy storage views


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    """Local replacement for ``torch._utils._rebuild_tensor_v2``: records, never computes."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor does not reference a storage")
    return _TensorRef(
        storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a legacy state dict needs."""

    def __init__(self, file: BinaryIO, path: Path, *, allow_tensors: bool):
        super().__init__(file)
        self._path = path
        self._allow_tensors = allow_tensors

    def find_class(self, module: str, name: str) -> Any:
        if self._allow_tensors:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor_v2
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name, _STORAGE_DTYPES[name])
        raise InvalidInputError(
            f"{self._path}: refusing to load global {module}.{name} from the pickle; only plain "
            "state dicts (OrderedDict of tensors) are accepted - the file may be malicious or "
            "not a legacy PyTorch state dict"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not self._allow_tensors:
            raise pickle.UnpicklingError("unexpected persistent id outside the state dict")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        if view is not None:
            # (view_key, offset, view_size): a slice of the root storage ``key``.
            _view_key, offset, view_size = view
            return _StorageRef(str(key), storage_type.dtype, int(view_size), int(offset))
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _load_one(f: BinaryIO, path: Path, *, allow_tensors: bool = False) -> Any:
    try:
        return _RestrictedUnpickler(f, path, allow_tensors=allow_tensors).load()
    except InvalidInputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InvalidInputError(f"{path}: not a readable legacy PyTorch file ({exc})") from None


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray], path: Path, name: str) -> np.ndarray:
    root = storages.get(ref.storage.key)
    if root is None:
        raise InvalidInputError(f"{path}: tensor {name!r} references missing storage {ref.storage.key}")
    base = root[ref.storage.view_offset : ref.storage.view_offset + ref.storage.numel]
    if len(ref.size) != len(ref.stride) or any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride):
        raise InvalidInputError(f"{path}: tensor {name!r} has an invalid size/stride")
    numel = int(np.prod(ref.size, dtype=np.int64))
    if numel == 0:
        return np.zeros(ref.size, dtype=base.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if ref.offset < 0 or last >= base.size:
        raise InvalidInputError(
            f"{path}: tensor {name!r} (offset {ref.offset}, size {ref.size}, stride {ref.stride}) "
            f"reaches past its storage of {base.size} elements"
        )
    item = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[ref.offset :], shape=ref.size, strides=tuple(s * item for s in ref.stride), writeable=False
    )
    # A fresh C-contiguous copy in native byte order: callers own it, and the big
    # storage buffer can be freed. (np.ascontiguousarray would turn 0-d into 1-d.)
    return np.array(view, dtype=base.dtype.newbyteorder("="), order="C", copy=True)


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch state dict into numpy arrays, without torch.

    Parameters
    ----------
    path
        A ``.pth`` written by ``torch.save(..., _use_new_zipfile_serialization=False)``
        (the default before torch 1.6).

    Returns
    -------
    dict
        Parameter name -> array with the tensor's shape and dtype, in file order.

    Raises
    ------
    InvalidInputError
        The file is a zip-format (torch >= 1.6) checkpoint, has the wrong magic
        number or protocol, is truncated, or its pickle names a global outside
        the allow-list (e.g. ``os.system``) - which is refused before any call.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        raise InvalidInputError(
            f"{path}: this is a zip-format PyTorch checkpoint (torch >= 1.6); only the legacy format is "
            "supported - re-save it with torch.save(obj, f, _use_new_zipfile_serialization=False)"
        )
    f = io.BytesIO(data)
    magic = _load_one(f, path)
    if magic != LEGACY_MAGIC_NUMBER:
        raise InvalidInputError(f"{path}: not a legacy PyTorch file (bad magic number)")
    protocol = _load_one(f, path)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise InvalidInputError(
            f"{path}: unsupported legacy PyTorch protocol {protocol!r} (expected {LEGACY_PROTOCOL_VERSION})"
        )
    sys_info = _load_one(f, path)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise InvalidInputError(f"{path}: big-endian PyTorch files are not supported")
    state = _load_one(f, path, allow_tensors=True)
    if not isinstance(state, dict):
        raise InvalidInputError(f"{path}: expected a state dict, found {type(state).__name__}")
    keys = _load_one(f, path)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise InvalidInputError(f"{path}: malformed storage key list")

    dtypes: dict[str, np.dtype] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise InvalidInputError(f"{path}: entry {name!r} is not a tensor ({type(ref).__name__})")
        dtypes.setdefault(ref.storage.key, ref.storage.dtype)

    storages: dict[str, np.ndarray] = {}
    for key in keys:
        header = f.read(8)
        if len(header) != 8:
            raise InvalidInputError(f"{path}: truncated before storage {key}")
        (count,) = struct.unpack("<q", header)
        dtype = dtypes.get(key, np.dtype("u1"))
        nbytes = count * dtype.itemsize
        if count < 0 or f.tell() + nbytes > len(data):
            raise InvalidInputError(f"{path}: truncated storage {key} ({count} elements announced)")
        storages[key] = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
        f.seek(nbytes, io.SEEK_CUR)

    return {str(name): _materialise(ref, storages, path, str(name)) for name, ref in state.items()}
