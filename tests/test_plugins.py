"""Plugins (issue 28): the hooks, `fs plugins`, `fs extract --feature`, and the colour-moments example end to end.

The mechanism is tested with plugin objects registered in this process; the
worked example (examples/plugins/featurestore-colour-moments, installed into
.venv by scripts/setup.sh) is tested as installed, through its entry point.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from featurestore import plugins
from featurestore.cli.main import app
from featurestore.config import Settings
from featurestore.errors import InvalidInputError
from featurestore.features.base import Extractor, FeatureSpec
from featurestore.features.cnn.registry import cnn_runtimes
from featurestore.features.registry import FeatureKind, extractor_for, feature_kinds
from featurestore.plugins import hookimpl
from featurestore.search.backends import index_backend, index_backends
from featurestore.store import Store

runner = CliRunner()

EXAMPLE: importlib.metadata.Distribution | None
try:
    EXAMPLE = importlib.metadata.distribution("featurestore-colour-moments")
except importlib.metadata.PackageNotFoundError:
    EXAMPLE = None
needs_example = pytest.mark.skipif(EXAMPLE is None, reason="the example plugin is not installed: pip install "
                                   "examples/plugins/featurestore-colour-moments (scripts/setup.sh does)")


class GreyMean(Extractor):
    """A one-number feature: the mean grey level (what a plugin's kind looks like at its smallest)."""

    def __init__(self, scale: float = 1.0, name: str = "grey-mean"):
        self.scale, self.name = scale, name

    def outputs(self) -> list[FeatureSpec]:
        return [FeatureSpec(self.name, "grey-mean", 1, {"scale": self.scale})]

    def prepare(self, image: Image.Image) -> Any:
        return float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255.0 * self.scale

    def compute(self, prepared: list[Any]) -> dict[str, np.ndarray]:
        return {self.name: np.asarray(prepared, dtype=np.float32).reshape(-1, 1)}


class TestPlugin:
    """A plugin object: a feature kind, a CNN runtime and a command."""

    @hookimpl
    def register_feature_kinds(self, register: Callable[[Any], None]) -> None:
        register(FeatureKind(
            "grey-mean", GreyMean,
            build=lambda store, name, p, batch: GreyMean(float(p["scale"]), name),
            command=lambda name, p, dim: "fs extract --feature grey-mean",
            create=lambda store, o: GreyMean(float(o.get("scale", 1.0))),
        ))

    @hookimpl
    def register_cnn_runtimes(self, register: Callable[[Any], None]) -> None:
        from featurestore.features.cnn.registry import CNNRuntime

        register(CNNRuntime("test-runtime", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not run"))))

    @hookimpl
    def register_commands(self, cli: Any) -> None:
        @cli.command("hello")
        def hello(name: str = typer.Option("world", "--name")) -> None:
            """Say hello. Example: fs hello --name you"""
            typer.echo(f"hello {name}")


@pytest.fixture
def test_plugin() -> Iterator[TestPlugin]:
    plugin = TestPlugin()
    plugins.register(plugin, name="test-plugin")
    try:
        yield plugin
    finally:
        plugins.unregister(plugin)


def _images(root: Path, per_class: int = 8) -> Path:
    """Small images of four colours with noise, one folder per label (superclass/label/file)."""
    colours = {"warm/red": (200, 40, 30), "cool/blue": (30, 60, 200), "cool/green": (40, 180, 60),
               "warm/yellow": (220, 210, 40)}
    rng = np.random.default_rng(0)
    for label, rgb in colours.items():
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, size=(24, 32, 3)), 0, 255).astype(np.uint8)
            path = root / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, "RGB").save(path)
    return root


def _ok(*args: str) -> str:
    done = runner.invoke(app, list(args))
    assert done.exit_code == 0, done.output
    return done.output


