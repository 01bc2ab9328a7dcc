"""Rows cross the catalog boundary as named records, not tuples read by index (issue 28 item 4).

The first test reads the return annotation of every public method of the catalog repositories, so a method
added later with a bare ``tuple[...]`` (or ``list[Any]``) return fails it; the others check that the records
carry the right values under their names.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import inspect
import types
import typing
from datetime import datetime
from typing import Any, Union

import numpy as np
from sqlalchemy import insert

from featurestore.catalog import repository as catalog
from featurestore.catalog.common import Repository
from featurestore.catalog.repository import Catalog
from featurestore.catalog.schema import Dataset, DatasetMember, Image, Run, utcnow
from featurestore.features.base import FeatureSpec
from featurestore.store import Store

# Containers of rows: what is inside them is checked, the container itself is fine.
_CONTAINERS = {list, set, frozenset, dict, cabc.Iterator, cabc.Iterable, cabc.Sequence, cabc.Mapping}
# Whose values are keyed by name (``status()``'s JSON-like summary), so ``Any`` is allowed as a dict value.
_NAMED_VALUES = {dict, cabc.Mapping}


def _is_record(tp: Any) -> bool:
    """A NamedTuple or a frozen dataclass."""
    if not isinstance(tp, type):
        return False
    if issubclass(tp, tuple):
        return hasattr(tp, "_fields")
    return dataclasses.is_dataclass(tp) and tp.__dataclass_params__.frozen  # type: ignore[attr-defined]


def _problems(tp: Any, where: str, records: set[type]) -> list[str]:
    """Why the annotation ``tp`` lets an unnamed row through (empty when it does not); records seen go to
    ``records``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return [f"{where}: Any"]
    if tp is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: an immutable sequence of X
            return _problems(args[0], where, records)
        return [f"{where}: {tp}"]
    if origin in (Union, types.UnionType):
        return [p for a in args for p in _problems(a, where, records)]
    if origin in _CONTAINERS:
        if origin in _NAMED_VALUES:
            key, value = args
            return _problems(key, where, records) + ([] if value is Any else _problems(value, where, records))
        return [p for a in args for p in _problems(a, where, records)]
    if tp is list or tp is dict or tp is set:
        return [f"{where}: bare {tp.__name__}"]
    if isinstance(tp, type) and issubclass(tp, tuple) and tp.__module__.startswith("featurestore"):
        records.add(tp)
        if not _is_record(tp):
            return [f"{where}: {tp.__name__} is a tuple without field names"]
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp.__module__.startswith("featurestore.catalog"):
        records.add(tp)
        if not _is_record(tp):
            return [f"{where}: dataclass {tp.__name__} is not frozen"]
    return []


def _public_methods() -> dict[str, Any]:
    found = {}
    for cls in Catalog.__mro__:
        if cls in (Catalog, Repository, object):
            continue
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and not name.startswith("_"):
                found[name] = value
    return found


def test_no_catalog_method_returns_a_bare_tuple() -> None:
    """Neither in what a method returns nor in the fields of the records it returns, at any depth."""
    methods = _public_methods()
    records: set[type] = set()
    problems = []
    for name, fn in sorted(methods.items()):
        hints = typing.get_type_hints(fn)
        assert "return" in hints, f"{name} has no return annotation"
        problems += _problems(hints["return"], name, records)
    seen: set[type] = set()
    while records - seen:
        record = min(records - seen, key=lambda r: r.__name__)
        seen.add(record)
        for field, tp in typing.get_type_hints(record).items():
            if not field.startswith("_"):
                problems += _problems(tp, f"{record.__name__}.{field}", records)
    assert problems == []
    assert len(methods) > 80  # every aggregate was walked, not only the first class
    named = {r.__name__ for r in seen}
    assert {"SetCoverage", "DatasetCount", "LabelCount", "RowsAtVersion", "StoredVersion", "IndexState", "IndexKey",
            "ConfusionCount", "Mistake", "ImageRow", "VectorLocation", "VectorAt", "MenuCount", "RunChoice",
            "LabelProbability", "PathLabel"} <= named


