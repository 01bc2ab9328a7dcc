"""featurestore.io.cache: a byte-capped, least-recently-used, sha256-checked local copy of objects."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from featurestore.errors import IntegrityError, InvalidInputError
from featurestore.io import objects, verified
from featurestore.io.atomic import tmp_path_for
from featurestore.io.cache import ReadCache
from featurestore.io.objects import ObjectStream
from helpers import count_hashing


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


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The files hashed by reading them back (:func:`verified.file_sha256`, or any ``hashlib.file_digest``)
    from now on, with nothing remembered by this process."""
    verified.forget()
    yield count_hashing(monkeypatch)
    verified.forget()


def _stream(data: bytes, chunk: int = 300, size: int | None = None) -> ObjectStream:
    blocks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return ObjectStream(len(data) if size is None else size, iter(blocks))


def test_a_later_process_trusts_an_unchanged_copy_and_hashes_a_rewritten_one(tmp_path: Path,
                                                                             counted: list[Path]) -> None:
    data = os.urandom(5000)
    downloads: list[int] = []

    def download() -> ObjectStream:
        downloads.append(1)
        return _stream(data)

    path = ReadCache(tmp_path / "cache", 1 << 20).fetch("s3://b/x", _sha(data), download)
    assert isinstance(path, Path) and path.read_bytes() == data and len(downloads) == 1
    assert counted == []  # hashed as it streamed in, not read back
    # A fresh process (nothing remembered in memory, a new cache object): the copy's fingerprint is the one
    # recorded at download, so it is served without hashing or downloading.
    verified.forget()
    assert ReadCache(tmp_path / "cache", 1 << 20).fetch("s3://b/x", _sha(data), download) == path
    assert counted == [] and len(downloads) == 1
    # The copy rewritten in place with other bytes of the same size (a new mtime and ctime): hashed, found
    # wrong, discarded and fetched again, in this process and in the next.
    for _ in range(2):
        time.sleep(0.01)
        path.write_bytes(bytes(b ^ 0xFF for b in data))
        verified.forget()
        before = len(counted)
        assert ReadCache(tmp_path / "cache", 1 << 20).fetch("s3://b/x", _sha(data), download) == path
        assert path.read_bytes() == data and counted[before:] == [path]
    assert len(downloads) == 3


def test_a_short_or_failed_download_leaves_no_entry(tmp_path: Path) -> None:
    data = os.urandom(1000)
    cache = ReadCache(tmp_path / "cache", 1 << 20)
    with pytest.raises(IntegrityError, match=r"s3://b/short: the download ended after 1,000 of 2,000 bytes"):
        cache.fetch("s3://b/short", _sha(data), lambda: _stream(data, size=2000))

    def failing() -> Iterator[bytes]:
        yield data[:300]
        raise objects.EndpointUnreachableError("cannot reach the object store for s3://b/cut")

    with pytest.raises(objects.EndpointUnreachableError, match="s3://b/cut"):
        cache.fetch("s3://b/cut", _sha(data), lambda: ObjectStream(1000, failing()))
    with pytest.raises(IntegrityError, match="s3://b/wrong does not match the sha256"):
        cache.fetch("s3://b/wrong", _sha(data), lambda: _stream(os.urandom(1000)))
    assert cache.size() == 0 and not cache.path_for(_sha(data)).exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp-")]
    # A process killed mid-download leaves its temp file: removed by the next eviction once it is old.
    left = tmp_path_for(cache.path_for(_sha(data)))
    left.write_bytes(data[:300])
    os.utime(left, ns=(1, 1))
    assert cache.fetch("s3://b/ok", _sha(data), lambda: _stream(data)) == cache.path_for(_sha(data))
    assert not left.exists() and cache.size() == 1000


def test_pinned_copies_stay_and_a_download_without_room_is_served_from_memory(tmp_path: Path) -> None:
    blobs = [bytes([i]) * 1000 for i in range(4)]
    cache = ReadCache(tmp_path / "cache", max_bytes=2500)
    a, b = (cache.fetch(f"s3://b/{i}", _sha(blobs[i]), lambda i=i: _stream(blobs[i]), pin=True) for i in (0, 1))
    assert isinstance(a, Path) and isinstance(b, Path)
    # Both copies are promised to readers: the third is not kept (the cap holds) but served.
    assert cache.fetch("s3://b/2", _sha(blobs[2]), lambda: _stream(blobs[2]), pin=True) == blobs[2]
    assert cache.size() == 2000 and a.exists() and b.exists()
    cache.release(a)
    got = cache.fetch("s3://b/3", _sha(blobs[3]), lambda: _stream(blobs[3]))
    assert got == cache.path_for(_sha(blobs[3])) and not a.exists() and b.exists() and cache.size() == 2000
    assert len(list(cache.records.glob("*.json"))) == 2  # the evicted copy's record went with it


@pytest.mark.s3
def test_a_streamed_get_has_the_objects_size_and_bytes(s3_prefix: str) -> None:
    data = os.urandom(5 << 20)
    objects.write_object(s3_prefix + "big", data)
    parsed = objects.parse_url(s3_prefix + "big")
    got = objects.bucket(parsed.bucket).stream(parsed.key, chunk=1 << 20)
    blocks = list(got.chunks)
    assert got.size == len(data) and b"".join(blocks) == data and len(blocks) >= 2
    with pytest.raises(objects.ObjectNotFoundError, match=f"no object at {s3_prefix}gone"):
        objects.bucket(parsed.bucket).stream(parsed.key[:-3] + "gone")
