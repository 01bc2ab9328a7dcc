"""``fs models``: the CNN checkpoints the store can extract embeddings with."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common

app = typer.Typer(help="List, inspect and register CNN models (MXNet checkpoints).", no_args_is_help=True)


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
        rows = [{"name": m.name, "status": m.status, "default_tap": m.default_tap, "taps": ",".join(m.taps),
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
    from featurestore.features.cnn.registry import describe_layers

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
    symbol: Path = typer.Option(..., "--symbol", help="<prefix>-symbol.json"),
    params: Path = typer.Option(..., "--params", help="<prefix>-<epoch>.params"),
    size: int | None = typer.Option(None, "--size", help="Square input size (default 224)."),
    mean: str | None = typer.Option(None, "--mean", help="Per-channel mean in 0..255 (one value or R,G,B)."),
    std: str | None = typer.Option(None, "--std", help="Per-channel std (one value or R,G,B)."),
    resize: str | None = typer.Option(None, "--resize", help="stretch or center-crop."),
    channels: str | None = typer.Option(None, "--channels", help="RGB or BGR input order."),
    taps: str | None = typer.Option(None, "--taps", help="Comma-separated layers offered for extraction."),
    default_tap: str | None = typer.Option(None, "--default-tap", help="Layer of the <name> feature set."),
    replace: bool = typer.Option(False, "--replace", help="Replace an already registered model's files."),
) -> None:
    """Register an MXNet checkpoint: files are checked, copied into the store, their sha256 recorded.

    Example: fs models add inception21k --symbol Inception-symbol.json --params Inception-0009.params
    """
    from featurestore.features.cnn.registry import add_model

    store = common.open_store(create=True)
    try:
        with store.writing():
            row = add_model(
                store, name, symbol, params, size=size, mean=_triple(mean, "--mean"), std=_triple(std, "--std"),
                resize=resize, channels=channels,
                taps=[t.strip() for t in taps.split(",") if t.strip()] if taps else None,
                default_tap=default_tap, replace=replace,
            )
    finally:
        store.close()
    common.err(f"registered {row.name}: taps {', '.join(row.taps)} (default {row.default_tap}); "
               f"params sha256 {row.params_sha256[:12]}")
    if row.onnx_path:
        common.err(f"exported to ONNX for onnxruntime: {row.onnx_path} (sha256 {str(row.onnx_sha256)[:12]})")
    else:
        common.err(f"note: {row.name} could not be exported to ONNX; extract it with `--runtime mxnet` "
                   f"(`fs extract --model {row.name}` says why)")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")
