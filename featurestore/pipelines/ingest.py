"""Folder (or CSV manifest) -> catalog rows.

Every file is read and fully decoded once in a thread pool (Pillow releases
the GIL while decoding) to validate it. Content is identified by sha256:
identical content is stored once, so re-ingesting a folder adds nothing.
Bad files never stop the run; each is recorded in ``ingest_errors`` with its
reason and listed in the summary. Rows are inserted in batches, each batch in
one transaction, so an interrupted ingest keeps whole rows only.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore.catalog.repository import check_name
from featurestore.catalog.schema import utcnow
from featurestore.config import Settings
from featurestore.errors import FeatureStoreError, InvalidInputError, InvalidParameterError
from featurestore.io.batching import prefetch_batches
from featurestore.io.images import ImageDecodeError, decode_bytes, is_image_path, read_bytes
from featurestore.io.objects import is_object_url, list_objects, parse_url, reader_threads
from featurestore.store import Store

Progress = Callable[[int, int], None]
BATCH = 256


@dataclass(frozen=True)
class Candidate:
    path: Path | str  # a str is an s3:// URL
    label: str | None
    superclass: str | None

    def source(self) -> str:
        """What the catalog records: the absolute path, or the object's URL."""
        return self.path if isinstance(self.path, str) else str(self.path.resolve())


@dataclass
class IngestSummary:
    dataset: str
    found: int = 0
    new: int = 0
    added: int = 0
    """Files whose content was already stored (from another dataset): added to this dataset."""
    duplicates: int = 0
    """Files whose content is already in this dataset (a re-ingest, or identical files)."""
    moved: int = 0
    """Stored images whose recorded file is gone, found again here: their path now points here
    (counted among ``added`` too when the dataset is new to them, instead of ``duplicates`` otherwise)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    """Catalog id of every readable file, in scan order (stored content maps to the stored image)."""

    @property
    def readable(self) -> int:
        return len(self.image_ids)

    def line(self) -> str:
        added = f"{self.added} already stored (added to {self.dataset}), " if self.added else ""
        moved = f"; {self.moved} moved (their recorded path now points here)" if self.moved else ""
        return f"{self.new} new, {added}{self.duplicates} duplicates, {len(self.failed)} failed{moved}"


def parse_labels(spec: str) -> tuple[str, Path | None]:
    """``dir`` | ``none`` | ``csv:FILE`` -> (mode, file)."""
    if spec in ("dir", "none"):
        return spec, None
    if spec.startswith("csv:") and len(spec) > 4:
        return "csv", Path(spec[4:])
    raise InvalidParameterError("{labels} {value!r} is not one of dir, none, csv:FILE", "labels", value=spec)


def scan(root: Path, labels: str = "dir") -> list[Candidate]:
    """Image files under ``root`` (recursive, sorted) with their labels."""
    mode, manifest = parse_labels(labels)
    if mode == "csv":
        assert manifest is not None
        return _from_manifest(manifest, root)
    if not root.exists() and not root.is_symlink():
        raise InvalidInputError(f"{root} does not exist; give a folder of images or an image file")
    if not root.is_dir():  # one file: read_bytes reports it if it is not a regular file (FIFO, device...)
        return [Candidate(root, None, None)] if is_image_path(root) else []
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not is_image_path(path):
                continue
            label = superclass = None
            if mode == "dir":
                parts = path.relative_to(root).parts[:-1]
                if parts:
                    label = parts[-1]
                    superclass = parts[-2] if len(parts) >= 2 else None
            out.append(Candidate(path, label, superclass))
    return out


def scan_objects(url: str, labels: str = "dir", settings: Settings | None = None) -> list[Candidate]:
    """Image objects under the ``s3://bucket/prefix`` URL (recursive, sorted by key) with their labels.

    Labels come from the key as from folders (``dir``: the last "folder" is the
    class, the one before it the superclass) or not at all (``none``).
    """
    mode, _ = parse_labels(labels)
    if mode == "csv":
        raise InvalidParameterError("{labels} csv:FILE is for folders; label objects by their key (dir) or none",
                                    "labels")
    parsed = parse_url(url)
    prefix = parsed.key if not parsed.key or parsed.key.endswith("/") else parsed.key + "/"
    out = []
    for obj in list_objects(url, settings):
        key = obj.url.key
        rel = key[len(prefix):] if key.startswith(prefix) else key.rpartition("/")[2]
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or not is_image_path(Path(parts[-1])):
            continue
        label = superclass = None
        if mode == "dir" and len(parts) > 1:
            label = parts[-2]
            superclass = parts[-3] if len(parts) >= 3 else None
        out.append(Candidate(str(obj.url), label, superclass))
    if not out and parsed.key and not parsed.key.endswith("/") and is_image_path(Path(parsed.key)):
        return [Candidate(url, None, None)]  # one object, like one file (a missing one is reported when read)
    return out


def _object_dataset(url: str) -> str:
    """The default dataset of an s3:// URL: its last "folder" (the bucket's name at the top)."""
    parsed = parse_url(url)
    parts = [p for p in parsed.key.split("/") if p]
    if parts and is_image_path(Path(parts[-1])):
        parts = parts[:-1]
    return parts[-1] if parts else parsed.bucket


