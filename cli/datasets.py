"""``fs datasets``: real image collections to try the tool on."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common
from featurestore.io import fashion_mnist as datasets

app = typer.Typer(help="Export bundled real datasets as image folders.", no_args_is_help=True)


@app.command("export")
def export(
    name: str = typer.Argument(..., help="Dataset to export: fashion-mnist."),
    dest: Path = typer.Argument(..., help="Folder to write superclass/class/name.ext into."),
    limit: int | None = typer.Option(None, "--limit", "-n", help="Class-balanced sample of N images."),
    size: str | None = typer.Option(None, "--size", help="Upscale to WxH (e.g. 640x480) as RGB."),
    fmt: str = typer.Option("png", "--format", help="png or jpeg."),
    split: str = typer.Option("all", "--split", help="train, test or all."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    source: Path | None = typer.Option(None, "--source", help="Folder with the idx .gz files."),
) -> None:
    """Write Fashion-MNIST (Debian package dataset-fashion-mnist) as a labelled image tree.

    Classes are grouped into superclasses: footwear = sandal, sneaker, ankle-boot;
    tops = t-shirt, pullover, coat, shirt; bottoms = trouser; dresses = dress; bags = bag.

    Example: fs datasets export fashion-mnist ./fmnist --limit 5000 --size 640x480 --format jpeg
    """
    if name != "fashion-mnist":
        raise typer.BadParameter(f"unknown dataset {name!r}; available: fashion-mnist", param_hint="NAME")
    if fmt not in ("png", "jpeg", "jpg"):
        raise typer.BadParameter("use png or jpeg", param_hint="--format")
    if split not in ("train", "test", "all"):
        raise typer.BadParameter("use train, test or all", param_hint="--split")
    wh = common.parse_size(size, "--size") if size else None
    kwargs = {"source": source} if source else {}
    with common.progress("export") as tick:
        summary = datasets.export_fashion_mnist(
            dest, limit=limit, size=wh, fmt="jpeg" if fmt == "jpg" else fmt, split=split, seed=seed,
            progress=tick, **kwargs,
        )
    common.err(f"wrote {summary.written} images to {summary.dest} ({summary.skipped_existing} already there)")
