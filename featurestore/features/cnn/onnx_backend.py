"""Run a model exported by :mod:`featurestore.features.cnn.onnx_export` on onnxruntime.

:class:`OnnxModel` offers what :class:`~featurestore.features.cnn.mxnet_backend.CNNExtractor`
uses from :class:`~featurestore.features.cnn.mxnet_backend.CheckpointModel`
(``preprocess``, ``taps``, ``tap_dims``, ``tap_pooling``, ``prepare``,
``forward``), so one extractor runs on either runtime and gives the same vectors
(within 1e-4; ``tests/test_onnx.py``). On 2 cores it is about twice as fast
as MXNet's executor for EfficientNet-Lite0 (``bench/bench_extract_cnn.py``).

The stored graph has every registered tap of the model as an output; the
session is built from a copy pruned to the requested taps, because
onnxruntime runs every node of a graph whatever outputs are fetched. With
grid pooling (``grid`` > 1) the session's outputs are the taps' maps (the
inputs of their in-graph global pools), pooled by the same
:func:`~featurestore.features.cnn.mxnet_backend.grid_pool` as on MXNet.

Run size: the session runs at most :data:`RUN_ROWS` images at a time, whatever
the batch it is given. On the 2-core development machine EfficientNet-Lite0 costs
about 10.5 ms of CPU per image in runs of 1-4 images against 14 ms in runs of 32
(the activations of a few images stay in cache), so small runs are about a
quarter cheaper; the decode pass still hands over whole batches.

Threads: the session uses ``threads`` intra-op threads (the store passes
``FS_WORKERS``, default the core count; ``fs serve --workers N`` divides it
among its processes) and does not spin between runs, so the decode threads of
the extract pass get the cores while the network waits for the next batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from featurestore.errors import InvalidInputError, NotFoundError
from featurestore.features.cnn.mxnet_backend import Preprocess, check_grid, forward_in_runs, grid_dim
from featurestore.features.cnn.onnx_export import INPUT_NAME, OnnxTap, read_metadata

__all__ = ["OnnxModel", "RUN_ROWS", "session_options"]

RUN_ROWS = 4  # images per session.run (see the module docstring)


def session_options(threads: int | None = None) -> Any:
    """onnxruntime session options for feature extraction with ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads or os.cpu_count() or 1))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise busy-wait between runs, taking the cores from the
    # threads that decode and resize the next batch.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return so


def _prune(model: Any, outputs: Sequence[str], inner: dict[str, Any] | None = None) -> Any:
    """A copy of ``model`` computing only ``outputs`` (nodes and weights nothing else needs dropped).

    ``inner``: value infos of intermediate tensors to expose as outputs (grid pooling's maps).
    """
    from onnx import helper

    graph = model.graph
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    declared = {o.name: o for o in graph.output} | (inner or {})
    pruned = helper.make_graph(
        kept, graph.name, list(graph.input), [declared[o] for o in outputs],
        initializer=[t for t in graph.initializer if t.name in needed],
    )
    out = helper.make_model(pruned, opset_imports=list(model.opset_import), producer_name=model.producer_name,
                            producer_version=model.producer_version)
    out.ir_version = model.ir_version
    return out


