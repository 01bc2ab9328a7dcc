"""Registering CNN models in the store: a checkpoint (``fs models add NAME --symbol --params``) or any
ONNX backbone (``--onnx``). Each is checked and exported before anything is copied; then the files are
copied into ``<store>/models/<name>/`` and recorded with their sha256
(:mod:`featurestore.features.cnn.registry` reads them back).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.catalog.repository import check_name
from featurestore.catalog.schema import Model
from featurestore.errors import FeatureStoreError, InvalidInputError, ModelFilesMissingError
from featurestore.features.cnn.mxnet_backend import Preprocess
from featurestore.features.cnn.onnx_export import export_onnx, store_onnx
from featurestore.features.cnn.onnx_import import export_onnx_backbone, tap_name
from featurestore.features.cnn.registry import save_model, spec_taps
from featurestore.features.cnn.specs import BUILTIN_MODELS
from featurestore.io.atomic import copy_atomic, sha256_file

if TYPE_CHECKING:
    from featurestore.vectors import StoreView as Store  # the narrow interface the store satisfies


def add_model(
    store: Store,
    name: str,
    symbol: Path,
    params: Path,
    *,
    size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    resize: str | None = None,
    channels: str | None = None,
    taps: list[str] | None = None,
    default_tap: str | None = None,
    replace: bool = False,
) -> Model:
    """Copy a checkpoint into the store and register it. Call under ``store.writing()``.

    Preprocessing defaults come from the built-in spec of the same name
    (e.g. ``inception21k``: 224x224, mean 117, std 1), else 224x224, mean 0, std 1.
    The checkpoint is read and exported to ONNX (checking its operators, weights and the taps)
    before anything is copied: a bad checkpoint leaves the store as it was.
    """
    check_name("model", name)
    for p in (symbol, params):
        if not Path(p).is_file():
            raise ModelFilesMissingError(f"{p} does not exist; give the checkpoint's -symbol.json and .params")
    spec = BUILTIN_MODELS.get(name)
    if spec is not None and spec.builtin:
        raise InvalidInputError(f"{name} is built in and needs no files; pick another name for your checkpoint")
    pre = _preprocess_from(spec.preprocess if spec else Preprocess(), size, mean, std, resize, channels)
    tap_list = taps or (spec_taps(spec) if spec else ["global_pool"])
    default = default_tap or (spec.default_tap if spec else tap_list[0])
    if default not in tap_list:
        tap_list = [default] + tap_list
    # Export from the given files first: a bad checkpoint is refused before anything is copied.
    exported = export_onnx(symbol, params, pre, tap_list)
    existing = store.catalog.model(name)
    if existing is not None and not replace:
        raise FeatureStoreError(f"model {name!r} is already registered", remedy="replace-model", model=name)
    folder = store.root / "models" / name
    targets = []
    for src in (Path(symbol), Path(params)):
        dst = folder / src.name
        copy_atomic(src, dst)
        targets.append(dst)
    sym_dst, par_dst = targets
    onnx_path, onnx_sha = store_onnx(folder, name, exported)
    row = save_model(store,
        name,
        symbol_path=str(sym_dst.relative_to(store.root)),
        params_path=str(par_dst.relative_to(store.root)),
        symbol_sha256=sha256_file(sym_dst),
        params_sha256=sha256_file(par_dst),
        preprocess=pre.to_params(),
        taps=tap_list,
        default_tap=default,
        source=f"added from {Path(params).resolve()}",
        onnx_path=str(onnx_path.relative_to(store.root)),
        onnx_sha256=onnx_sha,
    )
    if existing is not None and existing.onnx_path and existing.onnx_path != row.onnx_path:
        (store.root / existing.onnx_path).unlink(missing_ok=True)  # the replaced model's export, now unused
    return row


def _preprocess_from(base: Preprocess, size: int | None, mean: tuple[float, float, float] | None,
                     std: tuple[float, float, float] | None, resize: str | None, channels: str | None) -> Preprocess:
    return Preprocess(
        size=(size, size) if size else base.size,
        resize=resize or base.resize,  # type: ignore[arg-type]  # validated by Preprocess
        mean=mean or base.mean,
        std=std or base.std,
        channels=channels or base.channels,  # type: ignore[arg-type]
    )


def add_onnx_model(
    store: Store,
    name: str,
    onnx_file: Path,
    *,
    size: int,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    resize: str | None = None,
    channels: str | None = None,
    taps: list[str] | None = None,
    default_tap: str | None = None,
    replace: bool = False,
) -> Model:
    """Register any ONNX backbone (one NCHW image input). Call under ``store.writing()``.

    The graph is checked and its taps exported (:func:`export_onnx_backbone`) before
    anything is copied; the file is copied into ``models/<name>/`` with its sha256 (in
    both the symbol and params columns) and the export stored beside it. Taps default to
    the graph's outputs; preprocessing to mean 0, std 1 at ``size`` x ``size``.
    """
    check_name("model", name)
    if name in BUILTIN_MODELS:
        raise InvalidInputError(f"{name} is the name of a built-in model; pick another name for your ONNX model")
    pre = _preprocess_from(Preprocess(), size, mean, std, resize, channels)
    wanted = list(taps or [])
    if default_tap and wanted and default_tap not in wanted:
        wanted = [default_tap, *wanted]
    exported, tap_list = export_onnx_backbone(onnx_file, pre, wanted or None)
    default = tap_name(default_tap) if default_tap else tap_list[0]
    if default not in tap_list:
        raise InvalidInputError(f"default tap {default_tap!r} is not one of the taps {', '.join(tap_list)}")
    existing = store.catalog.model(name)
    if existing is not None and not replace:
        raise FeatureStoreError(f"model {name!r} is already registered", remedy="replace-model", model=name)
    folder = store.root / "models" / name
    dst = folder / Path(onnx_file).name
    copy_atomic(Path(onnx_file), dst)
    onnx_path, onnx_sha = store_onnx(folder, f"{name}-taps", exported)
    sha, rel = sha256_file(dst), str(dst.relative_to(store.root))
    row = save_model(store,
        name, symbol_path=rel, params_path=rel, symbol_sha256=sha, params_sha256=sha,
        preprocess=pre.to_params(), taps=tap_list, default_tap=default,
        source=f"added from ONNX file {Path(onnx_file).resolve()}",
        onnx_path=str(onnx_path.relative_to(store.root)), onnx_sha256=onnx_sha,
    )
    if existing is not None and existing.onnx_path and existing.onnx_path != row.onnx_path:
        (store.root / existing.onnx_path).unlink(missing_ok=True)
    return row
