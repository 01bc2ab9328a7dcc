"""MXNet checkpoint files read and written as a file format, without MXNet.

A checkpoint is ``<prefix>-symbol.json`` (the graph) and ``<prefix>-<epoch>.params``
(the weights). Both are read here with the standard library and numpy, the
way :mod:`featurestore.features.cnn.torch_pth` reads ``.pth`` files, so no
MXNet runtime is needed to register or run one
(:mod:`featurestore.features.cnn.mx2onnx` turns them into ONNX).

The ``.params`` file is MXNet's NDArray list (``mx.nd.save``), all integers
little-endian::

    uint64 0x112 (list magic)   uint64 0 (reserved)
    uint64 count, then count arrays:
        uint32 magic            0xF993FAC9 (v2) or 0xF993FACA (v3); 0xF993FAC8 (v1);
                                anything else is the ndim of a pre-v1 array
        int32  storage type     v2/v3 only; 0 = dense (sparse arrays are refused)
        shape                   int32 ndim + int64 dims (pre-v1: uint32 dims)
        int32 dev_type, int32 dev_id      (where it was saved; ignored)
        int32 dtype             0 f32, 1 f64, 2 f16, 3 u8, 4 i32, 5 i8, 6 i64
        raw data, C order
    uint64 count, then count names: uint64 length + UTF-8 bytes ("arg:conv_weight", "aux:bn_moving_var")

:func:`params_bytes` writes the same bytes as ``mx.nd.save`` for float32
arrays, so checkpoints made here load in MXNet (and the parity tests compare).

The symbol JSON holds ``nodes`` (``op``, ``name``, attributes as strings,
``inputs`` as ``[node, output, version]``; ``op == "null"`` for variables:
the input ``data`` and the weights) in topological order, and ``heads``.
Checkpoints from MXNet before 0.9 spell the attributes ``param``/``attr``
instead of ``attrs``; both are read. :class:`SymbolBuilder` writes a graph
MXNet itself loads, for the built-in networks and the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import InvalidInputError, ModelFilesMissingError
from featurestore.io.atomic import write_bytes_atomic

__all__ = ["MxParams", "MxNode", "MxSymbol", "SymbolBuilder", "params_bytes", "read_params", "read_symbol",
           "write_params"]

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_DTYPES = {0: "<f4", 1: "<f8", 2: "<f2", 3: "u1", 4: "<i4", 5: "i1", 6: "<i8"}
_CPU = (1, 0)  # dev_type, dev_id of mx.cpu(), what mx.nd.save records for CPU arrays
_MAX_NDIM = 32


@dataclass(frozen=True)
class MxParams:
    """The weights of a checkpoint: ``arg`` (learned) and ``aux`` (batch-norm statistics) arrays by name."""

    arg: dict[str, np.ndarray]
    aux: dict[str, np.ndarray]

    def get(self, name: str) -> np.ndarray | None:
        return self.arg.get(name, self.aux.get(name))


class _Reader:
    """Bounds-checked reads over the file's bytes: a short file is a one-line error, never a crash."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidInputError(
                f"{self.path}: truncated MXNet params file ({len(self.data)} bytes, {what} needs {n} more at "
                f"offset {self.pos}); copy the .params file again"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def _read_array(r: _Reader, index: int) -> np.ndarray:
    (magic,) = r.unpack("I", f"array {index}")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", f"array {index}'s storage type")
        if stype != 0:
            raise InvalidInputError(f"{r.path}: array {index} is sparse (storage type {stype}); only dense "
                                    "checkpoints are read: save the params with dense arrays")
    if magic in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        (ndim,) = r.unpack("i", f"array {index}'s shape")
        dim_fmt = "q"
    else:  # pre-v1: the magic is the ndim and the dims are uint32
        ndim, dim_fmt = magic, "I"
    if ndim <= 0:  # an empty (none) array: nothing follows
        return np.zeros((0,), np.float32)
    if ndim > _MAX_NDIM:
        raise InvalidInputError(f"{r.path}: not an MXNet params file (array {index} claims {ndim} dimensions)")
    shape = r.unpack(f"{ndim}{dim_fmt}", f"array {index}'s shape")
    if min(shape) < 0:
        raise InvalidInputError(f"{r.path}: not an MXNet params file (array {index} has shape {shape})")
    r.unpack("ii", f"array {index}'s context")
    (type_flag,) = r.unpack("i", f"array {index}'s dtype")
    if type_flag not in _DTYPES:
        raise InvalidInputError(f"{r.path}: array {index} has an unsupported dtype code {type_flag}")
    dtype = np.dtype(_DTYPES[type_flag])
    count = int(np.prod(shape, dtype=np.int64))
    raw = r.take(count * dtype.itemsize, f"array {index}'s {count} values")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def read_params(path: str | Path) -> MxParams:
    """Read a ``.params`` file (``arg:``/``aux:`` names) into float arrays, checking every length.

    Raises
    ------
    ModelFilesMissingError
        The file does not exist.
    InvalidInputError
        Not an MXNet NDArray list, truncated, sparse, or a name without the ``arg:``/``aux:`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFilesMissingError(f"model files not found: {path}")
    r = _Reader(path.read_bytes(), path)
    if len(r.data) < 16 or r.unpack("QQ", "the header")[0] != LIST_MAGIC:
        raise InvalidInputError(f"{path}: not an MXNet params file (no NDArray list header); give the "
                                "checkpoint's <prefix>-<epoch>.params")
    (count,) = r.unpack("Q", "the array count")
    if count > len(r.data):
        raise InvalidInputError(f"{path}: not an MXNet params file (claims {count} arrays)")
    arrays = [_read_array(r, i) for i in range(count)]
    (n_names,) = r.unpack("Q", "the name count")
    if n_names != count:
        raise InvalidInputError(f"{path}: not a checkpoint params file ({count} arrays but {n_names} names)")
    names = []
    for i in range(n_names):
        (length,) = r.unpack("Q", f"name {i}")
        names.append(r.take(length, f"name {i}").decode("utf-8", errors="replace"))
    if r.pos != len(r.data):
        raise InvalidInputError(f"{path}: {len(r.data) - r.pos} unexpected bytes after the last name")
    arg: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    for key, value in zip(names, arrays, strict=True):
        kind, _, name = key.partition(":")
        if kind not in ("arg", "aux") or not name:
            raise InvalidInputError(
                f"{path}: not an MXNet checkpoint params file (key {key!r} lacks an arg:/aux: prefix)"
            )
        (arg if kind == "arg" else aux)[name] = value
    return MxParams(arg, aux)


def params_bytes(arg: dict[str, np.ndarray], aux: dict[str, np.ndarray]) -> bytes:
    """The ``.params`` file for these arrays (stored as float32, as ``mx.nd.save`` would write them)."""
    items = [(f"arg:{k}", v) for k, v in arg.items()] + [(f"aux:{k}", v) for k, v in aux.items()]
    out = [struct.pack("<QQQ", LIST_MAGIC, 0, len(items))]
    for _, value in items:
        a = np.ascontiguousarray(np.atleast_1d(value), dtype="<f4")  # MXNet 1.x reads 0-d as "no array"
        out.append(struct.pack(f"<Iii{a.ndim}q", V2_MAGIC, 0, a.ndim, *a.shape))
        out.append(struct.pack("<iii", *_CPU, 0))
        out.append(a.tobytes())
    out.append(struct.pack("<Q", len(items)))
    for key, _ in items:
        raw = key.encode("utf-8")
        out.append(struct.pack("<Q", len(raw)) + raw)
    return b"".join(out)


def write_params(path: str | Path, arg: dict[str, np.ndarray], aux: dict[str, np.ndarray]) -> Path:
    """Write a ``.params`` file atomically (temp file, fsync, rename); returns its path."""
    path = Path(path)
    write_bytes_atomic(path, params_bytes(arg, aux))
    return path


# --- the symbol ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MxNode:
    """One node of a symbol: ``op`` ("null" for a variable), its attributes and its inputs ``(node, output)``."""

    index: int
    op: str
    name: str
    attrs: dict[str, str]
    inputs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MxSymbol:
    """A parsed ``-symbol.json``: nodes in topological order and the graph's outputs."""

    path: Path
    nodes: tuple[MxNode, ...]
    heads: tuple[tuple[int, int], ...] = field(default=())


