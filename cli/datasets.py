"""``fs datasets``: the store's datasets (collections of images), and real image collections to try the tool on."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from featurestore.cli import common

app = typer.Typer(help="List the store's datasets and their overlaps; export bundled real datasets as image "
                  "folders.", no_args_is_help=True)


@app.command("list")
def list_(fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format.")) -> None:
    """List the datasets with their image counts (an image can belong to several datasets).

    Example: fs datasets list --format csv
    """
    with common.open_store() as store:
        rows = [{"dataset": d.name, "images": d.images, "created": d.created_at}
                for d in store.catalog.dataset_counts()]
    common.emit(rows, fmt, ["dataset", "images", "created"])


@app.command("show")
def show(name: str = typer.Argument(..., help="Dataset name (see `fs datasets list`)."),
         fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format.")) -> None:
    """Show a dataset's image counts per label and its overlap with the other datasets.

    Example: fs datasets show test
    """
    with common.open_store() as store:
        labels = store.catalog.dataset_labels(name)
        overlaps = store.catalog.dataset_overlaps(name)
    rows = [{"superclass": c.superclass, "label": c.label, "images": c.images} for c in labels]
    total = sum(c.images for c in labels)
    if fmt == common.Format.json:
        typer.echo(json.dumps({"dataset": name, "images": total, "labels": rows,
                               "overlap": [{"dataset": o.dataset, "images": o.images} for o in overlaps]}, indent=2))
        return
    common.emit(rows, fmt, ["superclass", "label", "images"])
    common.err(f"{name}: {total} images")
    for o in overlaps:
        common.err(f"  {o.images} of them also in {o.dataset} (`fs datasets overlap {name} {o.dataset}`)")


@app.command("overlap")
def overlap(a: str = typer.Argument(..., help="A dataset."), b: str = typer.Argument(..., help="Another dataset."),
            ids: bool = typer.Option(False, "--ids", help="Also print the ids of the shared images, one a line.")
            ) -> None:
    """Count the images that belong to both datasets (e.g. a train list and a test list).

    Example: fs datasets overlap train test
    """
    with common.open_store() as store:
        n = store.catalog.dataset_overlap(a, b)
        shared = sorted(store.catalog.dataset_image_ids(a) & store.catalog.dataset_image_ids(b)) if ids else []
    typer.echo(str(n))
    for i in shared:
        typer.echo(str(i))
    common.err(f"{n} image(s) are in both {a} and {b}")


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
    from featurestore.io import fashion_mnist as datasets

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
    split_text = {"all": "the train and test splits", "train": "the train split", "test": "the test split"}[split]
    common.err(f"wrote {summary.written} images from {split_text} to {summary.dest} "
               f"({summary.skipped_existing} already there)")
