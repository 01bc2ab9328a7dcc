"""CLI: ingest, status, sql, compact, db."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from featurestore.cli.main import app
from helpers import make_image

runner = CliRunner()


def fs(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def test_help_everywhere() -> None:
    for cmd in ([], ["ingest"], ["status"], ["sql"], ["compact"], ["db"], ["db", "upgrade"],
                ["datasets", "export"]):
        result = fs(*cmd, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_sql_help_names_every_catalog_table() -> None:
    from featurestore.catalog.readonly import catalog_tables

    text = re.sub(r"\s+", " ", fs("sql", "--help").output)
    listed = set(re.search(r"catalog tables \(([^)]*)\)", text).group(1).replace(" ", "").split(","))
    assert listed == set(catalog_tables()) - {"alembic_version"}


def test_ingest_status_sql_roundtrip(image_tree: Path) -> None:
    result = fs("ingest", str(image_tree), "--dataset", "spring")
    assert result.exit_code == 0, result.output
    assert "12 new, 0 duplicates, 0 failed" in result.output
    again = fs("ingest", str(image_tree), "--dataset", "spring")
    assert "0 new, 12 duplicates" in again.output and "nothing new" in again.output
    status = fs("status", "--format", "json")
    info = json.loads(status.stdout)
    assert info["images"] == 12 and info["datasets"] == [{"dataset": "spring", "images": 12}]
    out = fs("sql", "SELECT label, count(*) AS n FROM images GROUP BY label ORDER BY label", "--format", "csv")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ["label,n", "sandal,4", "shirt,4", "sneaker,4"]
    js = fs("sql", "SELECT count(*) AS n FROM images", "--format", "json")
    assert json.loads(js.stdout) == [{"n": 12}]


def test_status_counts_members_labels_and_empty_datasets(image_tree: Path) -> None:
    assert fs("ingest", str(image_tree), "--dataset", "spring").exit_code == 0
    from featurestore import connect

    with connect(Path(".fs")) as store:
        footwear = [i for i, (_, label) in store.catalog.image_paths_labels(store.catalog.all_image_ids()).items()
                    if label in ("sandal", "sneaker")]
        assert store.catalog.save_as_dataset("autumn", footwear) == 8
        with store.catalog.session() as s:
            store.catalog.dataset_id(s, "empty", create=True)
            s.commit()
    info = json.loads(fs("status", "--format", "json").stdout)
    assert info["images"] == 12
    assert info["datasets"] == [{"dataset": "autumn", "images": 8}, {"dataset": "empty", "images": 0},
                                {"dataset": "spring", "images": 12}]
    assert [(r["superclass"], r["label"], r["images"]) for r in info["labels"]] == [
        ("footwear", "sandal", 4), ("footwear", "sneaker", 4), ("tops", "shirt", 4)]
    first = fs("status").stdout.splitlines()[0]
    assert first.startswith("store: ") and first.endswith(".fs  images: 12")


def test_sql_refuses_writes_and_reports_errors(image_tree: Path) -> None:
    fs("ingest", str(image_tree))
    result = fs("sql", "DELETE FROM images")
    assert result.exit_code == 1
    assert "Error: fs sql is read-only" in result.output
    assert json.loads(fs("sql", "SELECT count(*) AS n FROM images", "-f", "json").stdout) == [{"n": 12}]
    bad = fs("sql", "SELEC nothing")
    assert bad.exit_code == 1 and "Error: fs sql: SQL error" in bad.output


def test_ingest_failures_listed_and_exit_codes(tmp_path: Path) -> None:
    make_image(tmp_path / "d" / "c" / "ok.png")
    (tmp_path / "d" / "c" / "bad.jpg").write_text("nope")
    result = fs("ingest", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert "1 new, 0 duplicates, 1 failed" in result.output
    assert "bad.jpg: not an image" in result.output
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "x.png").write_bytes(b"")
    result = fs("ingest", str(tmp_path / "only_bad"))
    assert result.exit_code == 1
    assert "0 new, 0 duplicates, 1 failed" in result.output
    status = fs("status")
    assert "ingest failures: 2" in status.stdout


def test_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    result = fs("status")
    assert result.exit_code == 1
    assert result.output.startswith("Error: no store at") and "fs ingest PATH" in result.output
    result = fs("ingest", str(tmp_path / "missing"))
    assert result.exit_code == 1 and "does not exist" in result.output
    result = fs("ingest", str(tmp_path), "--labels", "folders")
    flat = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "dir, none, csv:FILE" in flat


def test_unusable_paths_are_one_line_errors(tmp_path: Path, image_tree: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = fs("--store", str(blocker / "store"), "ingest", str(image_tree))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {blocker}") and "Traceback" not in result.output
    result = fs("datasets", "export", "fashion-mnist", str(blocker / "out"), "--source", str(tmp_path))
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_store_option_and_env(tmp_path: Path, image_tree: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "elsewhere"
    assert fs("--store", str(other), "ingest", str(image_tree)).exit_code == 0
    assert (other / "catalog.db").exists()
    monkeypatch.setenv("FS_STORE", str(other))
    assert json.loads(fs("status", "-f", "json").stdout)["images"] == 12


def test_db_upgrade_and_current(tmp_path: Path) -> None:
    result = fs("db", "upgrade")
    assert result.exit_code == 0, result.output
    assert "upgraded from empty" in result.output
    cur = fs("db", "current")
    down = {}  # revision -> the revision it revises, read from the files (ids need not follow file names)
    for p in (Path(__file__).parents[1] / "migrations" / "versions").glob("0*.py"):
        text = p.read_text()
        down[re.search(r"^revision = '([^']+)'", text, re.M).group(1)] = re.search(  # type: ignore[union-attr]
            r"^down_revision = '?([^'\n]+)'?", text, re.M).group(1)  # type: ignore[union-attr]
    (head,) = set(down) - set(down.values())  # the one revision nothing revises
    assert f"current: {head}\n" in cur.stdout and f"head: {head}\n" in cur.stdout
    assert "nothing to do" in fs("db", "upgrade").output


def test_compact_cli(image_tree: Path) -> None:
    fs("ingest", str(image_tree))
    result = fs("compact")
    assert result.exit_code == 0 and "nothing to compact" in result.output


def test_piped_progress_prints_a_line_per_interval(capsys) -> None:
    """With stderr not a terminal, long work still reports: one plain line at most every 30 s."""
    from featurestore.cli import common

    now = [100.0]
    update = common._piped_progress("evaluate", lambda: now[0])
    for t, done, total in [(100, 1, 10), (129, 2, 10), (131, 3, 10), (140, 4, 10), (162, 5, 0)]:
        now[0] = float(t)
        update(done, total)
    assert capsys.readouterr().err.splitlines() == ["evaluate: 3/10 (30%), 31 s", "evaluate: 5/?, 62 s"]


def test_piped_commands_report_progress(image_tree: Path, monkeypatch) -> None:
    from featurestore.cli import common

    monkeypatch.setattr(common, "PIPED_PROGRESS_S", 0.0)
    r = fs("ingest", str(image_tree))
    assert r.exit_code == 0, r.output
    assert re.search(r"^ingest: \d+/\d+ \(\d+%\), \d+ s$", r.output, re.M), r.output


def test_table_cells_keep_tiny_values_readable() -> None:
    from featurestore.cli.common import table

    out = table([{"pvalue": 4.738e-12, "mean_diff": 0.0148, "zero": 0.0, "n": 3}], ["pvalue", "mean_diff", "zero", "n"])
    row = out.splitlines()[2].split()
    assert row == ["4.74e-12", "0.0148", "0.0000", "3"]  # the p-value printed as 0.0000 before
