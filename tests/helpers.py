"""Test helpers importable from any test module (``from helpers import make_image``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featurestore.cli import hints
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.ingest import ingest
from featurestore.store import Store

NEAR_COPY_CLASSES = ["sneaker", "sandal", "shirt"]


def make_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB",
               fmt: str | None = None, **save: object) -> Path:
    """Write a small random image; each seed gives different content."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path


def brute(query, ids, mat, k, metric, exclude=(), allowed=None):  # type: ignore[no-untyped-def]
    """Reference: score every row in float64, sort by (score, id)."""
    x = mat.astype(np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        scores = np.where(norms > 0, x @ q / safe / np.linalg.norm(q), 0.0)
        key = -scores
    else:
        scores = np.linalg.norm(x - q, axis=1)
        key = scores
    ok = ~np.isin(ids, list(exclude))
    if allowed is not None:
        ok &= np.isin(ids, allowed)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((ids[idx], key[idx]))][:k]
    return ids[order].tolist(), scores[order]


def ingest_with_near_copies(store: Store, tmp_path: Path, per_class: int = 8, copies: int = 4,
                        datasets: tuple[str, str] | None = None) -> dict[int, int]:
    """``per_class`` originals per class and, for the first ``copies`` of each, a near copy (another file whose
    vector in the CNN-kind set "c" is the original's plus a little noise). Returns copy id -> original id.

    With ``datasets`` the originals go to the first dataset and the copies to the second.
    """
    seed = 0
    for cls in NEAR_COPY_CLASSES:
        for k in range(per_class):
            make_image(tmp_path / "orig" / cls / f"{k}.png", size=(16, 12), seed=seed)
            seed += 1
            if k < copies:
                make_image(tmp_path / "copy" / cls / f"{k}.png", size=(16, 12), seed=1000 + seed)
    with store.writing():
        a = ingest(store, tmp_path / "orig", dataset=datasets[0] if datasets else "orig")
        b = ingest(store, tmp_path / "copy", dataset=datasets[1] if datasets else "copy")
    paths = {r[0]: r[1] for r in store.select_images()}
    by_name = {Path(paths[i]).parent.name + "/" + Path(paths[i]).name: i for i in a.image_ids}
    copy_of = {i: by_name[Path(paths[i]).parent.name + "/" + Path(paths[i]).name] for i in b.image_ids}
    rows = store.select_images()
    rng = np.random.default_rng(0)
    centers = {cls: rng.normal(scale=3, size=8) for cls in NEAR_COPY_CLASSES}
    base = {r[0]: centers[r[2]] + rng.normal(size=8) for r in rows if r[0] not in copy_of}
    vec = {**base, **{c: base[o] + rng.normal(scale=0.01, size=8) for c, o in copy_of.items()}}
    ids = sorted(vec)
    with store.writing():
        fc = store.ensure_feature_set(FeatureSpec("c", "cnn", 8, {}))
        store.append_vectors(fc, ids, np.stack([vec[i] for i in ids]).astype(np.float32))
        fr = store.ensure_feature_set(FeatureSpec("r", "random_projection", 3, {}))
        store.append_vectors(fr, ids, rng.normal(size=(len(ids), 3)).astype(np.float32))
    return copy_of


@contextmanager
def raises_cli(exc_type: type[BaseException], match: str) -> Iterator[Any]:
    """``pytest.raises`` for a library error whose line, as ``fs`` prints it (``cli/hints.py``), matches ``match``.

    The library's message states the facts; the command or flag to run next is
    the CLI's wording, so that is what a check naming `fs` or a ``--flag`` reads.
    """
    with pytest.raises(exc_type) as info:
        yield info
    line = hints.message(info.value)
    assert re.search(match, line), f"{match!r} not in {line!r}"


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files hashed by reading them back from now on, by any route: ``verified.file_sha256`` (which reads
    the file itself) or ``hashlib.file_digest``."""
    import hashlib

    from featurestore.io import verified

    seen: list[Path] = []
    real, real_digest = verified.file_sha256, hashlib.file_digest

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(Path(path))
        return real(path, *args, **kwargs)

    def digest(fh, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(Path(fh.name))
        return real_digest(fh, *args, **kwargs)

    monkeypatch.setattr(verified, "file_sha256", counting)
    monkeypatch.setattr(hashlib, "file_digest", digest)
    return seen