def test_the_checker_catches_what_it_is_for() -> None:
    """The walk above would report each of the shapes the catalog used to return."""
    shapes = [list[tuple[str, int]], tuple[int, dict[int, tuple[str, str | None]]], dict[int, tuple[str, float]],
              tuple[bool, tuple[str, int] | None], list[Any], tuple[str, ...] | tuple[int, int]]
    assert all(_problems(tp, "x", set()) for tp in shapes)
    assert _problems(dict[str, Any], "x", set()) == []
    assert _problems(list[catalog.SetCoverage] | None, "x", set()) == []
    assert _problems(tuple[int, ...], "x", set()) == []


def test_records_are_exported_where_the_catalog_is_reached() -> None:
    for name in ("SetCoverage", "DatasetCount", "LabelCount", "DatasetOverlap", "PathLabel", "ImageLabels",
                 "StoredContent", "ImageDetail", "ImageRow", "ShardTally", "ShardSize", "StoredVersion", "IndexKey",
                 "IndexState", "RowsAtVersion", "VectorAt", "VectorLocation", "StoredPrediction", "PredictedLabel",
                 "ConfusionCount", "Mistake", "MenuCount", "RunChoice", "LabelProbability"):
        assert name in catalog.__all__ and _is_record(getattr(catalog, name)), name


def _images(store: Store) -> list[int]:
    """Six images in dataset "a" (three also in "b"); labels class0..class2 under superclass "any"."""
    with store.catalog.session() as s:
        a, b = s.execute(insert(Dataset).returning(Dataset.id), [{"name": "a"}, {"name": "b"}]).scalars().all()
        ids = [int(i) for i in s.scalars(insert(Image).returning(Image.id), [
            {"sha256": f"{i:064x}", "source_path": f"/img/{i}.jpg", "width": 1, "height": 1, "format": "JPEG",
             "mode": "RGB", "bytes": 1, "label": f"class{i % 3}", "superclass": "any", "dataset_id": a}
            for i in range(6)]).all()]
        s.execute(insert(DatasetMember), [{"dataset_id": a, "image_id": i, "source_path": f"/img/{k}.jpg"}
                                          for k, i in enumerate(ids)])
        s.execute(insert(DatasetMember), [{"dataset_id": b, "image_id": i, "source_path": f"/img/{k}.jpg"}
                                          for k, i in enumerate(ids[:3])])
    return ids


def test_image_and_dataset_records_carry_their_fields(store: Store) -> None:
    ids = _images(store)
    cat = store.catalog
    counts = {d.name: d for d in cat.dataset_counts()}
    assert (counts["a"].images, counts["b"].images) == (6, 3) and isinstance(counts["a"].created_at, datetime)
    assert [(c.superclass, c.label, c.images) for c in cat.dataset_labels("a")] == [
        ("any", "class0", 2), ("any", "class1", 2), ("any", "class2", 2)]
    assert [(o.dataset, o.images) for o in cat.dataset_overlaps("b")] == [("a", 3)]
    rows = cat.image_rows("b", True, None)
    assert [(r.id, r.source_path, r.label, r.superclass) for r in rows] == [
        (i, f"/img/{k}.jpg", f"class{k}", "any") for k, i in enumerate(ids[:3])]
    assert cat.selected_image_ids("b", True, None) == [r.id for r in rows] == ids[:3]
    assert cat.selected_image_ids(None, False, ids[4:]) == ids[4:]
    found = cat.image_paths_labels(ids[1:2])[ids[1]]
    assert (found.source_path, found.label) == ("/img/1.jpg", "class1")
    labels = cat.labels_of(ids[2:3])[ids[2]]
    assert (labels.label, labels.superclass) == ("class2", "any")
    detail = cat.image_detail(ids[0])
    assert detail is not None and detail.image.id == ids[0]
    assert (detail.datasets, detail.feature_sets) == (["a", "b"], [])
    with cat.session() as s:
        stored = cat.stored_contents(s, [f"{5:064x}", f"{1:064x}"], cat.dataset_id(s, "b"))
    assert (stored[f"{5:064x}"].image_id, stored[f"{5:064x}"].member) == (ids[5], False)
    assert (stored[f"{1:064x}"].source_path, stored[f"{1:064x}"].member) == ("/img/1.jpg", True)
    now = cat.rows_at_version(ids[:2])
    assert now.version == cat.catalog_version() and now.rows[ids[0]].source_path == "/img/0.jpg"


