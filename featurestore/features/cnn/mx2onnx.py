"""An MXNet checkpoint as an ONNX graph, built from the files alone (no MXNet).

:class:`MxNetwork` reads ``-symbol.json`` and ``.params``
(:mod:`featurestore.features.cnn.mxnet_format`), infers every layer's shape for
the model's input size, checks each weight against the shape its layer
expects, and translates the operators to ONNX (opset :data:`ONNX_OPSET`) with
the ``onnx`` package's helper API. :meth:`MxNetwork.to_onnx` keeps the nodes the
requested taps need and makes each tap a graph output, pooled in the graph
exactly as MXNet's exporter did for featurestore 0.1 (``GlobalAveragePool``
``<tap>__pool`` + ``Flatten`` ``<tap>__gap`` for maps, ``Identity``
``<tap>__out`` for vectors, ``Flatten`` ``<tap>__flat`` otherwise), so the
output names recorded in stores made before stay valid.

Operators (inference semantics, MXNet's defaults for absent attributes):
``Convolution`` (2-D; stride, pad, dilate, num_group incl. depthwise, no_bias),
``BatchNorm`` (eps 1e-3, fix_gamma true, moving statistics), ``Activation``
(relu, sigmoid, tanh, softrelu, softsign), ``LeakyReLU`` (leaky, elu, prelu,
selu), ``Pooling`` (max/avg, global, valid/full convention, count_include_pad),
``FullyConnected`` (flatten or not), ``Flatten``, ``Concat``, element-wise and
broadcast add/sub/mul/div, ``add_n``, scalar arithmetic, ``Pad``, ``clip``,
``Dropout`` and the other identities, ``SoftmaxOutput``/``softmax``/
``SoftmaxActivation`` and the regression outputs. Anything else is refused
with one line naming the operator, the layer and the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import InvalidInputError, ModelFilesMissingError, NotFoundError
from featurestore.features.cnn.mxnet_format import MxNode, MxParams, MxSymbol, read_params, read_symbol

__all__ = ["ONNX_OPSET", "INPUT_NAME", "MxNetwork", "OnnxTap", "UnsupportedOperatorError", "SUPPORTED_OPS",
           "param_shapes"]

ONNX_OPSET = 13
IR_VERSION = 8  # fixed (not the onnx package's newest), so every onnx release writes the same bytes
INPUT_NAME = "data"
BATCH = "batch"


_SUPPORTED_SUMMARY = ("Convolution, BatchNorm, Activation, LeakyReLU, Pooling, FullyConnected, Flatten, Concat, "
                      "element-wise/broadcast/scalar add sub mul div, add_n, Pad, clip, Dropout, softmax and the "
                      "output layers")


class UnsupportedOperatorError(InvalidInputError):
    """The symbol uses an operator (or a form of one) the reader cannot translate to ONNX."""

    def __init__(self, path: Path, node: MxNode, detail: str = ""):
        self.op = node.op
        what = f"operator {node.op}" + (f" ({detail})" if detail else "")
        super().__init__(
            f"{path}: {what} in layer {node.name!r} is not supported by featurestore's MXNet reader "
            f"(it reads {_SUPPORTED_SUMMARY}); export the network to ONNX yourself and register it",
            remedy="models-add-onnx", path=path
        )


@dataclass(frozen=True)
class OnnxTap:
    """One tap of a built graph: its output name, vector length and how it was pooled."""

    tap: str
    output: str
    dim: int
    pooling: str


@dataclass
class _Out:
    """What one MXNet node becomes: its output shape (batch 1), ONNX nodes and the constants they use."""

    shape: tuple[int, ...]
    nodes: list[Any] = field(default_factory=list)
    inits: dict[str, np.ndarray] = field(default_factory=dict)


# --- attribute parsing (MXNet stores every attribute as a string) -------------------------------
def _ints(node: MxNode, key: str, default: tuple[int, ...] = ()) -> tuple[int, ...]:
    raw = node.attrs.get(key)
    if raw is None or raw.strip() in ("", "None", "()", "[]"):
        return default
    return tuple(int(v) for v in re.findall(r"-?\d+", raw))


def _bool(node: MxNode, key: str, default: bool) -> bool:
    raw = node.attrs.get(key)
    return default if raw is None else raw.strip().lower() in ("true", "1")


def _float(node: MxNode, key: str, default: float) -> float:
    raw = node.attrs.get(key)
    return default if raw is None or raw == "None" else float(raw)


class _Ctx:
    """Shapes and weights seen so far while walking the symbol; collects weight mismatches."""

    def __init__(self, symbol: MxSymbol, params: MxParams, params_path: Path):
        self.symbol, self.params, self.params_path = symbol, params, params_path
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.problems: list[str] = []
        self.expected: dict[str, tuple[tuple[int, ...], bool]] = {}  # weight -> (shape, is aux)

    def shape(self, node: MxNode, k: int = 0) -> tuple[int, ...]:
        src = node.inputs[k][0]
        if src not in self.shapes:
            raise self.unsupported(node, f"input {k} ({self.symbol.nodes[src].name}) has no known value")
        return self.shapes[src]

    def tensor(self, node: MxNode, k: int = 0) -> str:
        return self.symbol.nodes[node.inputs[k][0]].name

    def unsupported(self, node: MxNode, detail: str = "") -> UnsupportedOperatorError:
        return UnsupportedOperatorError(self.symbol.path, node, detail)

    def fail(self, node: MxNode, why: str) -> InvalidInputError:
        return InvalidInputError(f"{self.symbol.path}: layer {node.name!r} ({node.op}): {why}")

    def weight(self, node: MxNode, k: int, expected: tuple[int, ...], out: _Out, aux: str = "") -> str:
        """Input ``k`` of ``node`` as an initializer, checked against ``expected``.

        ``aux``: the suffix of a running statistic (``moving_mean``); symbols saved by MXNet
        before 0.9 do not list those as inputs, and MXNet names them ``<layer>_<suffix>``.
        """
        if k < len(node.inputs):
            var = self.symbol.nodes[node.inputs[k][0]]
            if var.op != "null":
                raise self.unsupported(node, f"weight input {k} is computed by layer {var.name!r}")
            name = var.name
        elif aux:
            name = f"{node.name}_{aux}"
        else:
            raise self.fail(node, f"input {k} (a weight) is missing from the symbol")
        self.expected[name] = (expected, bool(aux))
        value = self.params.get(name)
        if value is None:
            self.problems.append(f"{name} missing")
        elif tuple(value.shape) != expected:
            self.problems.append(f"{name} has shape {tuple(value.shape)}, the symbol expects {expected}")
        else:
            out.inits[name] = np.asarray(value, dtype=np.float32)
        return name


def _node(op: str, inputs: Sequence[str], output: str, name: str | None = None, **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, list(inputs), [output], name=name or output, **attrs)


def _const(out: _Out, name: str, value: Any, dtype: Any = np.float32) -> str:
    out.inits[name] = np.asarray(value, dtype=dtype)
    return name


def _window(size: int, k: int, s: int, before: int, after: int, d: int = 1, ceil: bool = False) -> int:
    span = size + before + after - (d * (k - 1) + 1)
    return (math.ceil(span / s) if ceil else span // s) + 1


# --- operators ----------------------------------------------------------------------------------
def _conv(c: _Ctx, n: MxNode) -> _Out:
    kernel = _ints(n, "kernel")
    if len(kernel) != 2 or n.attrs.get("layout", "NCHW") not in ("NCHW", "None"):
        raise c.unsupported(n, f"only 2-D NCHW convolutions, not kernel {kernel}")
    stride, pad, dil = _ints(n, "stride", (1, 1)), _ints(n, "pad", (0, 0)), _ints(n, "dilate", (1, 1))
    groups, filters = int(_float(n, "num_group", 1)), int(_float(n, "num_filter", 0))
    x = c.shape(n)
    if len(x) != 4 or x[1] % groups or filters % groups:
        raise c.fail(n, f"input {x} does not fit {groups} groups of a 2-D convolution")
    hw = tuple(_window(x[2 + i], kernel[i], stride[i], pad[i], pad[i], dil[i]) for i in range(2))
    if min(hw) < 1:
        raise c.fail(n, f"a {kernel} kernel does not fit the {x[2]}x{x[3]} input")
    out = _Out((1, filters, *hw))
    ins = [c.tensor(n), c.weight(n, 1, (filters, x[1] // groups, *kernel), out)]
    if not _bool(n, "no_bias", False):
        ins.append(c.weight(n, 2, (filters,), out))
    out.nodes.append(_node("Conv", ins, n.name, kernel_shape=list(kernel), strides=list(stride),
                           pads=[pad[0], pad[1], pad[0], pad[1]], dilations=list(dil), group=groups))
    return out


def _batchnorm(c: _Ctx, n: MxNode) -> _Out:
    x = c.shape(n)
    if int(_float(n, "axis", 1)) != 1 or len(x) < 2:
        raise c.unsupported(n, "only channel axis 1")
    out, ch = _Out(x), (x[1],)
    gamma = c.weight(n, 1, ch, out)
    if _bool(n, "fix_gamma", True):  # MXNet's default: gamma is held at 1 whatever the file holds
        out.inits.pop(gamma, None)
        gamma = _const(out, f"{n.name}__gamma1", np.ones(ch))
    ins = [c.tensor(n), gamma, c.weight(n, 2, ch, out),
           c.weight(n, 3, ch, out, "moving_mean"), c.weight(n, 4, ch, out, "moving_var")]
    out.nodes.append(_node("BatchNormalization", ins, n.name, epsilon=_float(n, "eps", 1e-3)))
    return out


_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softrelu": "Softplus", "softsign": "Softsign"}


def _activation(c: _Ctx, n: MxNode) -> _Out:
    act = n.attrs.get("act_type", "")
    if act not in _ACTIVATIONS:
        raise c.unsupported(n, f"act_type {act!r}")
    return _Out(c.shape(n), [_node(_ACTIVATIONS[act], [c.tensor(n)], n.name)])


def _leaky(c: _Ctx, n: MxNode) -> _Out:
    act, slope, x = n.attrs.get("act_type", "leaky"), _float(n, "slope", 0.25), c.shape(n)
    out = _Out(x)
    if act == "leaky":
        out.nodes.append(_node("LeakyRelu", [c.tensor(n)], n.name, alpha=slope))
    elif act == "elu":
        out.nodes.append(_node("Elu", [c.tensor(n)], n.name, alpha=slope))
    elif act == "selu":
        out.nodes.append(_node("Selu", [c.tensor(n)], n.name))
    elif act == "prelu":
        gamma = c.weight(n, 1, (x[1],), out)
        if gamma in out.inits:  # one slope per channel, broadcast over the spatial axes
            out.inits[gamma] = out.inits[gamma].reshape((x[1],) + (1,) * (len(x) - 2))
        out.nodes.append(_node("PRelu", [c.tensor(n), gamma], n.name))
    else:
        raise c.unsupported(n, f"act_type {act!r}")
    return out


def _pooling(c: _Ctx, n: MxNode) -> _Out:
    kind, x = n.attrs.get("pool_type", "max"), c.shape(n)
    if kind not in ("max", "avg") or len(x) != 4:
        raise c.unsupported(n, f"pool_type {kind!r} on a {len(x)}-D input")
    if _bool(n, "global_pool", False):
        op = "GlobalMaxPool" if kind == "max" else "GlobalAveragePool"
        return _Out((*x[:2], 1, 1), [_node(op, [c.tensor(n)], n.name)])
    convention = n.attrs.get("pooling_convention", "valid")
    if convention not in ("valid", "full"):
        raise c.unsupported(n, f"pooling_convention {convention!r}")
    kernel, stride, pad = _ints(n, "kernel"), _ints(n, "stride", (1, 1)), _ints(n, "pad", (0, 0))
    if len(kernel) != 2:
        raise c.unsupported(n, f"kernel {kernel}")
    full = convention == "full"
    hw = tuple(_window(x[2 + i], kernel[i], stride[i], pad[i], pad[i], ceil=full) for i in range(2))
    if min(hw) < 1:
        raise c.fail(n, f"a {kernel} window does not fit the {x[2]}x{x[3]} input")
    attrs: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(stride),
                             "pads": [pad[0], pad[1], pad[0], pad[1]], "ceil_mode": int(full)}
    if kind == "avg":
        attrs["count_include_pad"] = int(_bool(n, "count_include_pad", True))
    op = "MaxPool" if kind == "max" else "AveragePool"
    return _Out((*x[:2], *hw), [_node(op, [c.tensor(n)], n.name, **attrs)])


def _fully_connected(c: _Ctx, n: MxNode) -> _Out:
    hidden, x = int(_float(n, "num_hidden", 0)), c.shape(n)
    if _bool(n, "flatten", True):
        flat = int(np.prod(x[1:]))
        out = _Out((1, hidden))
        src = c.tensor(n)
        if len(x) != 2:
            out.nodes.append(_node("Flatten", [src], f"{n.name}__in", axis=1))
            src = f"{n.name}__in"
        ins = [src, c.weight(n, 1, (hidden, flat), out)]
        if not _bool(n, "no_bias", False):
            ins.append(c.weight(n, 2, (hidden,), out))
        out.nodes.append(_node("Gemm", ins, n.name, transB=1))
        return out
    out = _Out((*x[:-1], hidden))
    w = c.weight(n, 1, (hidden, x[-1]), out)
    if w in out.inits:
        out.inits[f"{w}__t"] = np.ascontiguousarray(out.inits.pop(w).T)
    matmul = n.name if _bool(n, "no_bias", False) else f"{n.name}__mm"
    out.nodes.append(_node("MatMul", [c.tensor(n), f"{w}__t"], matmul))
    if matmul != n.name:
        out.nodes.append(_node("Add", [matmul, c.weight(n, 2, (hidden,), out)], n.name))
    return out


def _flatten(c: _Ctx, n: MxNode) -> _Out:
    x = c.shape(n)
    return _Out((x[0], int(np.prod(x[1:]))), [_node("Flatten", [c.tensor(n)], n.name, axis=1)])


def _concat(c: _Ctx, n: MxNode) -> _Out:
    shapes = [c.shape(n, k) for k in range(len(n.inputs))]
    axis = int(_float(n, "dim", 1))
    rank = len(shapes[0])
    axis = axis + rank if axis < 0 else axis
    rest = {s[:axis] + s[axis + 1 :] for s in shapes}
    if len(rest) != 1 or any(len(s) != rank for s in shapes):
        raise c.fail(n, f"inputs of shapes {shapes} cannot be joined on axis {axis}")
    shape = (*shapes[0][:axis], sum(s[axis] for s in shapes), *shapes[0][axis + 1 :])
    return _Out(shape, [_node("Concat", [c.tensor(n, k) for k in range(len(n.inputs))], n.name, axis=axis)])


def _binary(op: str) -> Callable[[_Ctx, MxNode], _Out]:
    def convert(c: _Ctx, n: MxNode) -> _Out:
        try:
            shape = tuple(int(v) for v in np.broadcast_shapes(c.shape(n, 0), c.shape(n, 1)))
        except ValueError:
            raise c.fail(n, f"inputs of shapes {c.shape(n, 0)} and {c.shape(n, 1)} do not broadcast") from None
        return _Out(shape, [_node(op, [c.tensor(n, 0), c.tensor(n, 1)], n.name)])

    return convert


def _scalar(op: str) -> Callable[[_Ctx, MxNode], _Out]:
    def convert(c: _Ctx, n: MxNode) -> _Out:
        out = _Out(c.shape(n))
        value = _const(out, f"{n.name}__scalar", _float(n, "scalar", 0.0))
        out.nodes.append(_node(op, [c.tensor(n), value], n.name))
        return out

    return convert


def _add_n(c: _Ctx, n: MxNode) -> _Out:
    shapes = {c.shape(n, k) for k in range(len(n.inputs))}
    if len(shapes) != 1:
        raise c.fail(n, f"inputs of different shapes {sorted(shapes)}")
    return _Out(shapes.pop(), [_node("Sum", [c.tensor(n, k) for k in range(len(n.inputs))], n.name)])


def _unary(op: str) -> Callable[[_Ctx, MxNode], _Out]:
    def convert(c: _Ctx, n: MxNode) -> _Out:
        return _Out(c.shape(n), [_node(op, [c.tensor(n)], n.name)])

    return convert


def _dropout(c: _Ctx, n: MxNode) -> _Out:
    if n.attrs.get("mode", "training") != "training":  # mode=always drops at inference too
        raise c.unsupported(n, f"mode {n.attrs['mode']!r}")
    return _unary("Identity")(c, n)


def _softmax_output(c: _Ctx, n: MxNode) -> _Out:
    x = c.shape(n)
    if _bool(n, "preserve_shape", False):
        axis = -1
    elif _bool(n, "multi_output", False) or len(x) == 2:
        axis = 1
    else:
        raise c.unsupported(n, f"a {len(x)}-D input without multi_output")
    return _Out(x, [_node("Softmax", [c.tensor(n)], n.name, axis=axis)])


def _softmax(c: _Ctx, n: MxNode) -> _Out:
    if _float(n, "temperature", 1.0) != 1.0 or _bool(n, "use_length", False):
        raise c.unsupported(n, "temperature or use_length")
    return _Out(c.shape(n), [_node("Softmax", [c.tensor(n)], n.name, axis=int(_float(n, "axis", -1)))])


def _softmax_activation(c: _Ctx, n: MxNode) -> _Out:
    x = c.shape(n)
    if n.attrs.get("mode", "instance") == "instance" and len(x) != 2:
        raise c.unsupported(n, f"mode instance on a {len(x)}-D input")
    return _Out(x, [_node("Softmax", [c.tensor(n)], n.name, axis=1)])


def _clip(c: _Ctx, n: MxNode) -> _Out:
    out = _Out(c.shape(n))
    lo = _const(out, f"{n.name}__min", _float(n, "a_min", -math.inf))
    hi = _const(out, f"{n.name}__max", _float(n, "a_max", math.inf))
    out.nodes.append(_node("Clip", [c.tensor(n), lo, hi], n.name))
    return out


def _pad(c: _Ctx, n: MxNode) -> _Out:
    x, widths, mode = c.shape(n), _ints(n, "pad_width"), n.attrs.get("mode", "constant")
    if len(widths) != 2 * len(x) or mode not in ("constant", "edge", "reflect"):
        raise c.unsupported(n, f"mode {mode!r} with pad_width {widths}")
    before, after = widths[0::2], widths[1::2]
    out = _Out(tuple(d + b + a for d, b, a in zip(x, before, after, strict=True)))
    ins = [c.tensor(n), _const(out, f"{n.name}__pads", [*before, *after], np.int64)]
    if mode == "constant":
        ins.append(_const(out, f"{n.name}__value", _float(n, "constant_value", 0.0)))
    out.nodes.append(_node("Pad", ins, n.name, mode=mode))
    return out


_OPS: dict[str, Callable[[_Ctx, MxNode], _Out]] = {
    "Convolution": _conv,
    "BatchNorm": _batchnorm,
    "Activation": _activation,
    "LeakyReLU": _leaky,
    "Pooling": _pooling,
    "FullyConnected": _fully_connected,
    "Flatten": _flatten,
    "flatten": _flatten,
    "Concat": _concat,
    "concat": _concat,
    **dict.fromkeys(("elemwise_add", "broadcast_add", "broadcast_plus", "_Plus", "_plus", "_add"), _binary("Add")),
    **dict.fromkeys(("elemwise_sub", "broadcast_sub", "broadcast_minus", "_Minus", "_minus", "_sub"),
                    _binary("Sub")),
    **dict.fromkeys(("elemwise_mul", "broadcast_mul", "_Mul", "_mul"), _binary("Mul")),
    **dict.fromkeys(("elemwise_div", "broadcast_div", "_Div", "_div"), _binary("Div")),
    "_plus_scalar": _scalar("Add"),
    "_minus_scalar": _scalar("Sub"),
    "_mul_scalar": _scalar("Mul"),
    "_div_scalar": _scalar("Div"),
    "add_n": _add_n,
    "ElementWiseSum": _add_n,
    **dict.fromkeys(("_copy", "identity", "BlockGrad", "stop_gradient", "LinearRegressionOutput",
                     "MAERegressionOutput"), _unary("Identity")),
    "LogisticRegressionOutput": _unary("Sigmoid"),
    "Dropout": _dropout,
    "SoftmaxOutput": _softmax_output,
    "Softmax": _softmax_output,  # the pre-0.9 name of SoftmaxOutput
    "softmax": _softmax,
    "SoftmaxActivation": _softmax_activation,
    "clip": _clip,
    "Pad": _pad,
    "pad": _pad,
}
SUPPORTED_OPS = frozenset(_OPS)


def _check_ops(symbol: MxSymbol) -> None:
    unknown = [n for n in symbol.nodes if n.op != "null" and n.op not in _OPS]
    if unknown:
        raise UnsupportedOperatorError(symbol.path, unknown[0])


def _convert(symbol: MxSymbol, params: MxParams, params_path: Path, size: tuple[int, int]
             ) -> tuple[_Ctx, dict[int, _Out]]:
    """Walk the symbol in order: every layer's shape and ONNX nodes; weight problems in ``ctx.problems``."""
    _check_ops(symbol)
    names = [n.name for n in symbol.nodes if n.op != "null"]
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise InvalidInputError(f"{symbol.path}: two layers are named {dup!r}; layer names must be unique")
    if not any(n.op == "null" and n.name == INPUT_NAME for n in symbol.nodes):
        raise InvalidInputError(f"{symbol.path}: the symbol has no {INPUT_NAME!r} input")
    ctx = _Ctx(symbol, params, params_path)
    w, h = size
    ctx.shapes[next(n.index for n in symbol.nodes if n.name == INPUT_NAME)] = (1, 3, h, w)
    converted: dict[int, _Out] = {}
    for node in symbol.nodes:
        if node.op == "null":
            continue
        bad = [k for _, k in node.inputs if k != 0]
        if bad:
            raise ctx.unsupported(node, f"uses output {bad[0]} of a multi-output layer")
        converted[node.index] = out = _OPS[node.op](ctx, node)
        ctx.shapes[node.index] = out.shape
    return ctx, converted