def _bad_symbol(path: Path, why: str) -> InvalidInputError:
    return InvalidInputError(f"{path}: not a readable MXNet symbol file ({why}); give the checkpoint's "
                             "<prefix>-symbol.json")


def _node(path: Path, index: int, raw: Any) -> MxNode:
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str) or not isinstance(raw.get("name"), str):
        raise _bad_symbol(path, f"node {index} lacks op or name")
    attrs: dict[str, str] = {}
    for key in ("param", "attr", "attrs"):  # MXNet < 0.9 wrote param/attr, later versions attrs
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise _bad_symbol(path, f"node {raw['name']}'s {key} is not an object")
        attrs.update({str(k): str(v) for k, v in value.items()})
    inputs = []
    for ref in raw.get("inputs") or []:
        if not (isinstance(ref, list) and len(ref) >= 2 and all(isinstance(v, int) for v in ref)
                and 0 <= ref[0] < index):
            raise _bad_symbol(path, f"node {raw['name']} has an input {ref!r} that is not an earlier node")
        inputs.append((int(ref[0]), int(ref[1])))
    return MxNode(index, raw["op"], raw["name"], attrs, tuple(inputs))


def read_symbol(path: str | Path) -> MxSymbol:
    """Parse a ``-symbol.json`` file (no operator is interpreted here).

    Raises
    ------
    ModelFilesMissingError
        The file does not exist.
    InvalidInputError
        Not JSON, or not an MXNet graph (nodes out of order, inputs pointing nowhere).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFilesMissingError(f"model files not found: {path}")
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_symbol(path, f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not doc["nodes"]:
        raise _bad_symbol(path, "no 'nodes' list")
    nodes = tuple(_node(path, i, raw) for i, raw in enumerate(doc["nodes"]))
    heads = []
    for ref in doc.get("heads") or []:
        if isinstance(ref, list) and ref and isinstance(ref[0], int) and 0 <= ref[0] < len(nodes):
            heads.append((int(ref[0]), int(ref[1]) if len(ref) > 1 else 0))
    return MxSymbol(path, nodes, tuple(heads))


# MXNet creates these variables for an operator's unnamed inputs, in this order (batch norm's
# moving_mean and moving_var are auxiliary states, saved with an aux: prefix).
_AUTO_INPUTS: dict[str, tuple[str, ...]] = {
    "Convolution": ("weight", "bias"),
    "FullyConnected": ("weight", "bias"),
    "BatchNorm": ("gamma", "beta", "moving_mean", "moving_var"),
    "SoftmaxOutput": ("label",),
}


def _attr_str(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)


class SymbolBuilder:
    """Build an MXNet symbol JSON in pure Python (the subset of ``mx.sym`` our networks use).

    ``op`` adds a node and, like ``mx.sym``, the weight variables it needs
    (``<name>_weight``, ``<name>_bias`` unless ``no_bias``; batch norm's
    ``_gamma``, ``_beta``, ``_moving_mean``, ``_moving_var``; a prelu's ``_gamma``;
    ``SoftmaxOutput``'s ``_label``). Returns the index of the new node, to be used as an input.
    """

    def __init__(self) -> None:
        self._nodes: list[dict[str, Any]] = []

    def var(self, name: str) -> int:
        self._nodes.append({"op": "null", "name": name, "inputs": []})
        return len(self._nodes) - 1

    def op(self, op: str, name: str, inputs: Iterable[int], **attrs: Any) -> int:
        refs = [[i, 0, 0] for i in inputs]
        auto = _AUTO_INPUTS.get(op, ())
        if op == "LeakyReLU" and attrs.get("act_type") == "prelu":
            auto = ("gamma",)
        for suffix in auto:
            if suffix == "bias" and str(attrs.get("no_bias", False)) == "True":
                continue
            refs.append([self.var(f"{name}_{suffix}"), 0, 0])
        node: dict[str, Any] = {"op": op, "name": name}
        if attrs:
            node["attrs"] = {k: _attr_str(v) for k, v in sorted(attrs.items())}
        node["inputs"] = refs
        self._nodes.append(node)
        return len(self._nodes) - 1

    def to_json(self, *heads: int) -> str:
        """The symbol file's text with outputs ``heads`` (the format ``mx.sym.load`` reads)."""
        doc = {
            "nodes": self._nodes,
            "arg_nodes": [i for i, n in enumerate(self._nodes) if n["op"] == "null"],
            "heads": [[h, 0, 0] for h in heads],
            "attrs": {"mxnet_version": ["int", 10901]},
        }
        return json.dumps(doc, indent=1)
