"""CLI: fs search and fs duplicates."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from featurestore.cli.main import app
from helpers import make_image

runner = CliRunner()


def fs(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


@pytest.fixture
def rp_tree(image_tree: Path) -> Path:
    for args in (["ingest", str(image_tree), "--dataset", "spring"],
                 ["extract", "--rp", "16", "--size", "32x24"]):
        result = fs(*args)
        assert result.exit_code == 0, result.output
    return image_tree


def ids_by_name() -> dict[str, int]:
    out = fs("sql", "SELECT id, source_path FROM images", "--format", "json")
    return {Path(r["source_path"]).name: r["id"] for r in json.loads(out.stdout)}


def test_help() -> None:
    for cmd in (["search"], ["duplicates"]):
        result = fs(*cmd, "--help")
        assert result.exit_code == 0, result.output
        assert "Example: fs" in result.output


def test_search_by_id_table_and_json(rp_tree: Path) -> None:
    qid = ids_by_name()["sandal1.png"]
    table = fs("search", "--features", "rp16", "--id", str(qid), "-k", "3")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["rank", "image_id", "path", "label", "distance", "similarity"]
    assert len(lines) == 2 + 3
    js = fs("search", "--features", "rp16", "--id", str(qid), "-k", "5", "--format", "json")
    assert js.exit_code == 0, js.output
    rows = json.loads(js.stdout)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert qid not in [r["image_id"] for r in rows]
    assert set(rows[0]) == {"rank", "image_id", "path", "label", "distance", "similarity", "method"}
    assert {r["method"] for r in rows} == {"exact"}  # no index: `fs index build` makes one
    assert "search: exact (no index" in js.stderr
    scores = [r["similarity"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert [r["distance"] for r in rows] == sorted(r["distance"] for r in rows)
    l2 = fs("search", "-F", "rp16", "--id", str(qid), "--metric", "l2", "--format", "json")
    dists = [r["distance"] for r in json.loads(l2.stdout)]
    assert dists == sorted(dists) and len(dists) == 10


def test_search_by_new_image_and_where(rp_tree: Path, tmp_path: Path) -> None:
    src = rp_tree / "footwear" / "sneaker" / "sneaker2.jpg"
    query = tmp_path / "query.png"
    Image.open(src).resize((100, 90)).convert("L").save(query)  # other size, mode and format
    result = fs("search", "-F", "rp16", "--image", str(query), "--format", "csv", "--where", "label = 'sneaker'")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"sneaker"}
    exact = fs("search", "-F", "rp16", "--image", str(src), "-k", "1", "--format", "json")
    top = json.loads(exact.stdout)[0]
    assert top["image_id"] == ids_by_name()["sneaker2.jpg"] and top["similarity"] == pytest.approx(1.0, abs=1e-6)
    # searching never stores the query image
    assert len(ids_by_name()) == 12


def test_search_ingest(rp_tree: Path, tmp_path: Path) -> None:
    new = make_image(tmp_path / "new" / "fresh.png", size=(50, 40), seed=999)
    result = fs("search", "-F", "rp16", "--image", str(new), "-k", "2", "--ingest", "--format", "json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 2
    new_id = ids_by_name()["fresh.png"]
    assert f"as image {new_id}" in result.stderr and "vector added to rp16" in result.stderr
    again = fs("search", "-F", "rp16", "--id", str(new_id), "-k", "1")
    assert again.exit_code == 0, again.output


def test_duplicates_cli(rp_tree: Path, tmp_path: Path) -> None:
    extra = tmp_path / "more" / "x"
    orig = make_image(extra / "orig.png", size=(32, 24), seed=5)
    make_image(extra / "other.png", size=(32, 24), seed=6)
    Image.open(orig).save(extra / "copy.jpg", quality=95, subsampling=0)
    assert fs("ingest", str(tmp_path / "more")).exit_code == 0
    assert fs("extract", "--rp", "16", "--size", "32x24").exit_code == 0
    # (the tree's 64x48 noise images all look alike once shrunk to 32x24, so compare the new ones)
    result = fs("duplicates", "-F", "rp16", "--format", "json", "--where", "dataset = 'more'")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {Path(r["path"]).name for r in rows} == {"orig.png", "copy.jpg"}
    assert {r["group"] for r in rows} == {1}
    assert "1 group(s)" in result.stderr
    tight = fs("duplicates", "-F", "rp16", "--memory-mb", "0")
    assert tight.exit_code == 1
    assert "Error: " in tight.stderr and "does not stream" in tight.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-F", "nope", "--id", "1"], "Error: unknown feature set 'nope'; available: rp16"),
        (["-F", "rp16", "--id", "999"], "Error: no image with id 999"),
        (["-F", "rp16", "--id", "1", "--where", "colour = 'red'"], "Error: bad --where condition"),
        (["-F", "rp16", "--id", "1", "--where", "1=1; DELETE FROM images"], "Error: bad --where condition"),
        (["-F", "rp16", "--image", "missing.jpg"], "Error: missing.jpg: file not found"),
    ],
)
def test_errors_exit_1(rp_tree: Path, args: list[str], message: str) -> None:
    result = fs("search", *args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_usage_errors_exit_2(rp_tree: Path) -> None:
    for args in (["-F", "rp16"], ["-F", "rp16", "--id", "1", "--image", "x.png"],
                 ["-F", "rp16", "--id", "1", "--ingest"], ["-F", "rp16", "--id", "1", "-k", "0"]):
        result = fs("search", *args)
        assert result.exit_code == 2, (args, result.output)


def test_id_without_vector_names_extract(rp_tree: Path, tmp_path: Path) -> None:
    make_image(tmp_path / "late" / "late.png", seed=77)
    assert fs("ingest", str(tmp_path / "late")).exit_code == 0
    result = fs("search", "-F", "rp16", "--id", str(ids_by_name()["late.png"]))
    assert result.exit_code == 1
    assert "has no vector in rp16: run `fs extract --rp 16`" in result.stderr
