"""``fs models``: the CNN checkpoints the store can extract embeddings with."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common, hints

app = typer.Typer(help="List, inspect and register CNN models (MXNet checkpoints, ONNX backbones).",
                  no_args_is_help=True)


def _triple(value: str | None, option: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number or R,G,B", param_hint=option) from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise typer.BadParameter("give one value or three (R,G,B)", param_hint=option)
    return (parts[0], parts[1], parts[2])


@app.command("list")
def list_(fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format.")
          ) -> None:
    """List built-in and registered models with their status and taps.

    Example: fs models list
    """
    from featurestore.features.cnn.registry import list_models

    store = common.open_existing_store()  # a listing never creates or writes a store
    try:
        rows = [{"name": m.name, "status": m.status + (hints.step(m.remedy) if m.remedy else ""),
                 "default_tap": m.default_tap, "taps": ",".join(m.taps),
                 "description": m.description} for m in list_models(store)]
    finally:
        if store is not None:
            store.close()
    common.emit(rows, fmt, ["name", "status", "default_tap", "taps", "description"])


@app.command("show")
def show(name: str = typer.Argument(..., help="Model name."),
         fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format.")
         ) -> None:
    """Show every tap-able layer of a model with its output shape (4-D outputs are average-pooled).

    Example: fs models show efficientnet-lite0
    """
    from featurestore.features.cnn.describe import describe_layers

    store = common.open_existing_store()  # never writes: a built-in model is converted to a temp folder
    try:
        row, layers = describe_layers(store, name)
    finally:
        if store is not None:
            store.close()
    common.err(f"{row.name}: default tap {row.default_tap}; taps {', '.join(row.taps)}; "
               f"input {row.preprocess}")
    rows = [{"layer": n, "shape": "x".join(str(d) for d in shape),
             "dim": shape[0] if shape else 0, "tap": "yes" if n in row.taps else ""} for n, shape in layers]
    common.emit(rows, fmt, ["layer", "shape", "dim", "tap"])


@app.command("add")
def add(
    name: str = typer.Argument(..., help="Name to register (inception21k/inception-bn pick up the paper's "
                               "preprocessing)."),
    symbol: Path | None = typer.Option(None, "--symbol", help="MXNet checkpoint: <prefix>-symbol.json"),
    params: Path | None = typer.Option(None, "--params", help="MXNet checkpoint: <prefix>-<epoch>.params"),
    onnx: Path | None = typer.Option(None, "--onnx", help="An ONNX backbone with one NCHW image input "
                                     "(instead of --symbol/--params; needs --input-size)."),
    size: int | None = typer.Option(None, "--input-size", "--size", min=1,
                                    help="Square input size (MXNet default 224; required with --onnx)."),
    mean: str | None = typer.Option(None, "--mean", help="Per-channel mean in 0..255 (one value or R,G,B)."),
    std: str | None = typer.Option(None, "--std", help="Per-channel std (one value or R,G,B)."),
    resize: str | None = typer.Option(None, "--resize", help="stretch or center-crop."),
    channels: str | None = typer.Option(None, "--channels", help="RGB or BGR input order."),
    taps: str | None = typer.Option(None, "--taps", help="Comma-separated layers offered for extraction "
                                    "(ONNX: tensor or tap names; default the graph's outputs)."),
    default_tap: str | None = typer.Option(None, "--default-tap", help="Layer of the <name> feature set."),
    replace: bool = typer.Option(False, "--replace", help="Replace an already registered model's files."),
) -> None:
    """Register an MXNet checkpoint or an ONNX backbone: checked, copied into the store, sha256 recorded.

    MXNet checkpoints are read without MXNet and exported to ONNX with every tap as an output.

    Example: fs models add inception21k --symbol Inception-symbol.json --params Inception-0009.params

    Example: fs models add convnext --onnx convnext.onnx --input-size 224 --mean 123.7,116.3,103.5 --std 58.4,57.1,57.4
    """
    from featurestore.features.cnn.registration import add_model, add_onnx_model

    if (onnx is not None and (symbol or params)) or (onnx is None and (symbol is None or params is None)):
        raise typer.BadParameter("give --symbol and --params (an MXNet checkpoint) or --onnx FILE", param_hint="--onnx")
    if onnx is not None and size is None:
        raise typer.BadParameter("an ONNX model needs its input size", param_hint="--input-size")
    tap_list = [t.strip() for t in taps.split(",") if t.strip()] if taps else None
    opts = {"size": size, "mean": _triple(mean, "--mean"), "std": _triple(std, "--std"), "resize": resize,
            "channels": channels, "taps": tap_list, "default_tap": default_tap, "replace": replace}
    store = common.open_store(create=True)
    try:
        with store.writing():
            if onnx is not None:
                row = add_onnx_model(store, name, onnx, **opts)  # type: ignore[arg-type]
            else:
                assert symbol is not None and params is not None
                row = add_model(store, name, symbol, params, **opts)  # type: ignore[arg-type]
    finally:
        store.close()
    common.err(f"registered {row.name}: taps {', '.join(row.taps)} (default {row.default_tap}); "
               f"{'ONNX file' if onnx is not None else 'params'} sha256 {row.params_sha256[:12]}")
    common.err(f"exported to ONNX for onnxruntime: {row.onnx_path} (sha256 {str(row.onnx_sha256)[:12]})")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")