class OnnxModel:
    """An exported model bound in an onnxruntime session with a fixed set of taps.

    Build it with :meth:`load`. :meth:`prepare` is thread-safe; :meth:`forward`
    serialises calls with a lock (one session, ``threads`` cores).
    """

    runtime = "onnxruntime"

    def __init__(self) -> None:  # use OnnxModel.load
        self.preprocess: Preprocess
        self.taps: list[str]
        self.batch_size: int
        self.run_rows: int
        self.threads: int
        self.grid = 1
        self._dims: dict[str, int] = {}
        self._exported: dict[str, OnnxTap] = {}
        self._outputs: list[str] = []
        self._session: Any = None
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        data: bytes,
        preprocess: Preprocess,
        taps: Sequence[str],
        batch_size: int = 32,
        threads: int | None = None,
        where: str = "the ONNX model",
        grid: int = 1,
    ) -> OnnxModel:
        """Create a session for ``taps`` of a serialized model from :func:`export_onnx`.

        Parameters
        ----------
        data
            The model file's bytes (the caller checks their sha256 first).
        preprocess
            Input size and normalisation; the size must be the one the model was exported for.
        taps
            Layer names, a subset of the exported ones.
        batch_size
            Largest number of rows per ``session.run``; runs are at most
            :data:`RUN_ROWS` rows (the batch dimension is dynamic: no padding).
        threads
            Intra-op threads; default the core count.
        where
            How to name the model in error messages (e.g. its path).
        grid
            Grid pooling of the taps' maps, as in :meth:`CheckpointModel.load
            <featurestore.features.cnn.mxnet_backend.CheckpointModel.load>`.

        Raises
        ------
        NotFoundError
            A tap is not an output of the exported graph.
        InvalidInputError
            Not a featurestore export, exported for another input size, unreadable, or a
            tap that is not a map of at least ``grid`` x ``grid``.
        """
        import onnx
        import onnxruntime as ort

        self = cls()
        self.preprocess, self.taps, self.batch_size = preprocess, list(dict.fromkeys(taps)), int(batch_size)
        self.grid = check_grid(grid)
        self.threads = max(1, int(threads or os.cpu_count() or 1))
        if not self.taps:
            raise InvalidInputError("at least one tap (layer name) is needed")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        self.run_rows = min(self.batch_size, RUN_ROWS)
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:  # DecodeError
            raise InvalidInputError(f"{where} is not a readable ONNX model ({exc})") from None
        described, record = read_metadata(model, where)
        self._exported = {t.tap: t for t in described}
        for tap in self.taps:
            if tap not in self._exported:
                raise NotFoundError("tap", tap, self._exported, hint=f"{where} was exported with these taps")
        exported_size = tuple(record.get("preprocess", {}).get("size", ()))
        if exported_size != tuple(preprocess.size):
            raise InvalidInputError(
                f"{where} was exported for {exported_size} input, not {tuple(preprocess.size)}; re-register the model"
            )
        self._dims = {t: self._exported[t].dim for t in self.taps}
        inner = self._grid_outputs(model) if self.grid > 1 else None
        self._outputs = [self._exported[t].output for t in self.taps] if inner is None else list(inner)
        if self._outputs != [o.name for o in model.graph.output]:
            model = _prune(model, self._outputs, inner)
        try:
            self._session = ort.InferenceSession(
                model.SerializeToString(), session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's Fail / InvalidGraph
            raise InvalidInputError(f"onnxruntime cannot load {where} ({exc})") from None
        return self

    def _grid_outputs(self, model: Any) -> dict[str, Any]:
        """Value infos of the taps' maps (in ``taps`` order), and their grid-pooled dims in ``_dims``.

        A globally pooled tap's map is the input of its ``<tap>__pool`` node; its shape comes
        from ONNX shape inference (the export has a fixed input size).
        """
        import onnx

        pools = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "GlobalAveragePool"}
        infos = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        inner: dict[str, Any] = {}
        for tap in self.taps:
            name = pools.get(f"{tap}__pool")
            info = infos.get(name or "")
            if name is None or info is None:
                shape: tuple[int, ...] = (self._exported[tap].dim,)
            else:
                shape = tuple(int(d.dim_value) for d in info.type.tensor_type.shape.dim[1:])
            self._dims[tap] = grid_dim(tap, shape, self.grid)  # refuses a tap that is not a large enough map
            inner[str(name)] = info
        return inner

    def tap_dims(self) -> dict[str, int]:
        """Feature dimension of each selected tap (channels for 4-D layers; C x grid x grid with a grid)."""
        return dict(self._dims)

    def tap_pooling(self) -> dict[str, str]:
        """How each tap became a vector: ``global-average`` (4-D), ``grid-average``, ``flatten`` or ``none``."""
        return {t: "grid-average" if self.grid > 1 else self._exported[t].pooling for t in self.taps}

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
        def run(part: np.ndarray) -> list[np.ndarray]:
            return list(self._session.run(self._outputs, {INPUT_NAME: np.ascontiguousarray(part)}))

        with self._lock:
            return forward_in_runs(batch, self.preprocess.size, self.taps, self._dims, self.run_rows, run, self.grid)
