"""Run a standard MXNet checkpoint (``-symbol.json`` + ``.params``) on MXNet, the reference runtime.

MXNet is optional (``pip install "featurestore[mxnet]"``): only
:func:`import_mxnet` imports it, when the ``mxnet`` runtime is asked for, so
the library imports and runs on onnxruntime without it. The rest of this
module (:class:`Preprocess`, :class:`CNNExtractor`, grid pooling) serves both
runtimes.

The network runs through the symbolic executor (``mx.mod.Module``): on a
2-core CPU it is several times faster than a hybridized Gluon block for the
same graph (see ``bench/bench_cnn_forward.py``), and with
``MXNET_SUBGRAPH_BACKEND=MKLDNN`` the conv + batch-norm + activation chains are
fused. Taps (internal layer outputs) are grouped into one graph, and 4-D taps
are averaged over height and width *inside* the graph, so one forward pass
returns every requested ``(n, C)`` matrix. With ``grid`` > 1 a 4-D tap is
instead averaged over each cell of a ``grid`` x ``grid`` partition of its map
(:func:`grid_pool`, after the graph, the same code on both runtimes), keeping
where in the image a pattern is: ``(n, C * grid * grid)``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from featurestore.errors import (
    InvalidInputError,
    ModelFilesMissingError,
    NotFoundError,
    RuntimeUnavailableError,
)
from featurestore.features.base import Extractor, FeatureSpec

__all__ = ["GRID_MAX", "Preprocess", "CheckpointModel", "CNNExtractor", "TapModel", "check_grid", "grid_dim",
           "grid_pool", "import_mxnet"]

GRID_MAX = 8
"""Largest ``grid`` (cells per side) of grid pooling: 64 cells per channel."""


def import_mxnet() -> Any:
    """Import mxnet, selecting the MKLDNN (oneDNN) graph-fusion backend by default.

    ``MXNET_SUBGRAPH_BACKEND`` is only set when the user has not chosen one
    (``MXNET_SUBGRAPH_BACKEND=NONE`` turns fusion off). MXNet reads it when an
    executor is bound, so it must be in the environment before ``bind``.
    """
    os.environ.setdefault("MXNET_SUBGRAPH_BACKEND", "MKLDNN")
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # no "backend activated" line per bind
    try:
        import mxnet as mx
    except (ImportError, AttributeError, OSError) as exc:  # absent, or broken by a numpy >= 1.24 (np.bool)
        raise RuntimeUnavailableError(
            f'the mxnet runtime needs MXNet, which cannot be imported ({exc}): pip install "featurestore[mxnet]" '
            "(MXNet 1.9.1 needs numpy < 1.24), or use the default onnxruntime runtime"
        ) from None
    return mx


@dataclass(frozen=True)
class Preprocess:
    """How a decoded RGB image becomes the network's input tensor.

    Parameters
    ----------
    size
        ``(width, height)`` of the network input.
    resize
        ``"stretch"`` resizes to ``size`` ignoring the aspect ratio;
        ``"center-crop"`` scales the image so it covers ``size`` (shorter side
        first) and crops the centre.
    mean, std
        Per-channel values in 0..255 units, in the order of ``channels``:
        ``x = (pixel - mean) / std``.
    channels
        Channel order of the network input, ``"RGB"`` or ``"BGR"``.
    """

    size: tuple[int, int] = (224, 224)
    resize: Literal["stretch", "center-crop"] = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: Literal["RGB", "BGR"] = "RGB"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise InvalidInputError(f"preprocess size must be (width, height) > 0, got {self.size!r}")
        if self.resize not in ("stretch", "center-crop"):
            raise InvalidInputError(
                f"preprocess resize must be 'stretch' or 'center-crop', got {self.resize!r}"
            )
        if self.channels not in ("RGB", "BGR"):
            raise InvalidInputError(f"preprocess channels must be 'RGB' or 'BGR', got {self.channels!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise InvalidInputError("preprocess mean and std need 3 values each, std non-zero")

    def to_params(self) -> dict[str, Any]:
        """JSON-serialisable form recorded in the catalog."""
        d = asdict(self)
        d["size"] = [int(v) for v in self.size]
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        return d

    def apply(self, image: Image.Image) -> np.ndarray:
        """Resize and normalise one image to a ``(3, H, W)`` float32 array (thread-safe)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = self.size
        if self.resize == "stretch":
            image = image.resize((w, h), Image.Resampling.BILINEAR)
        else:
            scale = max(w / image.width, h / image.height)
            rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
            image = image.resize((rw, rh), Image.Resampling.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            image = image.crop((left, top, left + w, top + h))
        arr = np.asarray(image)  # (H, W, 3) uint8
        if self.channels == "BGR":
            arr = arr[:, :, ::-1]
        # One float32 copy in (3, H, W) order, normalised in place: the same float32 operations as
        # (arr - mean) / std on an HWC copy (bit-identical), a third of the time (issue 12).
        out = np.empty((3, *arr.shape[:2]), dtype=np.float32)
        out[...] = arr.transpose(2, 0, 1)
        out -= np.asarray(self.mean, np.float32)[:, None, None]
        out /= np.asarray(self.std, np.float32)[:, None, None]
        return out


def _split_params(loaded: dict[str, Any], params_path: Path) -> tuple[dict, dict]:
    arg, aux = {}, {}
    for key, value in loaded.items():
        kind, _, name = key.partition(":")
        if kind == "arg":
            arg[name] = value
        elif kind == "aux":
            aux[name] = value
        else:
            raise InvalidInputError(
                f"{params_path}: not an MXNet checkpoint params file (key {key!r} lacks an arg:/aux: prefix)"
            )
    return arg, aux


class CheckpointModel:
    """An MXNet checkpoint bound for inference with a fixed set of taps.

    Build it with :meth:`load`. :meth:`prepare` is thread-safe; :meth:`forward`
    serialises calls with a lock (one executor).
    """

    runtime = "mxnet"  # recorded with the shards it computes

    def __init__(self) -> None:  # use CheckpointModel.load
        self.symbol_path: Path
        self.params_path: Path
        self.preprocess: Preprocess
        self.taps: list[str]
        self.batch_size: int
        self.grid = 1
        self._layers: list[tuple[str, tuple[int, ...]]] = []
        self._tap_dims: dict[str, int] = {}
        self._tap_pooling: dict[str, str] = {}
        self._module: Any = None
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        symbol_path: str | Path,
        params_path: str | Path,
        preprocess: Preprocess,
        taps: Sequence[str],
        batch_size: int = 32,
        grid: int = 1,
    ) -> CheckpointModel:
        """Load a checkpoint and bind an executor returning the given taps.

        Parameters
        ----------
        symbol_path, params_path
            ``<prefix>-symbol.json`` and ``<prefix>-<epoch>.params``.
        preprocess
            Input size and normalisation (the executor is bound at this size).
        taps
            Internal layer names (without ``_output``), e.g. ``"global_pool"``.
        batch_size
            Rows per executor call; a shorter last batch is zero-padded.
        grid
            1: 4-D taps are averaged over the whole map (``C`` values). N > 1:
            over each cell of an N x N grid (``C * N * N`` values, :func:`grid_pool`);
            every tap must then be a map of at least N x N.

        Raises
        ------
        ModelFilesMissingError
            A checkpoint file does not exist.
        NotFoundError
            A tap is not a layer of the symbol (the message lists the layers).
        InvalidInputError
            The files cannot be read, or the params do not fit the symbol.
        """
        mx = import_mxnet()
        self = cls()
        self.symbol_path, self.params_path = Path(symbol_path), Path(params_path)
        self.preprocess, self.taps, self.batch_size = preprocess, list(taps), int(batch_size)
        self.grid = check_grid(grid)
        if not self.taps:
            raise InvalidInputError("at least one tap (layer name) is needed")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        sym, arg_params, aux_params = self._read_files(mx)
        w, h = preprocess.size
        data_shape = (self.batch_size, 3, h, w)
        internals = sym.get_internals()
        try:
            _, out_shapes, _ = internals.infer_shape_partial(data=(1, 3, h, w))
        except Exception as exc:
            raise InvalidInputError(
                f"{self.symbol_path}: cannot infer layer shapes for a {w}x{h} input ({exc})"
            ) from None
        self._layers = [
            (name[: -len("_output")], tuple(int(d) for d in shape[1:]))
            for name, shape in zip(internals.list_outputs(), out_shapes, strict=True)
            if name.endswith("_output") and shape
        ]
        shapes = dict(self._layers)
        for tap in self.taps:
            if tap not in shapes:
                raise NotFoundError(
                    "layer",
                    tap,
                    shapes,
                    hint=f"see the layers of {self.symbol_path.name} (CheckpointModel.layers())",
                )

        outputs = [self._tap_output(mx, internals, tap, shapes[tap]) for tap in self.taps]
        group = mx.sym.Group(outputs)
        self._check_params(group, arg_params, aux_params, (1, 3, h, w))

        label_names = [a for a in group.list_arguments() if a.endswith("label") and a not in arg_params]
        mod = mx.mod.Module(symbol=group, data_names=["data"], label_names=label_names, context=mx.cpu())
        try:
            mod.bind(
                data_shapes=[("data", data_shape)],
                label_shapes=[(n, (self.batch_size,)) for n in label_names] or None,
                for_training=False,
            )
            mod.set_params(arg_params, aux_params, allow_missing=False, allow_extra=True)
        except Exception as exc:
            raise InvalidInputError(
                f"{self.params_path} does not fit {self.symbol_path.name}: {exc}"
            ) from None
        self._module = mod
        return self

    def _read_files(self, mx: Any) -> tuple[Any, dict, dict]:
        """The symbol and its arg/aux params, with a one-line error naming the file that is wrong."""
        missing = [str(p) for p in (self.symbol_path, self.params_path) if not p.is_file()]
        if missing:
            raise ModelFilesMissingError(
                f"model files not found: {', '.join(missing)}; put the checkpoint's -symbol.json and "
                ".params files there (or point the model directory at them)"
            )
        try:
            sym = mx.sym.load(str(self.symbol_path))
        except Exception as exc:  # MXNetError, JSON errors
            raise InvalidInputError(f"{self.symbol_path}: not a readable MXNet symbol file ({exc})") from None
        try:
            arg_params, aux_params = _split_params(mx.nd.load(str(self.params_path)), self.params_path)
        except InvalidInputError:
            raise
        except Exception as exc:
            raise InvalidInputError(f"{self.params_path}: not a readable MXNet params file ({exc})") from None
        if "data" not in sym.list_arguments():
            raise InvalidInputError(f"{self.symbol_path}: the symbol has no 'data' input")
        return sym, arg_params, aux_params

    def _tap_output(self, mx: Any, internals: Any, tap: str, shape: tuple[int, ...]) -> Any:
        """The tap's output as a vector per image (4-D maps globally average-pooled in the graph).

        With ``grid`` > 1 the map itself is the output; :func:`forward_in_runs` pools its cells.
        """
        out = internals[tap + "_output"]
        if self.grid > 1:
            self._tap_dims[tap], self._tap_pooling[tap] = grid_dim(tap, shape, self.grid), "grid-average"
        elif len(shape) == 3:  # (C, H, W): global average pool in the graph
            out = mx.sym.mean(out, axis=(2, 3), name=f"{tap}__gap")
            self._tap_dims[tap], self._tap_pooling[tap] = shape[0], "global-average"
        elif len(shape) == 1:
            self._tap_dims[tap], self._tap_pooling[tap] = shape[0], "none"
        else:
            out = mx.sym.flatten(out, name=f"{tap}__flat")
            self._tap_dims[tap], self._tap_pooling[tap] = int(np.prod(shape)), "flatten"
        return out

    def _check_params(self, group: Any, arg_params: dict, aux_params: dict, data_shape: tuple) -> None:
        """Compare the params file with what the symbol expects, with a readable message."""
        arg_shapes, _, aux_shapes = group.infer_shape_partial(data=data_shape)
        problems = []
        expected = list(zip(group.list_arguments(), arg_shapes, strict=True)) + list(
            zip(group.list_auxiliary_states(), aux_shapes, strict=True)
        )
        for name, shape in expected:
            if name == "data" or name.endswith("label"):
                continue
            have = arg_params.get(name, aux_params.get(name))
            if have is None:
                problems.append(f"{name} missing")
            elif shape and tuple(have.shape) != tuple(shape):
                problems.append(f"{name} has shape {tuple(have.shape)}, the symbol expects {tuple(shape)}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise InvalidInputError(
                f"{self.params_path} does not match {self.symbol_path.name}: {shown}. "
                "Use the .params file saved with this symbol."
            )

    def layers(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tap-able layer with its per-image output shape (no batch dim), in graph order."""
        return list(self._layers)

    def tap_dims(self) -> dict[str, int]:
        """Feature dimension of each selected tap (channels for 4-D layers)."""
        return dict(self._tap_dims)

    def tap_pooling(self) -> dict[str, str]:
        """How each tap became a vector: ``global-average`` (4-D), ``flatten`` or ``none``."""
        return dict(self._tap_pooling)

    def prepare(self, img: Image.Image) -> np.ndarray:
        """Resize and normalise one RGB image to ``(3, H, W)`` float32; thread-safe."""
        return self.preprocess.apply(img)

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run prepared images ``(n, 3, H, W)`` through the network.

        Returns
        -------
        dict
            Tap -> ``(n, dim)`` float32 matrix, rows in input order.
        """
        mx = import_mxnet()
        w, h = self.preprocess.size

        def run(part: np.ndarray) -> list[np.ndarray]:
            rows = part.shape[0]
            if rows < self.batch_size:  # the executor is bound to batch_size rows: pad the last run
                part = np.concatenate([part, np.zeros((self.batch_size - rows, 3, h, w), np.float32)])
            self._module.forward(mx.io.DataBatch([mx.nd.array(part)]), is_train=False)
            return [out.asnumpy()[:rows] for out in self._module.get_outputs()]

        with self._lock:
            return forward_in_runs(batch, self.preprocess.size, self.taps, self._tap_dims, self.batch_size, run,
                                   self.grid)


# --- runtime hook (issue 12): CNNExtractor runs any model with this interface ---------------------
def check_grid(grid: int) -> int:
    """Return ``grid`` if it is a grid size from 1 to :data:`GRID_MAX`, else raise ``InvalidInputError``."""
    if isinstance(grid, bool) or not isinstance(grid, int | np.integer) or not 1 <= grid <= GRID_MAX:
        raise InvalidInputError(f"grid must be an integer from 1 to {GRID_MAX}, got {grid!r}")
    return int(grid)


def grid_dim(tap: str, shape: tuple[int, ...], grid: int) -> int:
    """Length of ``tap``'s vector under ``grid`` x ``grid`` pooling; refuses a tap that is not a large enough map."""
    if len(shape) != 3 or shape[1] < grid or shape[2] < grid:
        got = "x".join(str(d) for d in shape)
        raise InvalidInputError(
            f"layer {tap} gives {got} values per image, not a feature map of at least {grid}x{grid}, so it cannot "
            f"be pooled over a {grid}x{grid} grid; choose mid-level layers (e.g. {{layers}} block10_out) or leave "
            "out {grid}", params=("layers", "grid"), tap=tap
        )
    return int(shape[0]) * grid * grid


def grid_pool(maps: np.ndarray, grid: int) -> np.ndarray:
    """Average ``(n, C, H, W)`` maps over the cells of a ``grid`` x ``grid`` partition: ``(n, C * grid * grid)``.

    Cell ``(i, j)`` covers rows ``floor(i H / grid)`` to ``ceil((i + 1) H / grid)`` (exclusive),
    likewise the columns: cells are as equal as the map allows and overlap by at most a row when
    ``grid`` does not divide ``H`` (adaptive average pooling). The vector is channel-major,
    ``v[c * grid * grid + i * grid + j]``, so the mean of a channel's cells is its global average
    when ``grid`` divides the map.
    """
    n, c, h, w = maps.shape
    out = np.empty((n, c, grid, grid), dtype=np.float32)
    for i in range(grid):
        r0, r1 = (i * h) // grid, -(-((i + 1) * h) // grid)
        for j in range(grid):
            c0, c1 = (j * w) // grid, -(-((j + 1) * w) // grid)
            out[:, :, i, j] = maps[:, :, r0:r1, c0:c1].mean(axis=(2, 3), dtype=np.float64)
    return out.reshape(n, c * grid * grid)


def forward_in_runs(batch: np.ndarray, size: tuple[int, int], taps: Sequence[str], dims: dict[str, int],
                    step: int, run: Callable[[np.ndarray], Sequence[np.ndarray]], grid: int = 1
                    ) -> dict[str, np.ndarray]:
    """Check prepared images ``(n, 3, H, W)`` against ``size`` (W, H), feed them to ``run`` in runs of
    at most ``step`` rows and gather what it returns per tap (in ``taps`` order) as ``(n, dim)``
    float32 matrices, rows in input order. With ``grid`` > 1, ``run`` returns each tap's maps and
    they are pooled here (:func:`grid_pool`). Both runtimes' ``forward`` go through here."""
    w, h = size
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (3, h, w):
        raise InvalidInputError(f"expected a batch of shape (n, 3, {h}, {w}), got {batch.shape}")
    chunks: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for start in range(0, batch.shape[0], step):
        part = batch[start : start + step]
        for tap, out in zip(taps, run(part), strict=True):
            out = np.asarray(out, dtype=np.float32)
            if grid > 1:
                out = grid_pool(out, grid)
            chunks[tap].append(out.reshape(part.shape[0], -1))
    return {t: np.concatenate(c) if c else np.zeros((0, dims[t]), np.float32) for t, c in chunks.items()}


class TapModel(Protocol):
    """What :class:`CNNExtractor` uses from a bound network: :class:`CheckpointModel` (MXNet) or
    :class:`~featurestore.features.cnn.onnx_backend.OnnxModel` (onnxruntime)."""

    runtime: str
    preprocess: Preprocess
    taps: list[str]
    grid: int  # 1: 4-D taps globally averaged; N: averaged over an N x N grid

    def tap_dims(self) -> dict[str, int]: ...

    def tap_pooling(self) -> dict[str, str]: ...

    def prepare(self, img: Image.Image) -> np.ndarray: ...

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


class CNNExtractor(Extractor):
    """Feature sets from the taps of one :class:`TapModel` (on MXNet or onnxruntime).

    The default tap's feature set is named ``model_name``; the others
    ``f"{model_name}.{tap}"``. ``lineage`` (e.g. ``{"sha256": ...}`` of the
    params file) is added to every feature set's params. ``draft``: JPEGs may be
    decoded at a reduced scale that still covers the network input, recorded as
    ``decode: draft`` (issue 29; absent for the full decode, as before).
    """

    def __init__(
        self,
        model_name: str,
        model: TapModel,
        taps: Sequence[str] | None = None,
        default_tap: str | None = None,
        lineage: dict[str, Any] | None = None,
        draft: bool = False,
    ):
        self.model_name = model_name
        self.draft = draft
        self.model = model
        self.runtime = model.runtime  # not a feature-set param: either runtime continues a set
        self.taps = list(taps) if taps is not None else list(model.taps)
        self.default_tap = default_tap if default_tap is not None else self.taps[0]
        self.lineage = dict(lineage or {})
        dims = model.tap_dims()
        for tap in self.taps:
            if tap not in dims:
                raise NotFoundError("tap", tap, dims, hint=f"load {model_name} with this tap")
        # The default tap (named after the model) first when it is extracted, then the others.
        first = [self.default_tap] if self.default_tap in self.taps else []
        self._order = first + [t for t in self.taps if t != self.default_tap]

    def feature_name(self, tap: str) -> str:
        return self.model_name if tap == self.default_tap else f"{self.model_name}.{tap}"

    def outputs(self) -> list[FeatureSpec]:
        dims, pooling = self.model.tap_dims(), self.model.tap_pooling()
        return [
            FeatureSpec(
                name=self.feature_name(tap),
                kind="cnn",
                dim=dims[tap],
                params={
                    "model": self.model_name,
                    "layer": tap,
                    "pooling": pooling[tap],
                    # absent for global pooling, so sets stored before grids existed match their rebuild
                    **({"grid": self.model.grid} if self.model.grid > 1 else {}),
                    "preprocess": self.model.preprocess.to_params(),
                    **({"decode": "draft"} if self.draft else {}),
                    **self.lineage,
                },
            )
            for tap in self._order
        ]

    def decode_size(self) -> tuple[int, int] | None:
        return tuple(self.model.preprocess.size) if self.draft else None  # type: ignore[return-value]

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self.model.prepare(image)

    def compute(self, prepared: list[np.ndarray]) -> dict[str, np.ndarray]:
        w, h = self.model.preprocess.size
        batch = np.stack(prepared) if prepared else np.zeros((0, 3, h, w), np.float32)
        out = self.model.forward(batch)
        return {self.feature_name(t): out[t] for t in self._order}