def _json(*args: str) -> Any:
    done = runner.invoke(app, [*args, "--format", "json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


# -- the mechanism ---------------------------------------------------------------------------------------


def test_builtins_register_through_the_hooks() -> None:
    # in registration order, built-ins first ("use onnxruntime or mxnet" in messages)
    assert list(feature_kinds())[:4] == ["random_projection", "pixels", "lowlevel", "cnn"]
    assert list(cnn_runtimes())[:2] == ["onnxruntime", "mxnet"]
    assert "usearch" in index_backends() and index_backend().name == "usearch"
    listed = {p.name: p for p in plugins.plugins()}
    kinds = listed["featurestore.plugins.feature_kinds"]
    assert kinds.builtin and kinds.hooks == ("register_feature_kinds",) and kinds.distribution == "featurestore"
    assert "feature kind lowlevel" in kinds.provides
    assert "index backend usearch" in listed["featurestore.plugins.index_backends"].provides
    assert listed["featurestore.cli.plugins"].hooks == ("register_commands",)


def test_fs_plugins_lists_name_hooks_module_and_distribution(test_plugin: TestPlugin) -> None:
    rows = {r["name"]: r for r in _json("plugins")}
    mine = rows["test-plugin"]
    assert mine["hooks"] == ["register_cnn_runtimes", "register_commands", "register_feature_kinds"]
    assert mine["provides"] == ["feature kind grey-mean", "CNN runtime test-runtime"]
    assert mine["module"] == "test_plugins" and mine["error"] is None
    assert rows["featurestore.plugins.cnn_runtimes"]["version"] == importlib.metadata.version("featurestore")
    table = _ok("plugins")
    assert re.search(r"^featurestore\.plugins\.index_backends +register_index_backends +index backend usearch", table,
                     re.M), table
    assert "Example: " in _ok("plugins", "--help")


def test_a_plugin_kind_is_extracted_stored_and_rebuilt(test_plugin: TestPlugin, tmp_path: Path) -> None:
    _ok("ingest", str(_images(tmp_path / "photos", per_class=3)))
    out = runner.invoke(app, ["extract", "--feature", "grey-mean:scale=2", "--rp", "4", "--size", "16x12"])
    assert out.exit_code == 0, out.output
    assert "grey-mean: 12 vectors written" in out.output and "rp4: 12 vectors written" in out.output
    with Store.open(Settings.from_env()) as store:
        fs = store.feature_set("grey-mean")
        assert (fs.kind, fs.dim, fs.params) == ("grey-mean", 1, {"scale": 2.0})
        rebuilt = extractor_for(store, "grey-mean")  # search and predict embed new images with this
        assert isinstance(rebuilt, GreyMean) and rebuilt.scale == 2.0
        mat = store.read_matrix(["grey-mean"]).X
        assert mat.shape == (12, 1) and float(mat.min()) > 0 and float(mat.max()) <= 2.0


def test_unknown_feature_and_runtime_are_bad_arguments(test_plugin: TestPlugin, tmp_path: Path) -> None:
    bad = runner.invoke(app, ["extract", "--feature", "nope"])
    assert bad.exit_code == 2 and "unknown feature kind 'nope'" in bad.output and "grey-mean" in bad.output
    bad = runner.invoke(app, ["extract", "--feature", "grey-mean:scale"])
    assert bad.exit_code == 2 and "is not key=value" in bad.output
    assert list(cnn_runtimes()) == ["onnxruntime", "mxnet", "test-runtime"]  # the plugin's after the built-ins
    bad = runner.invoke(app, ["index", "build", "--features", "x", "--backend", "faiss"])
    assert bad.exit_code == 2 and "use usearch" in bad.output
    bad = runner.invoke(app, ["extract", "--model", "x", "--runtime", "nope"])
    assert bad.exit_code == 2 and "test-runtime" in bad.output and "onnxruntime" in bad.output


def test_a_plugin_adds_a_command(test_plugin: TestPlugin) -> None:
    cli = typer.Typer()
    plugins.plugin_manager().hook.register_commands(cli=cli)  # what cli/main.py does at start-up
    done = runner.invoke(cli, ["hello", "--name", "you"])
    assert done.exit_code == 0 and done.output == "hello you\n"
    assert runner.invoke(cli, ["plugins", "--format", "json"]).exit_code == 0  # the built-in command, same hook


def test_a_plugin_cannot_take_a_builtin_name() -> None:
    usearch = index_backend("usearch")

    class Clash:
        @hookimpl
        def register_index_backends(self, register: Callable[[Any], None]) -> None:
            register(usearch)

    clash = Clash()
    plugins.register(clash)
    try:
        with pytest.raises(plugins.PluginError, match="two plugins register the index backend 'usearch'"):
            index_backends()
    finally:
        plugins.unregister(clash)


def test_a_plugin_failing_in_its_hook_is_named() -> None:
    class Failing:
        @hookimpl
        def register_feature_kinds(self, register: Callable[[Any], None]) -> None:
            raise ModuleNotFoundError("No module named 'cv2'")

    failing = Failing()
    plugins.register(failing, name="needs-opencv")
    try:
        with pytest.raises(plugins.PluginError, match=r"plugin needs-opencv failed in its hook register_feature_"
                           r"kinds \(ModuleNotFoundError: No module named 'cv2'\)"):
            feature_kinds()
        listed = {p.name: p for p in plugins.plugins()}["needs-opencv"]
        assert listed.provides == ("register_feature_kinds failed (ModuleNotFoundError: No module named 'cv2')",)
    finally:
        plugins.unregister(failing)


def test_a_broken_plugin_is_listed_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        name, value, dist = "broken", "broken_plugin:nothing", None

        def load(self) -> Any:
            raise ImportError("No module named 'broken_plugin'")

    monkeypatch.setattr(plugins, "_manager", None)  # a fresh manager loads the entry points again
    monkeypatch.setattr(plugins, "_failed", [])
    monkeypatch.setattr(plugins, "_extra", [])
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [Broken()])
    found = {p.name: p for p in plugins.plugins()}
    assert found["broken"].error == "ImportError: No module named 'broken_plugin'" and found["broken"].hooks == ()
    assert "lowlevel" in feature_kinds()  # the others still work
    assert [p.name for p in plugins.failed()] == ["broken"]


# -- the worked example, installed -------------------------------------------------------------------------


@needs_example
def test_example_is_listed_and_light_to_load(tmp_path: Path) -> None:
    from test_cli_imports import HELP_HEAVY, _loaded_after, _offending

    rows = {r["name"]: r for r in _json("plugins")}
    assert EXAMPLE is not None
    assert rows["colour_moments"] == {
        "name": "colour_moments", "hooks": ["register_feature_kinds"], "provides": ["feature kind colour-moments"],
        "module": "featurestore_colour_moments", "distribution": "featurestore-colour-moments",
        "version": EXAMPLE.version, "error": None}
    code, modules = _loaded_after("--help", cwd=tmp_path)
    assert code == 0 and "featurestore_colour_moments" in modules  # loaded at start-up...
    assert _offending(modules, (*HELP_HEAVY, "featurestore_colour_moments.extractor")) == []  # ...and nothing heavy


@needs_example
def test_example_set_is_searched_indexed_trained_and_served(tmp_path: Path) -> None:
    _ok("ingest", str(_images(tmp_path / "photos")))
    out = _ok("extract", "--feature", "colour-moments", "--feature", "colour-moments:space=hsv")
    assert "colour-moments: 32 vectors written" in out and "colour-moments-hsv: 32 vectors written" in out
    assert "up to date" in _ok("extract", "--feature", "colour-moments")
    status = _json("status")
    sets = {s["feature_set"]: s for s in status["feature_sets"]}
    assert (sets["colour-moments"]["kind"], sets["colour-moments"]["dim"], sets["colour-moments"]["coverage"]) == (
        "colour-moments", 9, 1.0)

    with Store.open(Settings.from_env()) as store:
        rows = store.select_images()
        label_of = {r[0]: r[2] for r in rows}
        red = next(r for r in rows if r[2] == "red")
        mat = store.read_matrix(["colour-moments"]).X
        assert mat.shape == (32, 9) and np.isfinite(mat).all()

    def neighbours() -> tuple[list[str], set[str]]:
        found = _json("search", "--features", "colour-moments", "--id", str(red[0]), "-k", "5")
        return [label_of[r["image_id"]] for r in found], {r["method"] for r in found}

    assert neighbours() == (["red"] * 5, {"exact"})  # colour moments tell the colours apart
    by_file = _json("search", "--features", "colour-moments", "--image", str(red[1]), "-k", "3")
    assert [label_of[r["image_id"]] for r in by_file] == ["red"] * 3  # a new image, embedded by the plugin
    _ok("index", "build", "--features", "colour-moments")
    assert neighbours() == (["red"] * 5, {"index"})

    run = _json("train", "--features", "colour-moments,colour-moments-hsv")
    accuracy = [split["accuracy"] for split in run["evaluation"]["splits"]]
    assert np.mean(accuracy) >= 0.9, run  # four colours: a classifier on the plugin's vectors separates them

    with TestClient(_app()) as client:
        page = client.get(f"/ui/images/{red[0]}")
        assert page.status_code == 200 and "colour-moments" in page.text
        api = client.get(f"/v1/feature-sets/colour-moments/search?image_id={red[0]}&k=3").json()
        assert [label_of[r["image_id"]] for r in api["results"]] == ["red"] * 3
        png = io.BytesIO()
        Image.open(red[1]).save(png, "PNG")
        upload = client.post("/ui/search", files={"file": ("q.png", png.getvalue(), "image/png")},
                             data={"features": "colour-moments", "k": "3", "run": ""})
        assert upload.status_code == 200, upload.text[:300]
        ids = [int(i) for i in re.findall(r'class="nb" href="/ui/images/(\d+)"', upload.text)]
        assert ids and all(label_of[i] == "red" for i in ids)


@needs_example
def test_example_refuses_bad_options(tmp_path: Path) -> None:
    _ok("ingest", str(_images(tmp_path / "photos", per_class=1)))
    bad = runner.invoke(app, ["extract", "--feature", "colour-moments:space=cmyk"])
    assert bad.exit_code == 1 and "unknown colour space 'cmyk'" in bad.output
    with pytest.raises(InvalidInputError, match="not bins"):
        feature_kinds()["colour-moments"].create(None, {"bins": "8"})  # type: ignore[arg-type,misc]


def _app() -> Any:
    from featurestore.http.app import create_app

    return create_app(Settings.from_env(workers=2))
