from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from featurestore.catalog.schema import Image as ImageRow
from featurestore.catalog.schema import IngestError
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.io.images import decode_bytes, to_rgb
from featurestore.pipelines.ingest import ingest, scan
from featurestore.store import Store
from helpers import make_image


def _count(store: Store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count(ImageRow.id))) or 0


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image (the data need not be complete)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(
        b"IEND", b"")


def test_labels_from_folders_and_summary(store: Store, image_tree: Path) -> None:
    with store.writing():
        summary = ingest(store, image_tree, dataset="spring")
    assert (summary.new, summary.duplicates, len(summary.failed)) == (12, 0, 0)
    rows = store.select_images(dataset="spring")
    assert {(r[3], r[2]) for r in rows} == {("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")}
    with store.writing():
        again = ingest(store, image_tree, dataset="spring")
    assert (again.new, again.duplicates) == (0, 12)
    assert _count(store) == 12


def test_identical_content_stored_once(store: Store, tmp_path: Path) -> None:
    a = make_image(tmp_path / "d" / "x" / "a.png", seed=1)
    (tmp_path / "d" / "y").mkdir()
    (tmp_path / "d" / "y" / "copy.png").write_bytes(a.read_bytes())
    with store.writing():
        # unlabelled: the two folder names would give the one image two labels (see test_datasets.py)
        s = ingest(store, tmp_path / "d", labels="none")
        again = ingest(store, tmp_path / "d" / "y", labels="none")
    assert (s.new, s.duplicates) == (1, 1)
    # every readable file maps to the one stored copy, also across runs
    (only,) = [r[0] for r in store.select_images()]
    assert s.image_ids == [only, only] and again.image_ids == [only]


def test_every_kind_of_bad_file_is_recorded_and_skipped(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mixed" / "cls"
    good = make_image(root / "good.jpg", seed=3)
    full = make_image(tmp_path / "full.jpg", size=(200, 150), seed=4).read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(png, "PNG")
    corrupt = bytearray(png.getvalue())
    corrupt[60:80] = b"\xff" * 20
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    (root / "bomb.png").write_bytes(_huge_png(30000, 30000))
    (root / "dangling.jpg").symlink_to(tmp_path / "does-not-exist.jpg")
    locked = make_image(root / "locked.png", seed=5)
    original = os.open

    def deny(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if Path(str(path)).name == locked.name:  # tests run as root: chmod 000 would not stop the read
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    with store.writing():
        summary = ingest(store, tmp_path / "mixed")
    reasons = {Path(p).name: r for p, r in summary.failed}
    assert summary.new == 1 and good.name not in reasons
    assert set(reasons) == {"truncated.jpg", "corrupt.png", "empty.png", "notes.jpg", "bomb.png",
                            "dangling.jpg", "locked.png"}
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "not an image" in reasons["notes.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert reasons["dangling.jpg"] == "broken symlink"
    assert reasons["locked.png"] == "permission denied"
    with store.session() as s:
        stored = dict(s.execute(select(IngestError.path, IngestError.reason)).all())
    assert {Path(p).name for p in stored} == set(reasons)
    assert _count(store) == 1


def test_rerun_replaces_old_error_rows(store: Store, tmp_path: Path) -> None:
    bad = tmp_path / "d" / "c" / "x.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_text("nope")
    make_image(tmp_path / "d" / "c" / "ok.png")
    with store.writing():
        ingest(store, tmp_path / "d")
        ingest(store, tmp_path / "d")
    with store.session() as s:
        assert s.scalar(select(func.count(IngestError.id))) == 1


def test_nothing_readable_and_empty_folder(store: Store, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("x")
    with store.writing():
        s = ingest(store, tmp_path / "bad")
    assert s.readable == 0 and len(s.failed) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureStoreError, match="no image files under"):
        with store.writing():
            ingest(store, tmp_path / "empty")


def test_csv_manifest_labels(store: Store, tmp_path: Path) -> None:
    make_image(tmp_path / "flat" / "a.png", seed=1)
    make_image(tmp_path / "flat" / "b.png", seed=2)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label,superclass\na.png,boot,footwear\nb.png,coat\n")
    with store.writing():
        s = ingest(store, tmp_path / "flat", labels=f"csv:{manifest}")
    assert s.new == 2
    assert sorted((r[2], r[3]) for r in store.select_images()) == [("boot", "footwear"), ("coat", None)]
    manifest.write_text("a.png\n")
    with pytest.raises(InvalidInputError, match="labels.csv line 1: expected path,label"):
        scan(tmp_path / "flat", f"csv:{manifest}")


def test_case_insensitive_extensions_and_non_images_ignored(tmp_path: Path) -> None:
    make_image(tmp_path / "r" / "c" / "A.JPG", fmt="JPEG")
    make_image(tmp_path / "r" / "c" / "b.TiFf", fmt="TIFF")
    (tmp_path / "r" / "c" / "readme.txt").write_text("hi")
    names = sorted(c.path.name for c in scan(tmp_path / "r"))
    assert names == ["A.JPG", "b.TiFf"]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_modes_become_rgb(mode: str) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode if mode not in ("I;16",) else "L")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257).convert("I;16")
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = decode_bytes(buf.getvalue())
    assert out.image.mode == "RGB" and out.image.size == (30, 20)
    assert out.mode == mode
    if mode == "I;16":  # 16-bit scaled to the full 8-bit range, not clipped
        assert np.asarray(out.image).max() > 200


def test_rgba_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied() -> None:
    img = Image.fromarray(np.zeros((10, 40, 3), np.uint8))  # 40 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    out = decode_bytes(buf.getvalue())
    assert (out.width, out.height) == (10, 40)
