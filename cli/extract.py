"""``fs extract``: compute feature sets for the images in the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from featurestore.cli import common
from featurestore.features.cnn.precision import CALIBRATION_IMAGES, CALIBRATION_MIN, MIN_COSINE, PRECISIONS

if TYPE_CHECKING:
    from featurestore.features.base import Extractor
    from featurestore.features.cnn.quantize import Int8Options
    from featurestore.pipelines.extract import ExtractSummary


def extract(  # noqa: PLR0915 -- its eight function-local imports keep `fs --help` light
    rp: int | None = typer.Option(None, "--rp", help="Sparse random projection of the raw pixels to K dims "
                                  "(feature set rp<K>)."),
    size: str = typer.Option("640x480", "--size", help="Canonical image size for --rp (WxH)."),
    resize: str | None = typer.Option(None, "--resize", help="Resize rule: stretch (ignore aspect; the default "
                                      "for --rp/--pixels/--lowlevel and every built-in model), letterbox (fit, "
                                      "pad black; --rp/--pixels/--lowlevel only) or center-crop (cover, crop the "
                                      "centre; --model only). A --model set whose rule is not the model's own is "
                                      "named <model>+<rule>, e.g. --model efficientnet-lite0 --resize center-crop "
                                      "gives efficientnet-lite0+center-crop."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --rp projection matrix."),
    pixels: str | None = typer.Option(None, "--pixels", help="Raw pixels at WxH scaled to 0..1 (feature set "
                                      "pixels<W>x<H>). 640x480 is 921,600 floats = 3.7 MB per image."),
    lowlevel: bool = typer.Option(False, "--lowlevel", help="Colour/LBP/gradient histograms + GIST-like "
                                  "descriptor (feature set lowlevel, 843 dims)."),
    model: list[str] = typer.Option([], "--model", "-m", help="CNN embeddings (feature set <model> or "
                                    "<model>.<layer>); see `fs models list`. Repeatable."),
    layers: str | None = typer.Option(None, "--layers", help="Comma-separated layers of --model "
                                      "(default: its default tap; `fs models show NAME` lists them)."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation of --model: none, or flip (each "
                            "embedding averaged with the mirrored image's, same decode and batch; sets named "
                            "<model>[+<rule>]+flip), e.g. --model efficientnet-lite0 --tta flip gives "
                            "efficientnet-lite0+flip."),
    grid: int = typer.Option(1, "--grid", help="Pool each --layers map over an N x N grid (N = 2..8) instead of "
                             "globally: C*N*N values that keep where a pattern is in the image; for maps of at "
                             "least NxN (mid-level layers), sets named <model>.<layer>+gridN, e.g. --model "
                             "efficientnet-lite0 --layers block10_out --grid 3 gives "
                             "efficientnet-lite0.block10_out+grid3 (1,008 dims)."),
    runtime: str | None = typer.Option(None, "--runtime", help="What runs --model: onnxruntime (its ONNX "
                                       "export, about 2x faster) or mxnet (the checkpoint on MXNet, the "
                                       "reference; needs `pip install \"featurestore[mxnet]\"`). "
                                       "Vectors agree within 1e-4, so either continues a set. "
                                       "Default: FS_CNN_RUNTIME, else onnxruntime.", show_default=False),
    precision: str = typer.Option("fp32", "--precision", help="Numeric precision of --model: fp32, or int8 (a "
                                  "statically quantised copy of its ONNX export, calibrated once on a seeded "
                                  "sample of the store's images and stored; onnxruntime only; sets named "
                                  "<model>...+int8), e.g. --model efficientnet-lite0 --precision int8 gives "
                                  "efficientnet-lite0+int8."),
    calibration: int = typer.Option(CALIBRATION_IMAGES, "--calibration", help="With --precision int8: images "
                                    f"sampled to make the int8 model (a fifth held back to check it; at least "
                                    f"{CALIBRATION_MIN})."),
    min_cosine: float = typer.Option(MIN_COSINE, "--min-cosine", help="With --precision int8: refuse the int8 "
                                     "model when the mean cosine of its vectors to fp32 on the held-back images "
                                     "is below this for a requested layer."),
    exact_decode: bool = typer.Option(False, "--exact-decode", help="Decode JPEGs in full for --model. By default "
                                      "a pass of --model sets only decodes JPEGs at 1/2, 1/4 or 1/8 scale when "
                                      "that still covers the network input (recorded as decode: draft)."),
    feature: list[str] = typer.Option([], "--feature", help="A feature kind by name, with options as "
                                      "KIND:key=value,key=value, e.g. a plugin's --feature colour-moments:space=hsv "
                                      "(`fs plugins` lists the kinds installed). Repeatable."),
    batch: int = typer.Option(32, "--batch", help="Images per batch."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only images of this dataset."),
    replace: bool = typer.Option(False, "--replace", help="Drop the named feature sets and recompute them."),
    ray: str | None = common.RAY_OPTION,
    ray_workers: int | None = typer.Option(None, "--ray-workers", help="With --ray: workers (actors) to start "
                                           "(default: as many as the nodes' CPUs hold).", show_default=False),
    ray_threads: int = typer.Option(1, "--ray-threads", help="With --ray: CPUs each worker reserves on its node "
                                    "(its decode and math threads)."),
) -> None:
    """Compute feature sets in one pass: each image is decoded once and fed to every extractor.

    Only images lacking a feature set are processed; re-running is a no-op.
    Vectors are written in crash-safe shards as the pass goes. With --ray the
    images are cut into tasks for workers on a Ray cluster (the store folder on
    storage every node mounts; with several nodes a PostgreSQL catalog).

    Example: fs extract --rp 128 --lowlevel --model efficientnet-lite0 --runtime onnxruntime --ray auto

    Example: fs extract --model efficientnet-lite0 --precision int8

    Example: fs extract --feature colour-moments (a plugin's feature kind; see `fs plugins`)
    """
    from featurestore.features.cnn.registry import cnn_runtimes
    from featurestore.features.pixels import check_pixels
    from featurestore.features.projection import check_projection
    from featurestore.features.registry import new_extractor
    from featurestore.features.resize import check_size
    from featurestore.pipelines.extract import extract as run_extract

    if batch < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--batch")
    _check_view_options(resize, tta, bool(model), rp is not None or bool(pixels) or lowlevel)  # issue 16
    _check_grid(grid, layers)
    rule = resize or "stretch"  # --rp/--pixels/--lowlevel; a --model defaults to its own rule
    if layers and not model:
        raise typer.BadParameter("--layers needs --model", param_hint="--layers")
    if runtime is not None and runtime not in (runtimes := cnn_runtimes()):
        raise typer.BadParameter(f"use {' or '.join(runtimes)}", param_hint="--runtime")
    requested = _parse_features(feature)
    int8 = _check_precision(precision, runtime, bool(model), calibration, min_cosine)
    wh = common.parse_size(size, "--size")
    pixel_size = common.parse_size(pixels, "--pixels") if pixels else None
    # Bounds from the memory and time the options need, checked before the store is opened or locked.
    if rp is not None and rp >= 1:
        check_size(wh)
        check_projection(wh[0] * wh[1] * 3, rp)
    if pixel_size:
        check_pixels(pixel_size, batch)
    wanted = [x.strip() for x in layers.split(",") if x.strip()] if layers else None
    address = _ray_address(ray, ray_workers, ray_threads)
    store = common.open_store()
    try:
        with store.writing():
            # every family through the feature-kind registry (built-ins and plugins alike)
            kinds = [*([("random_projection", {"k": rp, "size": wh, "rule": rule, "seed": seed, "replace": replace})]
                       if rp is not None else []),
                     *([("pixels", {"size": pixel_size, "rule": rule})] if pixel_size else []),
                     *([("lowlevel", {"rule": rule})] if lowlevel else []), *requested]
            extractors: list[Extractor] = [new_extractor(store, kind, options) for kind, options in kinds]
            # issue 29: a pass of CNN sets only decodes JPEGs at the scale the network needs
            exact = exact_decode or bool(extractors)
            cnn = [new_extractor(store, "cnn", {
                "model": name, "layers": wanted, "batch_size": batch, "resize": resize, "tta": tta,
                "runtime": runtime, "save_export": True, "grid": grid, "precision": precision, "int8": int8,
                "decode": "exact" if exact else "draft", "follow_stored": not (replace or exact_decode)})
                   for name in model]
            _report_int8(cnn)
            extractors += cnn
            if not extractors:
                raise typer.BadParameter("give at least one of --rp K, --pixels WxH, --lowlevel, --model NAME, "
                                         "--feature KIND")
            with common.progress("extract") as tick:
                if address:
                    from featurestore.pipelines.cluster import extract_on_ray  # Ray and scikit-learn

                    summary = extract_on_ray(store, extractors, address=address, replace=replace, dataset=dataset,
                                             batch_size=batch, workers=ray_workers, threads=ray_threads,
                                             progress=tick)
                else:
                    summary = run_extract(store, extractors, replace=replace, dataset=dataset, batch_size=batch,
                                          progress=tick)
    finally:
        store.close()
    _report(summary)


def _parse_features(texts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The --feature requests, each a kind the registry can compute from options."""
    from featurestore.features.registry import feature_kinds

    requested = [_parse_feature(text) for text in texts]
    known = feature_kinds() if requested else {}
    for kind, _ in requested:
        if kind not in known or known[kind].create is None:
            usable = ", ".join(k for k, v in known.items() if v.create is not None)
            raise typer.BadParameter(f"unknown feature kind {kind!r}; use one of {usable}", param_hint="--feature")
    return requested


def _parse_feature(text: str) -> tuple[str, dict[str, Any]]:
    """``KIND[:key=value,key=value]`` -> (kind, options as strings)."""
    kind, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not (eq and key.strip()):
            raise typer.BadParameter(f"{item!r} is not key=value; write KIND:key=value,key=value",
                                     param_hint="--feature")
        options[key.strip()] = value.strip()
    if not kind.strip():
        raise typer.BadParameter("give a feature kind, e.g. --feature lowlevel", param_hint="--feature")
    return kind.strip(), options


def _ray_address(ray: str | None, workers: int | None, threads: int) -> str | None:
    """The Ray cluster to run on (--ray, else FS_RAY_ADDRESS), after checking the options that go with it."""
    if workers is not None and workers < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--ray-workers")
    if threads < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--ray-threads")
    address = common.settings(ray_address=ray).ray_address
    if (workers is not None or threads != 1) and not address:
        raise typer.BadParameter("--ray-workers and --ray-threads need --ray ADDRESS (or FS_RAY_ADDRESS)")
    return address


def _report(summary: ExtractSummary) -> None:
    for path, reason in summary.failed:
        common.err(f"  skipped: {path}: {reason}")
    for name in summary.up_to_date:
        common.err(f"{name}: up to date, nothing to do")
    for name, n in summary.written.items():
        common.err(f"{name}: {n} vectors written")
    if summary.processed:
        common.err(f"{summary.processed} images in {summary.seconds:.1f}s "
                   f"({summary.images_per_second:.1f} images/s), {len(summary.failed)} skipped")


def _check_view_options(resize: str | None, tta: str, cnn: bool, pixel_families: bool) -> None:
    """issue 16: --resize applies to every requested family, --tta to --model; refuse what does not fit."""
    if resize not in (None, "stretch", "letterbox", "center-crop"):
        raise typer.BadParameter("use stretch, letterbox or center-crop", param_hint="--resize")
    if resize == "letterbox" and cnn:
        raise typer.BadParameter("letterbox applies to --rp/--pixels/--lowlevel; a --model input is resized by "
                                 "stretch or center-crop (extract the two in separate runs)", param_hint="--resize")
    if resize == "center-crop" and pixel_families:
        raise typer.BadParameter("center-crop applies to --model only; --rp/--pixels/--lowlevel use stretch or "
                                 "letterbox (extract the two in separate runs)", param_hint="--resize")
    if tta not in ("none", "flip"):
        raise typer.BadParameter("use none or flip", param_hint="--tta")
    if tta != "none" and not cnn:
        raise typer.BadParameter("--tta needs --model", param_hint="--tta")


def _check_precision(precision: str, runtime: str | None, cnn: bool, calibration: int, min_cosine: float
                     ) -> Int8Options:
    """issue 29: --precision and the int8 options."""
    from featurestore.features.cnn.quantize import Int8Options

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"use {' or '.join(PRECISIONS)}", param_hint="--precision")
    if precision == "int8" and not cnn:
        raise typer.BadParameter("--precision int8 needs --model", param_hint="--precision")
    if precision == "int8" and runtime == "mxnet":
        raise typer.BadParameter("int8 models run on onnxruntime only; drop --runtime mxnet or use --precision "
                                 "fp32", param_hint="--precision")
    if calibration < CALIBRATION_MIN:
        raise typer.BadParameter(f"use at least {CALIBRATION_MIN} images",
                                 param_hint="--calibration")
    if not 0.0 < min_cosine <= 1.0:
        raise typer.BadParameter("use a cosine in (0, 1]", param_hint="--min-cosine")
    return Int8Options(sample=calibration, min_cosine=min_cosine)


