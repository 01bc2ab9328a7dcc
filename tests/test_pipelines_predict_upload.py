"""featurestore.pipelines.predict.predict_upload with keep=True: the image, its vectors and the
prediction row are committed together, or not at all (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import featurestore.pipelines.predict as predict_mod
from featurestore.catalog.schema import Prediction
from featurestore.errors import UnsupportedMediaError
from featurestore.features.projection import projection_extractor
from featurestore.io.images import decode_bytes
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.predict import predict_upload
from featurestore.pipelines.train import TrainConfig, train
from featurestore.store import Store


@pytest.fixture
def trained(store: Store, image_tree: Path) -> Store:
    with store.writing():
        ingest(store, image_tree, dataset="shoes")
        extract(store, [projection_extractor(store, 16, (32, 24))])
        train(store, TrainConfig(["rp16"], n_splits=2, trees=5))
    return store


def _upload(seed: int, fmt: str = "PNG") -> tuple[Any, bytes]:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    data = buf.getvalue()
    return decode_bytes(data), data


def _predictions(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(Prediction)) or 0)


def test_keep_commits_image_vectors_and_row(trained: Store) -> None:
    decoded, data = _upload(1)
    out = predict_upload(trained, 1, decoded, data, k=2, keep=True)
    assert out.image_id == 13 and len(out.top) == 2
    assert [r[0] for r in trained.select_images(dataset="uploads")] == [13]
    assert trained.catalog.has_vector(trained.feature_set("rp16").id, 13)
    assert (trained.root / "uploads" / f"{decoded.sha256}.png").is_file()
    assert _predictions(trained) == 1
    again = predict_upload(trained, 1, decoded, data, keep=True)  # same content: same image, row replaced
    assert again.image_id == 13 and _predictions(trained) == 1
    assert predict_upload(trained, 1, *_upload(2), keep=False).image_id is None
    assert _predictions(trained) == 1


@pytest.mark.parametrize("fails", ["featurize", "classify"])
def test_failed_prediction_stores_nothing(trained: Store, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    shards_before = trained.catalog.shard_paths()
    files_before = sorted((trained.root / "features" / "rp16").iterdir())

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("model exploded")

    if fails == "featurize":
        monkeypatch.setattr(predict_mod, "featurize", boom)
    else:
        model = trained.run_model(trained.catalog.run(1))
        monkeypatch.setattr(model, "predict_proba", boom)
    decoded, data = _upload(3)
    with pytest.raises(RuntimeError, match="model exploded"):
        predict_upload(trained, 1, decoded, data, keep=True)
    assert trained.catalog.image_id_by_sha256(decoded.sha256) is None
    assert trained.catalog.shard_paths() == shards_before and _predictions(trained) == 0
    with trained.writing():  # the lock is free, and the next writer sweeps any shard file left behind
        pass
    assert sorted((trained.root / "features" / "rp16").iterdir()) == files_before


def test_format_that_cannot_be_stored_is_refused_before_anything(trained: Store) -> None:
    decoded, data = _upload(4, fmt="PPM")
    with pytest.raises(UnsupportedMediaError, match="PPM images cannot be stored"):
        predict_upload(trained, 1, decoded, data, keep=True)
    assert not (trained.root / "uploads").exists() and _predictions(trained) == 0