def _manifest_text(manifest: Path) -> str:
    """The manifest decoded as UTF-8 (a BOM is dropped); a bad byte is reported by line."""
    try:
        data = manifest.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read label manifest {manifest}: {exc.strerror or exc}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInputError(
            f"{manifest} line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the CSV as UTF-8"
        ) from None


def _from_manifest(manifest: Path, root: Path) -> list[Candidate]:
    text = _manifest_text(manifest)
    # csv.reader on the text itself (newline=''): a quoted field may hold a newline or a \r.
    reader = csv.reader(io.StringIO(text, newline=""))
    base = root if root.is_dir() else manifest.parent
    out = []
    first = True
    try:
        for row in reader:
            n = reader.line_num
            if first and row and row[0].strip().lower() == "path":
                first = False
                continue
            first = False
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < 2:
                raise InvalidInputError(f"{manifest} line {n}: expected path,label[,superclass], got {','.join(row)!r}")
            if any("\0" in c for c in row):
                raise InvalidInputError(f"{manifest} line {n}: a field contains a NUL byte (0x00); remove it")
            # Only spaces and tabs around the path are dropped: a quoted path keeps its newlines.
            p = Path(row[0].strip(" \t"))
            path = p if p.is_absolute() else base / p
            label = row[1].strip() or None
            superclass = (row[2].strip() or None) if len(row) > 2 else None
            out.append(Candidate(path, label, superclass))
    except csv.Error as exc:
        raise InvalidInputError(f"{manifest} line {reader.line_num}: not valid CSV ({exc})") from None
    return out


def ingest(
    store: Store,
    root: Path | str,
    dataset: str | None = None,
    labels: str = "dir",
    progress: Progress | None = None,
) -> IngestSummary:
    """Ingest the images under ``root`` into ``dataset`` (default: the folder's name).

    ``root`` may be an ``s3://bucket/prefix`` URL: its objects are listed and
    read from object storage, and each image records its URL. Must be called
    under ``store.writing()``.
    """
    if is_object_url(root):
        url = str(root)
        name = dataset or _object_dataset(url)
        candidates = scan_objects(url, labels, store.settings)
    else:
        root = Path(root)
        name = dataset or (root.resolve().name if root.is_dir() else root.resolve().parent.name) or "default"
        candidates = scan(root, labels)
    summary = IngestSummary(dataset=name, found=len(candidates))
    if not candidates:
        raise FeatureStoreError(
            f"no image files under {root} (looked for jpg, jpeg, png, webp, bmp, gif, tif, tiff)"
        )
    check_name("dataset", name)
    with store.catalog.session() as s:
        created = not store.catalog.dataset_exists(s, name)
        dataset_id = store.catalog.dataset_id(s, name, create=True)
    seen = _Seen()
    max_pixels = store.settings.max_image_pixels
    max_bytes = store.settings.max_file_bytes
    done = 0

    def work(c: Candidate) -> tuple[Candidate, object]:
        try:
            decoded = decode_bytes(read_bytes(c.path, max_bytes), max_pixels)
            # Keep metadata only: pixels are not needed after validation.
            return c, (decoded.sha256, decoded.width, decoded.height, decoded.format, decoded.mode,
                       decoded.nbytes)
        except ImageDecodeError as exc:
            return c, exc
        except Exception as exc:  # a decoder bug must not stop the run either
            return c, ImageDecodeError(f"unexpected decoder error: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=reader_threads(store.settings.workers, [root])) as pool:
        # The decoders stay busy while the main thread writes the previous batch.
        for results in prefetch_batches(pool, work, candidates, BATCH):
            _store_batch(store, dataset_id, results, seen, summary)
            done += len(results)
            if progress:
                progress(done, len(candidates))
    if created and not summary.image_ids:  # nothing readable (a FIFO, a broken file): no empty dataset left
        with store.catalog.session() as s:
            store.catalog.drop_if_empty(s, dataset_id)
    return summary


@dataclass
class _Seen:
    """What the ingest knows of each content met so far: its image id, label and first path."""

    ids: dict[str, int] = field(default_factory=dict)
    labels: dict[str, tuple[str | None, str | None, str]] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)  # contents already in this dataset


