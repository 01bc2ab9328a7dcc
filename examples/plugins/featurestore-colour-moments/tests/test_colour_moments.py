"""The colour-moments plugin: the moments themselves, the extractor, and its registration with featurestore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from featurestore_colour_moments.extractor import ColourMomentsExtractor, colour_moments
from PIL import Image
from typer.testing import CliRunner

from featurestore import plugins
from featurestore.cli.main import app
from featurestore.errors import InvalidInputError
from featurestore.features.registry import feature_kinds


@pytest.fixture(autouse=True)
def _store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FS_STORE", str(tmp_path / ".fs"))
    monkeypatch.chdir(tmp_path)


def test_moments_of_a_known_distribution() -> None:
    # one channel: three pixels at 0 and one at 1 -> mean 1/4, std sqrt(3)/4, third moment 3/32 (right-skewed)
    x = np.array([[0.0, 0.5, 1.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
    m = colour_moments(x)
    assert m.dtype == np.float32 and m.shape == (9,)
    np.testing.assert_allclose(m[0:3], [0.25, 0.5, 0.25], atol=1e-7)
    np.testing.assert_allclose(m[3:6], [np.sqrt(3) / 4, 0.0, np.sqrt(3) / 4], atol=1e-7)
    np.testing.assert_allclose(m[6:9], [np.cbrt(3 / 32), 0.0, np.cbrt(3 / 32)], atol=1e-6)
    assert colour_moments(1.0 - x)[6] == pytest.approx(-np.cbrt(3 / 32), abs=1e-6)  # mirrored: skewed left


def test_extractor_on_a_flat_colour_in_each_space() -> None:
    flat = Image.new("RGB", (40, 30), (255, 0, 0))
    rgb = ColourMomentsExtractor()
    v = rgb.compute([rgb.prepare(flat)])["colour-moments"]
    np.testing.assert_allclose(v, [[1, 0, 0, 0, 0, 0, 0, 0, 0]], atol=1e-6)
    hsv = ColourMomentsExtractor(space="hsv")
    assert hsv.outputs()[0].name == "colour-moments-hsv"
    np.testing.assert_allclose(hsv.compute([hsv.prepare(flat)])["colour-moments-hsv"][0, :3], [0, 1, 1], atol=1e-6)
    ycc = ColourMomentsExtractor(space="ycbcr", size=16)
    assert ycc.compute([ycc.prepare(flat)])["colour-moments-ycbcr"][0, 0] == pytest.approx(76 / 255, abs=2 / 255)


def test_params_rebuild_the_same_extractor_and_options_are_checked() -> None:
    ex = ColourMomentsExtractor.from_options({"space": "HSV", "size": "32"})
    spec = ex.outputs()[0]
    assert (spec.name, spec.kind, spec.dim, spec.params["space"], spec.params["size"]) == (
        "colour-moments-hsv", "colour-moments", 9, "hsv", [32, 32])
    again = ColourMomentsExtractor.from_params(spec.name, json.loads(json.dumps(spec.params)))
    assert again.outputs() == ex.outputs()
    for options, message in (({"space": "cmyk"}, "unknown colour space"), ({"size": "big"}, "not a whole number"),
                             ({"size": "4"}, "out of range"), ({"bins": "3"}, "not bins")):
        with pytest.raises(InvalidInputError, match=message):
            ColourMomentsExtractor.from_options(options)


def test_registered_through_the_entry_point() -> None:
    info = {p.name: p for p in plugins.plugins()}["colour_moments"]
    assert (info.module, info.distribution, info.hooks) == (
        "featurestore_colour_moments", "featurestore-colour-moments", ("register_feature_kinds",))
    kind = feature_kinds()["colour-moments"]
    assert kind.extractor is ColourMomentsExtractor
    assert kind.command("colour-moments-hsv", {"space": "hsv"}, 9) == "fs extract --feature colour-moments:space=hsv"


def test_fs_extract_feature_stores_the_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        path = tmp_path / "photos" / "things" / ("red" if i % 2 else "blue") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        base = (200, 30, 30) if i % 2 else (30, 30, 200)
        arr = np.clip(np.array(base) + rng.normal(0, 10, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(path)
    runner = CliRunner()
    for args in (["ingest", str(tmp_path / "photos")], ["extract", "--feature", "colour-moments:size=16"]):
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
    assert "colour-moments: 4 vectors written" in done.output
    status = json.loads(runner.invoke(app, ["status", "--format", "json"]).stdout)
    assert [(s["feature_set"], s["kind"], s["dim"]) for s in status["feature_sets"]] == [
        ("colour-moments", "colour-moments", 9)]
