"""featurestore.io.cache: a byte-capped, least-recently-used, sha256-checked local copy of objects."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from featurestore.errors import IntegrityError, InvalidInputError
from featurestore.io import objects
from featurestore.io.cache import ReadCache


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.s3
def test_objects_are_cached_checked_and_evicted_least_recently_used(s3_prefix: str, tmp_path: Path) -> None:
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate(["a", "b", "c"])}
    for name, data in blobs.items():
        objects.write_object(s3_prefix + name, data)
    cache = ReadCache(tmp_path / "cache", max_bytes=2500)  # room for two of the three
    downloads: list[str] = []

    def get(name: str) -> Path | bytes:
        def download() -> bytes:
            downloads.append(name)
            return objects.read_object(s3_prefix + name)
        return cache.fetch(s3_prefix + name, _sha(blobs[name]), download)

    for name in ("a", "b"):
        got = get(name)
        assert isinstance(got, Path) and got.read_bytes() == blobs[name]
    os.utime(cache.path_for(_sha(blobs["a"])), ns=(1, 1))
    os.utime(cache.path_for(_sha(blobs["b"])), ns=(2, 2))
    assert get("a") == cache.path_for(_sha(blobs["a"]))  # a hit: no download, and "a" becomes the most recent
    assert downloads == ["a", "b"]
    get("c")  # over the cap: "b", now the least recently used, goes
    assert not cache.path_for(_sha(blobs["b"])).exists()
    assert cache.path_for(_sha(blobs["a"])).exists() and cache.size() == 2000
    # A copy damaged on disk is fetched again, not served.
    cache.path_for(_sha(blobs["a"])).write_bytes(b"rot" * 10)
    assert Path(get("a")).read_bytes() == blobs["a"] and downloads == ["a", "b", "c", "a"]
    # The object in the bucket no longer matches the catalog's sha256: an integrity error, nothing cached.
    cache.path_for(_sha(blobs["c"])).unlink()
    objects.write_object(s3_prefix + "c", b"replaced")
    with pytest.raises(IntegrityError, match=f"{s3_prefix}c does not match the sha256 recorded in the catalog"):
        get("c")
    assert not cache.path_for(_sha(blobs["c"])).exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp-")]


def test_a_file_larger_than_the_cap_is_served_not_kept(tmp_path: Path) -> None:
    data = b"x" * 100
    cache = ReadCache(tmp_path / "cache", max_bytes=50)
    assert cache.fetch("s3://b/big", _sha(data), lambda: data) == data
    assert cache.size() == 0
    with pytest.raises(InvalidInputError, match=">= 0"):
        ReadCache(tmp_path, -1)