def _moved(seen: _Seen, sha: str, c: Candidate, moves: dict[int, tuple[str, str]]) -> bool:
    """Whether the stored image of ``sha`` lost its file and ``c`` is it found again (then ``moves`` gets it).

    A stored path that is still a file is kept: ``c`` is then a second copy, not a move.
    """
    label, superclass, old = seen.labels[sha]
    new = c.source()
    # an object in a bucket is not checked here (a GET per duplicate): only a vanished local file is a move
    if old == new or old.startswith("s3://") or os.path.isfile(old):
        return False
    moves[seen.ids[sha]] = (old, new)
    seen.labels[sha] = (label, superclass, new)
    return True


def _count_again(seen: _Seen, sha: str, c: Candidate, moves: dict[int, tuple[str, str]],
                 summary: IngestSummary) -> None:
    if sha in seen.ids and _moved(seen, sha, c, moves):
        summary.moved += 1
    else:
        summary.duplicates += 1


def _label_conflict(stored: tuple[str | None, str | None, str], c: Candidate) -> str | None:
    """The reason to refuse ``c`` when its label contradicts the stored image's, else None."""
    label, superclass, path = stored
    if c.label is None or label is None or (label, superclass) == (c.label, c.superclass):
        return None
    return (f"same image as {path}, which is labelled {label!r}, here {c.label!r}: an image has one label; "
            "fix the label or remove one of the copies")


def _learn_stored(store: Store, s: Any, dataset_id: int, results: list, seen: _Seen) -> None:
    """What the catalog holds of this batch's contents not met yet in this run."""
    shas = [r[0] for _, r in results if not isinstance(r, Exception) and r[0] not in seen.ids]
    for sha, found in store.catalog.stored_contents(s, shas, dataset_id).items():
        seen.ids[sha] = found.image_id
        seen.labels[sha] = (found.label, found.superclass, found.source_path)
        if found.member:
            seen.members.add(sha)


def _store_batch(store: Store, dataset_id: int, results: list, seen: _Seen, summary: IngestSummary) -> None:
    """Insert one batch in one transaction: new images, memberships, labels filled in, failures."""
    catalog = store.catalog
    with catalog.session() as s:
        _learn_stored(store, s, dataset_id, results, seen)
        now = utcnow()
        failed = [(str(c.path), str(r)) for c, r in results if isinstance(r, Exception)]
        new_rows: list[dict] = []
        joins: list[tuple[str, str]] = []
        relabel: dict[str, tuple[str, str | None]] = {}
        moves: dict[int, tuple[str, str]] = {}
        readable: list[str] = []
        for c, r in results:
            if isinstance(r, Exception):
                continue
            sha, w, h, fmt, mode, nbytes = r
            conflict = _label_conflict(seen.labels[sha], c) if sha in seen.labels else None
            if conflict:
                failed.append((str(c.path), conflict))
                continue
            readable.append(sha)
            if sha in seen.members:  # met again: a moved file, or a duplicate
                _count_again(seen, sha, c, moves, summary)
                continue
            seen.members.add(sha)
            if sha in seen.ids:  # stored from another dataset: this dataset gains a member
                summary.added += 1
                summary.moved += _moved(seen, sha, c, moves)
                joins.append((sha, c.source()))
                if seen.labels[sha][0] is None and c.label is not None:  # an unlabelled image gets its label
                    relabel[sha] = (c.label, c.superclass)
                    seen.labels[sha] = (c.label, c.superclass, seen.labels[sha][2])
                continue
            seen.labels[sha] = (c.label, c.superclass, str(c.path))
            new_rows.append({"sha256": sha, "source_path": c.source(), "width": w, "height": h,
                             "format": fmt, "mode": mode, "bytes": nbytes, "label": c.label,
                             "superclass": c.superclass, "dataset_id": dataset_id, "ingested_at": now})
        catalog.record_ingest_errors(s, dataset_id, [str(c.path) for c, _ in results], failed)
        summary.failed.extend(failed)
        if new_rows:
            ids = catalog.add_images(s, new_rows)
            seen.ids.update(zip((r["sha256"] for r in new_rows), ids, strict=True))
            joins += [(r["sha256"], r["source_path"]) for r in new_rows]
            summary.new += len(new_rows)
        catalog.add_members(s, dataset_id, [(seen.ids[sha], path) for sha, path in joins], now)
        catalog.set_labels(s, {seen.ids[sha]: lab for sha, lab in relabel.items()})
        catalog.record_moves(s, moves)
        summary.image_ids.extend(seen.ids[sha] for sha in readable)
