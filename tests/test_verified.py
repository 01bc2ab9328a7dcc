"""The cross-process record of verified digests (featurestore/io/verified.py, ``remember_in``)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from featurestore.errors import IntegrityError
from featurestore.io import verified
from helpers import count_hashing

# Records are written only for a file whose ctime is older than RACY_NS; the tests shorten it and wait
# past it, so a later write always lands in a later timestamp tick (as it would after 2 s).
RACY_NS = 50_000_000


@pytest.fixture
def aged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str, Path]]:
    """A 64 KiB file old enough to be remembered, its sha256, and the records folder."""
    monkeypatch.setattr(verified, "RACY_NS", RACY_NS)
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1 << 16))
    time.sleep(2 * RACY_NS / 1e9)
    verified.forget()
    yield path, hashlib.sha256(path.read_bytes()).hexdigest(), tmp_path / "records"
    verified.forget()


def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Count the files hashed from now on (:func:`helpers.count_hashing`)."""
    return count_hashing(monkeypatch)


def test_a_later_process_trusts_the_record(aged, monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest, records = aged
    seen = hashes(monkeypatch)
    verified.check_file(path, digest, "test file", remember_in=records)
    assert seen == [path]
    rec = json.loads(verified.record_path(records, path).read_text())
    st = path.stat()
    assert (rec["sha256"], rec["ino"], rec["size"], rec["ctime_ns"]) == (digest, st.st_ino, st.st_size,
                                                                        st.st_ctime_ns)
    verified.forget()  # what a new process starts with
    verified.check_file(path, digest, "test file", remember_in=records)
    assert seen == [path]  # not hashed again
    verified.forget()
    verified.check_file(path, digest, "test file")  # without the folder: hashed as before
    assert seen == [path, path]


def test_modified_file_with_mtime_restored_is_caught(aged, monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest, records = aged
    verified.check_file(path, digest, "test file", remember_in=records)
    assert verified.record_path(records, path).is_file()
    before = path.stat()
    with open(path, "r+b") as fh:  # same size, one byte changed
        fh.seek(1000)
        old = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([old[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime back; ctime cannot go back
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    verified.forget()
    seen = hashes(monkeypatch)
    with pytest.raises(IntegrityError, match="do not match the sha256"):
        verified.check_file(path, digest, "test file", remember_in=records)
    assert seen == [path]


def test_replaced_file_is_caught(aged) -> None:
    path, digest, records = aged
    verified.check_file(path, digest, "test file", remember_in=records)
    other = path.with_name("other.bin")
    other.write_bytes(os.urandom(1 << 16))
    os.replace(other, path)
    verified.forget()
    with pytest.raises(IntegrityError, match="do not match the sha256"):
        verified.check_file(path, digest, "test file", remember_in=records)


def test_record_of_another_digest_is_not_trusted(aged, monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest, records = aged
    verified.check_file(path, digest, "test file", remember_in=records)
    verified.forget()
    with pytest.raises(IntegrityError, match="do not match the sha256"):
        verified.check_file(path, "0" * 64, "test file", remember_in=records)
    verified.forget()
    rec_file = verified.record_path(records, path)
    rec_file.write_text("{not json")  # a damaged record: hashed again, and the file still passes
    seen = hashes(monkeypatch)
    verified.check_file(path, digest, "test file", remember_in=records)
    assert seen == [path]


def test_fresh_file_is_not_remembered(tmp_path: Path) -> None:
    path = tmp_path / "new.bin"
    path.write_bytes(b"x" * 100)  # ctime now: a write in the same tick could keep it
    verified.forget()
    verified.check_file(path, hashlib.sha256(b"x" * 100).hexdigest(), "test file", remember_in=tmp_path / "r")
    assert not verified.record_path(tmp_path / "r", path).exists()
    verified.forget()


def test_unwritable_records_folder_only_means_hashing_again(aged, monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest, records = aged
    records.write_text("a file where the folder would be")
    seen = hashes(monkeypatch)
    verified.check_file(path, digest, "test file", remember_in=records)
    verified.forget()
    verified.check_file(path, digest, "test file", remember_in=records)
    assert seen == [path, path]