def _report_int8(extractors: list[Extractor]) -> None:
    """Print how each int8 model was calibrated and its mean cosine to fp32 per tap (its guard)."""
    for ex in extractors:
        spec = ex.outputs()[0]
        q = spec.params.get("quantization")
        if q:
            cal = q["calibration"]
            cosines = ", ".join(f"{tap} {value:.4f}" for tap, value in q["cosine"].items())
            common.err(f"{spec.name}: int8 model {q['sha256'][:12]} (calibrated on {cal['images']} images, seed "
                       f"{cal['seed']}); mean cosine to fp32 on {cal['held_back']} held-back images: {cosines}"
                       + (" (after the tap bias correction)" if q.get("correction", "none") != "none" else "")
                       + (f"; {q['convs_corrected']} convolution biases corrected one by one"
                          if q.get("convs_corrected") else ""))


def _check_grid(grid: int, layers: str | None) -> None:
    from featurestore.features.cnn.mxnet_backend import GRID_MAX

    if not 1 <= grid <= GRID_MAX:
        raise typer.BadParameter(f"use a grid of 1 (global average) to {GRID_MAX} cells per side", param_hint="--grid")
    if grid > 1 and not layers:
        raise typer.BadParameter("--grid needs --layers: the default tap of a model is already pooled to 1x1; "
                                 "choose mid-level layers, e.g. --layers block10_out", param_hint="--grid")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
