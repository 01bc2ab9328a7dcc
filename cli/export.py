"""``fs export``: feature sets and predictions as Parquet files for pandas, polars, DuckDB or Hugging Face."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common, versions

app = typer.Typer(help="Write feature sets or a run's predictions to a Parquet file (readable by pandas, polars, "
                  "DuckDB, Hugging Face datasets).", no_args_is_help=True)


def _sets(value: str) -> list[str]:
    names = [f.strip() for f in value.split(",") if f.strip()]
    if not names:
        raise typer.BadParameter("give feature sets like rp128,efficientnet-lite0", param_hint="SETS")
    return names


def _wrote(path: Path, rows: int, groups: int, size: int, what: str) -> None:
    common.err(f"wrote {path} ({size / 2**20:,.1f} MiB): {rows} rows of {what} in {groups} row group(s)")


@app.command("features")
def features(
    sets: str = typer.Argument(..., metavar="SET[,SET...]", help="Feature sets, one vector column each."),
    dest: Path = typer.Argument(..., metavar="DEST.parquet", help="File to write (replaced atomically if it "
                                "exists)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only images of this dataset."),
    where: str | None = typer.Option(None, "--where", "-w", help="SQL condition on the images (as in `fs search "
                                     "--where`), e.g. \"label = 'sneaker' AND dataset = 'spring'\"."),
    rows: int | None = typer.Option(None, "--row-group-rows", min=1, help="Rows per Parquet row group (default: "
                                    "about 32 MiB of vectors, at most 65,536)."),
    version: str | None = typer.Option(None, "--version", metavar="N|SET=N,...", show_default=False,
                                       help=versions.VERSION_HELP),
) -> None:
    """Export feature sets to Parquet: image_id, sha256, label, superclass, datasets and one fixed-size
    float32 list column per set, for the images that have a vector in every set (the others are counted).

    Written one row group at a time (memory stays bounded) to a temp file renamed when complete.

    Example: fs export features rp128,efficientnet-lite0 vectors.parquet --dataset train
    """
    from featurestore.pipelines.export import export_features

    names = _sets(sets)
    pinned = versions.parse_version(version)
    with common.open_store() as store, common.progress("export") as tick:
        summary = export_features(store, names, dest, dataset=dataset, where=where, batch_rows=rows,
                                  progress=tick, version=pinned)
    for name, n in summary.lacking.items():
        if n:
            common.err(f"left out {n} selected image(s) without a vector in {name} (`fs extract` computes them)")
    _wrote(summary.path, summary.rows, summary.row_groups, summary.bytes, ",".join(names))


@app.command("predictions")
def predictions(
    run: int = typer.Option(..., "--run", "-r", min=1, help="Run id (see `fs runs`)."),
    dest: Path = typer.Argument(..., metavar="DEST.parquet", help="File to write (replaced atomically if it "
                                "exists)."),
) -> None:
    """Export a run's stored predictions to Parquet: run_id, image_id, sha256, label and superclass (the
    image's, to compare with), predicted, probability, top5 (label, probability) and predicted_at.

    Example: fs export predictions --run 3 run3.parquet
    """
    from featurestore.pipelines.export import export_predictions

    with common.open_store() as store, common.progress("export") as tick:
        summary = export_predictions(store, run, dest, progress=tick)
    if not summary.rows:
        common.err(f"run {run} has no stored predictions: `fs predict --run {run} --dataset NAME` makes them")
    _wrote(summary.path, summary.rows, summary.row_groups, summary.bytes, f"run {run}'s predictions")
