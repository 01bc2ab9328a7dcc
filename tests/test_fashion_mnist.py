"""Fashion-MNIST export, on tiny fake IDX files made in the test."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurestore.cli import hints
from featurestore.errors import FeatureStoreError, InvalidInputError
from featurestore.io.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_SUPERCLASS,
    DatasetMissingError,
    export_fashion_mnist,
    parse_size,
    read_idx,
)


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(gzip.compress(idx_bytes(arr)))


def make_source(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake Fashion-MNIST: image i of a split is filled with a value encoding (split, i)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n, base in (("train", "train", n_train, 0), ("test", "t10k", n_test, 128)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            images[i] = base + i
            images[i, 0, 0] = 255  # a bright corner so resizing is visible
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    data = make_source(src)
    return src, data


def exported(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_class_tables():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "t-shirt" and FASHION_MNIST_CLASSES[9] == "ankle-boot"
    assert set(FASHION_MNIST_SUPERCLASS) == set(FASHION_MNIST_CLASSES)
    groups: dict[str, set[str]] = {}
    for cls, sup in FASHION_MNIST_SUPERCLASS.items():
        groups.setdefault(sup, set()).add(cls)
    assert groups == {
        "footwear": {"sandal", "sneaker", "ankle-boot"},
        "tops": {"t-shirt", "pullover", "coat", "shirt"},
        "bottoms": {"trouser"},
        "dresses": {"dress"},
        "bags": {"bag"},
    }


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    got = read_idx(tmp_path / "a.gz")
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, arr)
    (tmp_path / "plain").write_bytes(idx_bytes(arr[0, 0]))  # not gzipped also works
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), arr[0, 0])


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\x1f\x8b\x08\x00garbage", "cannot decompress"),
        (gzip.compress(b"\x08\x03\x00\x00"), "bad magic"),
        (gzip.compress(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"x"), "type code 0x42"),
        (gzip.compress(idx_bytes(np.zeros((3, 2), np.uint8))[:-1]), "needs 6 data bytes but the file has 5"),
        (gzip.compress(bytes([0, 0, 8, 3]) + b"\x00\x00"), "truncated"),
    ],
)
def test_read_idx_corrupt(tmp_path, payload, reason):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    path.write_bytes(payload)
    with pytest.raises(InvalidInputError, match=reason) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "corrupt IDX file" in str(info.value)


def test_export_layout_and_labels(source, tmp_path):
    src, data = source
    dest = tmp_path / "out"
    calls = []
    summary = export_fashion_mnist(dest, source=src, progress=lambda d, t: calls.append((d, t)))
    assert summary.written == 30 and summary.skipped_existing == 0 and summary.total == 30
    assert summary.dest == dest
    assert summary.per_class == dict.fromkeys(FASHION_MNIST_CLASSES, 3)
    assert calls[-1] == (30, 30) and len(calls) == 30

    files = exported(dest)
    assert len(files) == 30
    for split in ("train", "test"):
        images, labels = data[split]
        for i, label in enumerate(labels):
            cls = FASHION_MNIST_CLASSES[label]
            path = dest / FASHION_MNIST_SUPERCLASS[cls] / cls / f"{split}-{i:05d}.png"
            with Image.open(path) as im:
                assert im.mode == "L" and im.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(im), images[i])
    assert (dest / "footwear" / "ankle-boot" / "train-00009.png").is_file()
    assert (dest / "tops" / "t-shirt" / "test-00000.png").is_file()


def test_export_one_split(source, tmp_path):
    src, _ = source
    summary = export_fashion_mnist(tmp_path / "out", source=src, split="test")
    assert summary.written == 10
    assert all(p.name.startswith("test-") for p in exported(tmp_path / "out"))
    with pytest.raises(InvalidInputError, match="unknown split"):
        export_fashion_mnist(tmp_path / "out", source=src, split="val")


def test_limit_is_balanced_and_deterministic(tmp_path):
    src = tmp_path / "src"
    make_source(src, n_train=200, n_test=50)
    a = export_fashion_mnist(tmp_path / "a", limit=50, seed=3, source=src)
    b = export_fashion_mnist(tmp_path / "b", limit=50, seed=3, source=src)
    assert b.per_class == dict.fromkeys(FASHION_MNIST_CLASSES, 5)
    c = export_fashion_mnist(tmp_path / "c", limit=50, seed=4, source=src)
    assert a.written == 50 and a.per_class == dict.fromkeys(FASHION_MNIST_CLASSES, 5)
    names = [p.relative_to(tmp_path / "a") for p in exported(tmp_path / "a")]
    assert names == [p.relative_to(tmp_path / "b") for p in exported(tmp_path / "b")]
    assert names != [p.relative_to(tmp_path / "c") for p in exported(tmp_path / "c")]
    assert c.per_class == a.per_class

    odd = export_fashion_mnist(tmp_path / "d", limit=13, source=src)
    assert odd.written == 13
    assert list(odd.per_class.values()) == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(InvalidInputError, match="limit"):
        export_fashion_mnist(tmp_path / "e", limit=0, source=src)


def test_size_upscales_to_rgb_jpeg(source, tmp_path):
    src, _ = source
    dest = tmp_path / "out"
    summary = export_fashion_mnist(dest, limit=10, size=(64, 48), fmt="jpeg", source=src)
    files = exported(dest)
    assert summary.written == 10 and len(files) == 10
    for path in files:
        assert path.suffix == ".jpg"
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48)
    assert parse_size("640x480") == (640, 480)
    with pytest.raises(InvalidInputError, match="WIDTHxHEIGHT"):
        parse_size("640")


def test_rerun_skips_existing_and_rewrites_changed(source, tmp_path):
    src, _ = source
    dest = tmp_path / "out"
    export_fashion_mnist(dest, source=src, workers=3)
    victim = dest / "bags" / "bag" / "train-00008.png"
    mtimes = {p: p.stat().st_mtime_ns for p in exported(dest)}

    again = export_fashion_mnist(dest, source=src)
    assert again.written == 0 and again.skipped_existing == 30
    assert {p: p.stat().st_mtime_ns for p in exported(dest)} == mtimes

    # a missing file is recreated; an orphan temp file from a crash is removed
    victim.unlink()
    orphan = victim.with_name(".tmp-1234-deadbeef-train-00008.png")  # the atomic-write temp name
    orphan.write_bytes(b"half")
    third = export_fashion_mnist(dest, source=src)
    assert third.written == 1 and third.skipped_existing == 29
    assert victim.is_file() and not orphan.exists()

    # other parameters: files are compared byte for byte, not trusted
    victim.write_bytes(b"not a png")
    sized = export_fashion_mnist(dest, size=(28, 28), source=src)
    assert sized.written == 30  # RGB now, every file differs
    back = export_fashion_mnist(dest, source=src)
    assert back.written == 30 and back.skipped_existing == 0
    assert not list(dest.rglob(".tmp-*"))


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        export_fashion_mnist(tmp_path / "out", source=tmp_path / "nowhere")
    err = info.value
    assert isinstance(err, FeatureStoreError) and isinstance(err, FileNotFoundError)
    msg = hints.message(err)  # the line `fs datasets export` prints: the facts and the CLI's way out
    assert f"Fashion-MNIST not found at {tmp_path / 'nowhere'}" in msg
    assert "`apt-get install dataset-fashion-mnist` (or pass --source DIR)" in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_corrupt_source_names_the_file(source, tmp_path):
    src, _ = source
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot really")
    with pytest.raises(InvalidInputError, match="t10k-labels-idx1-ubyte.gz"):
        export_fashion_mnist(tmp_path / "out", source=src)
    # labels that do not match the images are caught too
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(InvalidInputError, match="3 labels for 10 images"):
        export_fashion_mnist(tmp_path / "out", source=src)


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_real_package_export(tmp_path):
    summary = export_fashion_mnist(tmp_path / "fm", limit=20)
    assert summary.written == 20
    assert summary.per_class == dict.fromkeys(FASHION_MNIST_CLASSES, 2)
    files = exported(tmp_path / "fm")
    assert len(files) == 20
    with Image.open(files[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"
    train = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    assert train.shape == (60000, 28, 28) and train.dtype == np.uint8