def param_shapes(symbol_path: str | Path, size: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every weight the symbol needs for a ``(width, height)`` input: name -> (shape, is aux), in graph order.

    For writing a checkpoint without MXNet (the tests' random networks).
    """
    symbol = read_symbol(symbol_path)
    ctx, _ = _convert(symbol, MxParams({}, {}), Path("-"), size)
    return ctx.expected


def _ancestors(symbol: MxSymbol, start: Sequence[int]) -> set[int]:
    """The nodes ``start`` and everything they are computed from."""
    todo, seen = list(start), set()
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(src for src, _ in symbol.nodes[i].inputs)
    return seen


class MxNetwork:
    """An MXNet checkpoint read without MXNet, its shapes inferred for one input size.

    Build it with :meth:`load`; :meth:`layers` lists the tap-able layers,
    :meth:`to_onnx` builds the graph for some of them.
    """

    def __init__(self, symbol: MxSymbol, params_path: Path, size: tuple[int, int],
                 converted: dict[int, _Out]):
        self.symbol, self.params_path, self.size = symbol, params_path, size
        # Like MXNet, only the layers the symbol's outputs depend on (a file may hold dead nodes).
        heads = [i for i, _ in symbol.heads] or [max(converted, default=0)]
        live = _ancestors(symbol, heads)
        self._converted = {i: out for i, out in converted.items() if i in live}
        self._by_name = {symbol.nodes[i].name: i for i in self._converted}

    @classmethod
    def load(cls, symbol_path: str | Path, params_path: str | Path, size: tuple[int, int]) -> MxNetwork:
        """Read and check a checkpoint for a ``size = (width, height)`` input.

        Raises
        ------
        ModelFilesMissingError
            A file does not exist.
        UnsupportedOperatorError
            The symbol uses an operator outside :data:`SUPPORTED_OPS` (an ``InvalidInputError``).
        InvalidInputError
            A file cannot be read, is truncated, or the weights do not fit the symbol's shapes.
        """
        missing = [str(f) for f in (Path(symbol_path), Path(params_path)) if not f.is_file()]
        if missing:
            raise ModelFilesMissingError(f"model files not found: {', '.join(missing)}; give the checkpoint's "
                                         "<prefix>-symbol.json and <prefix>-<epoch>.params")
        symbol, params_path = read_symbol(symbol_path), Path(params_path)
        _check_ops(symbol)  # before reading the weights: the operator is the first thing to fix
        ctx, converted = _convert(symbol, read_params(params_path), params_path, size)
        if ctx.problems:
            shown = "; ".join(ctx.problems[:5]) + (
                f"; and {len(ctx.problems) - 5} more" if len(ctx.problems) > 5 else "")
            raise InvalidInputError(f"{params_path} does not match {symbol.path.name}: {shown}. "
                                    "Use the .params file saved with this symbol.")
        return cls(symbol, params_path, size, converted)

    def layers(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tap-able layer with its per-image output shape (no batch dim), in graph order."""
        return [(self.symbol.nodes[i].name, out.shape[1:]) for i, out in self._converted.items()]

    def _needed(self, taps: Sequence[str]) -> list[int]:
        """Indices of the layers the taps depend on, in graph order."""
        return sorted(i for i in _ancestors(self.symbol, [self._by_name[t] for t in taps]) if i in self._converted)

    def to_onnx(self, taps: Sequence[str]) -> tuple[Any, list[OnnxTap]]:
        """An ONNX model (opset 13, dynamic batch, weights as initializers) whose outputs are the taps.

        Raises
        ------
        NotFoundError
            A tap is not a layer of the symbol (the message lists the layers).
        """
        from onnx import TensorProto, helper, numpy_helper

        shapes = dict(self.layers())
        for tap in taps:
            if tap not in shapes:
                raise NotFoundError("layer", tap, shapes, hint=f"see the layers of {self.symbol.path.name}")
        nodes, inits = [], {}
        for i in self._needed(taps):
            nodes.extend(self._converted[i].nodes)
            inits.update(self._converted[i].inits)
        outputs, described = [], []
        for tap in taps:
            shape = shapes[tap]
            if len(shape) == 3:
                nodes.append(_node("GlobalAveragePool", [tap], f"{tap}__pool"))
                nodes.append(_node("Flatten", [f"{tap}__pool"], f"{tap}__gap", axis=1))
                out, dim, pooling = f"{tap}__gap", shape[0], "global-average"
            elif len(shape) == 1:
                nodes.append(_node("Identity", [tap], f"{tap}__out"))
                out, dim, pooling = f"{tap}__out", shape[0], "none"
            else:
                nodes.append(_node("Flatten", [tap], f"{tap}__flat", axis=1))
                out, dim, pooling = f"{tap}__flat", int(np.prod(shape)), "flatten"
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [BATCH, int(dim)]))
            described.append(OnnxTap(tap, out, int(dim), pooling))
        w, h = self.size
        graph = helper.make_graph(
            nodes, self.symbol.path.stem,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH, 3, h, w])], outputs,
            initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                                  producer_name="featurestore")
        model.ir_version = IR_VERSION
        return model, described
