"""The catalog package after its split by aggregate (issue 28 item 3): small modules, one style, one way in,
and the queries that were written twice now answering from one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from featurestore.catalog.common import Repository
from featurestore.catalog.repository import Catalog
from featurestore.catalog.schema import Dataset, DatasetMember, Image
from featurestore.errors import NotFoundError
from featurestore.features.base import FeatureSpec
from featurestore.store import Store

PACKAGE = Path(__file__).resolve().parents[1] / "featurestore"
CATALOG = PACKAGE / "catalog"


def test_no_catalog_module_over_600_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in CATALOG.glob("*.py")}
    assert len(sizes) >= 15 and max(sizes.values()) <= 600, sizes


def test_no_module_over_600_lines_anywhere() -> None:
    """Issue 28 item 3 holds for the whole package and the CLI, not only the catalog."""
    roots = (PACKAGE, PACKAGE.parent / "cli", PACKAGE.parent / "migrations")
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines())
             for root in roots for p in root.rglob("*.py")}
    assert len(sizes) >= 100 and {p: n for p, n in sizes.items() if n > 600} == {}


def test_aggregates_do_not_shadow_each_other() -> None:
    """Catalog composes the aggregates by inheritance: a method name defined twice would silently hide one."""
    owners: dict[str, list[str]] = {}
    for cls in Catalog.__mro__:
        if cls in (Catalog, Repository, object):
            continue
        for name, value in vars(cls).items():
            if callable(value) and not name.startswith("__"):
                owners.setdefault(name, []).append(cls.__name__)
    assert {n: c for n, c in owners.items() if len(c) > 1} == {}
    assert {"browse_page", "live_shards", "replace_index", "label_history", "set_snapshot"} <= set(owners)


def test_one_style_methods_not_engine_functions() -> None:
    """No public module function of the catalog takes an engine: queries are methods reached through store.catalog."""
    found = []
    for path in CATALOG.glob("*.py"):
        # engine plumbing, not queries: engines and migrations, the read-only connection, the bucket store's
        # advisory write lock (held on a connection of its own)
        if path.name in ("database.py", "readonly.py", "readonly_rules.py"):
            continue
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.args.args
                    and node.args.args[0].arg in ("engine", "conn")):
                found.append(f"{path.name}:{node.name}")
    assert found == []


def test_sql_stays_in_the_catalog() -> None:
    """Outside featurestore/catalog nothing opens a connection on the engine or builds a SELECT."""
    pattern = re.compile(r"\.engine\.(connect|begin)\(|from sqlalchemy import .*\b(select|insert|update|delete)\b")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if CATALOG not in p.parents
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def _images(store: Store, n: int) -> list[int]:
    with store.catalog.session() as s:
        ds = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "t"}]).scalar_one()
        ids = [int(i) for i in s.scalars(insert(Image).returning(Image.id), [
            {"sha256": f"{i:064x}", "source_path": f"/img/{i}.jpg", "width": 1, "height": 1, "format": "JPEG",
             "mode": "RGB", "bytes": 1, "label": f"class{i % 3}", "superclass": "any", "dataset_id": ds}
            for i in range(n)]).all()]
        s.execute(insert(DatasetMember), [{"dataset_id": ds, "image_id": i, "source_path": f"/in/{i}.jpg"}
                                          for i in ids])
    return ids


def test_merged_queries_agree(store: Store) -> None:
    ids = _images(store, 12)
    vecs = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("v", "test", 4, {}))
        store.append_vectors(fs, ids[:6], vecs[:6])
        store.append_vectors(fs, ids[6:10], vecs[6:])
    cat = store.catalog
    shards = cat.shards(fs.id)
    assert [s.rows for s in shards] == [6, 4]
    assert cat.shard_fingerprint(fs.id) == [(shards[0].id, 6), (shards[1].id, 4)]
    assert cat.shard_paths() == {s.path for s in shards} == set(cat.shard_refs().values())
    assert cat.live_row_counts(fs.id) == {shards[0].id: 6, shards[1].id: 4}
    assert [(s.id, s.live) for s in cat.live_shards(fs.id)] == [(shards[0].id, 6), (shards[1].id, 4)]
    assert cat.live_rows_of_shard(shards[1].id).tolist() == [[i, r] for r, i in enumerate(ids[6:10])]
    assert cat.image_ids_with_vector("v") == set(cat.live_image_ids(fs.id)) == set(ids[:10])
    assert cat.image_ids_with_vector("no-such-set") == set()
    assert cat.vector_location(fs.id, ids[7]) == (True, (shards[1].path, 1, shards[1].sha256))
    assert cat.vector_location(fs.id, ids[11]) == (True, None)  # an image without a vector
    assert cat.vector_location(fs.id, max(ids) + 100) == (False, None)
    assert cat.dataset_image_ids("t") == set(ids)
    status = cat.status()
    assert status["images"] == cat.image_count() == 12 and status["datasets"] == [{"dataset": "t", "images": 12}]
    assert cat.paths_of(ids[:2]) == {ids[0]: "/img/0.jpg", ids[1]: "/img/1.jpg"}
    assert cat.labels_of(ids[:2]) == {ids[0]: ("class0", "any"), ids[1]: ("class1", "any")}
    assert cat.prediction_counts() == cat.prediction_counts(test=True) == {}
    for lookup in (cat.run, cat.run_facts):
        with pytest.raises(NotFoundError, match="run"):
            lookup(99)
