"""``fs ingest``: catalog a folder of images."""

from __future__ import annotations

from pathlib import Path

import typer

from featurestore.cli import common


def ingest(
    path: str = typer.Argument(..., help="Folder (scanned recursively), a single image file, or s3://BUCKET/PREFIX."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset name (default: folder name)."),
    labels: str = typer.Option(
        "dir", "--labels",
        help="Where labels come from: 'dir' (leaf folder = class, its parent = superclass), "
        "'none', or 'csv:FILE' (rows path,label[,superclass]; paths relative to PATH).",
    ),
    show_failed: int = typer.Option(20, "--show-failed", help="How many failed files to list (all are stored)."),
) -> None:
    """Validate and catalog images: every file is decoded once; duplicates (same bytes) are stored once.

    Bad files (corrupt, truncated, empty, not an image, too large) are skipped, recorded
    with their reason (see `fs status`) and listed. Exits 1 only if no file could be read.

    Images in object storage are listed and read from the bucket (FS_S3_ENDPOINT, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_REGION); each image records its s3:// URL.

    Example: fs ingest ./shoes --dataset spring
    """
    from featurestore.io.objects import is_object_url
    from featurestore.pipelines.ingest import ingest as run_ingest
    from featurestore.pipelines.ingest import parse_labels

    try:
        parse_labels(labels)
    except Exception as exc:
        raise typer.BadParameter(common.error_text(exc), param_hint="--labels") from None
    store = common.open_store(create=True)
    try:
        with store.writing(), common.progress("ingest") as tick:
            source = path if is_object_url(path) else Path(path)
            summary = run_ingest(store, source, dataset=dataset, labels=labels, progress=tick)
    finally:
        store.close()
    for p, reason in summary.failed[:show_failed]:
        common.err(f"  failed: {p}: {reason}")
    if len(summary.failed) > show_failed:
        common.err(f"  ... and {len(summary.failed) - show_failed} more (see `fs status`)")
    msg = f"{summary.dataset}: {summary.found} files: {summary.line()}"
    if summary.new == 0 and summary.duplicates:
        msg += " (nothing new: all images are already in the store)"
    common.err(msg)
    if summary.readable == 0:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