def test_feature_set_records_carry_their_fields(store: Store) -> None:
    ids = _images(store)
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("v", "test", 4, {}))
        store.append_vectors(fs, ids[:4], np.ones((4, 4), dtype=np.float32))
        store.append_vectors(fs, ids[4:5], np.ones((1, 4), dtype=np.float32))
    cat = store.catalog
    (row,) = cat.coverage()
    assert (row.name, row.kind, row.dim, row.images, row.shards) == ("v", "test", 4, 5, 2)
    shards = cat.shards(fs.id)
    assert [(s.id, s.rows) for s in cat.shard_fingerprint(fs.id)] == [(shards[0].id, 4), (shards[1].id, 1)]
    lost = cat.rows_in_shards([shards[1].id])["v"]
    assert (lost.rows, lost.shards) == (1, 1)
    assert [(v.version, v.row_name) for v in cat.versions_of("v")] == [(1, "v")]
    state = cat.index_state(fs.id)
    assert (state.key, state.shards) == (None, [])  # no index built
    at = cat.vector_location(fs.id, ids[4])
    assert at.exists and at.vector is not None
    assert (at.vector.path, at.vector.row, at.vector.sha256) == (shards[1].path, 0, shards[1].sha256)
    assert cat.vector_location(fs.id, ids[5]) == catalog.VectorLocation(True, None)


def test_run_records_carry_their_fields(store: Store) -> None:
    ids = _images(store)
    cat = store.catalog
    run = Run(status="done", features=["v"], feature_params={}, target="label", selection={}, classifier="rf",
              classifier_params={}, seed=0, n_splits=1, test_size=0.2, split_scheme="stratified",
              splits_fingerprint="0" * 64, n_images=6, versions={}, timings={}, created_at=utcnow())
    run_id = cat.add_run(run, [{"split": 0, "test_accuracy": 0.5, "train_accuracy": 1.0, "macro_f1": 0.5,
                                "fit_seconds": 0.1, "n_train": 4, "n_test": 2}])
    # ids[0] right (class0), ids[1] wrong with 0.9, ids[2] wrong with 0.6
    cat.replace_predictions(run_id, [
        {"run_id": run_id, "image_id": ids[0], "label": "class0", "probability": 0.8, "top5": []},
        {"run_id": run_id, "image_id": ids[1], "label": "class2", "probability": 0.9,
         "top5": [{"label": "class2", "probability": 0.9}]},
        {"run_id": run_id, "image_id": ids[2], "label": "class0", "probability": 0.6, "top5": []}])
    got = cat.run_predictions_of(run_id, ids)
    assert set(got) == set(ids[:3]) and (got[ids[1]].label, got[ids[1]].probability) == ("class2", 0.9)
    one = cat.image_predictions(ids[1])[run_id]
    assert (one.label, one.probability, one.top5) == ("class2", 0.9, [{"label": "class2", "probability": 0.9}])
    assert isinstance(one.predicted_at, datetime)
    facts = cat.run_facts(run_id)
    counts = {(c.truth, c.predicted): c.images for c in cat.confusion_counts(facts)}
    assert counts == {("class0", "class0"): 1, ("class1", "class2"): 1, ("class2", "class0"): 1}
    wrong = cat.confident_mistakes(facts)
    assert [(m.image_id, m.truth, m.predicted, m.probability) for m in wrong] == [
        (ids[1], "class1", "class2", 0.9), (ids[2], "class2", "class0", 0.6)]
    top = {r.image_id: r.top5 for r in cat.prediction_page(run_id)}
    assert top[ids[0]] == () and [(t.label, t.probability) for t in top[ids[1]]] == [("class2", 0.9)]
