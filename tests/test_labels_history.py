"""`fs labels set/import/history/undo`: every change is a history row, images.label is the latest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featurestore.catalog.labels import LaterChangeError
from featurestore.cli.main import app
from featurestore.errors import InvalidInputError
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.labels import cli_user, import_labels, set_labels, undo
from featurestore.store import Store
from helpers import raises_cli

runner = CliRunner()


def fs(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


@pytest.fixture
def lstore(store: Store, image_tree: Path) -> Store:
    """12 images: footwear/sneaker, footwear/sandal, tops/shirt (4 each)."""
    with store.writing():
        ingest(store, image_tree)
    return store


def _labels(store: Store) -> dict[int, tuple[str | None, str | None]]:
    return {int(r[0]): (r[2], r[3]) for r in store.select_images()}


def _ids(store: Store, label: str) -> list[int]:
    return sorted(i for i, (lb, _) in _labels(store).items() if lb == label)


def test_set_records_history_and_updates_images(lstore: Store) -> None:
    shirt = _ids(lstore, "shirt")
    with lstore.writing():
        changed = set_labels(lstore, shirt[:2], "sneaker", reason="looked again")
    assert changed == [1, 2] and lstore.catalog.label_version() == 2
    labels = _labels(lstore)
    assert labels[shirt[0]] == ("sneaker", "footwear")  # the superclass follows the label's images
    rows = lstore.catalog.label_history()
    assert [r.id for r in rows] == [2, 1]
    assert {(r.image_id, r.old_label, r.old_superclass, r.new_label, r.new_superclass) for r in rows} == {
        (shirt[0], "shirt", "tops", "sneaker", "footwear"), (shirt[1], "shirt", "tops", "sneaker", "footwear")}
    assert all(r.changed_by == cli_user() and r.source == "cli" and r.reason == "looked again" for r in rows)
    with lstore.writing():
        assert set_labels(lstore, shirt[:2], "sneaker") == []  # nothing to change: no history row
    assert lstore.catalog.label_version() == 2


def test_unknown_label_needs_new_label(lstore: Store) -> None:
    shirt = _ids(lstore, "shirt")
    with lstore.writing(), raises_cli(InvalidInputError, match="unknown label 'sneakr'.*--new-label"):
        set_labels(lstore, shirt[:1], "sneakr")
    assert lstore.catalog.label_history() == []
    with lstore.writing():
        set_labels(lstore, shirt[:1], "t-shirt", superclass="tops", new_label=True)
    assert _labels(lstore)[shirt[0]] == ("t-shirt", "tops")
    r = fs("labels", "set", "--id", str(shirt[1]), "blouse")
    assert r.exit_code == 1
    assert r.output.startswith("Error: unknown label 'blouse' (labels in use: ") and "--new-label" in r.output


def test_undo_and_refusals(lstore: Store) -> None:
    sandal = _ids(lstore, "sandal")
    with lstore.writing():
        first, = set_labels(lstore, sandal[:1], "sneaker")
        second, = set_labels(lstore, sandal[:1], "shirt")
        with pytest.raises(LaterChangeError, match=f"change {first} of image {sandal[0]} was overwritten by "
                           f"change {second}; undo {second} first"):
            undo(lstore, [first])
        back, = undo(lstore, [second])
    assert _labels(lstore)[sandal[0]] == ("sneaker", "footwear")
    newest = lstore.catalog.label_history(sandal[0])[0]
    assert newest.id == back and newest.undoes == second and newest.source == "undo"
    r = fs("labels", "undo", str(second))  # undone already: the undo is the later change
    assert r.exit_code == 1 and f"overwritten by change {back}" in r.output
    r = fs("labels", "undo", str(back), str(first))  # undo the undo, then the first change: all in one go
    assert r.exit_code == 1 and f"change {first} of image {sandal[0]} was overwritten" in r.output
    assert lstore.catalog.label_version() == back  # refused as a whole: nothing written
    r = fs("labels", "undo", "99")
    assert r.exit_code == 1 and "unknown label change '99'" in r.output


def test_cli_set_where_history_and_sql(lstore: Store) -> None:
    lstore.close()
    r = fs("labels", "set", "--where", "label = 'sandal' AND source_path LIKE '%sandal0%'", "sneaker",
           "--reason", "strap")
    assert r.exit_code == 0, r.output
    assert "1 label(s) changed (1 image(s) selected); change id(s) 1" in r.output
    r = fs("labels", "history", "--format", "json")
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["old"] == "sandal" and rows[0]["new"] == "sneaker"
    assert rows[0]["by"] == cli_user() and rows[0]["reason"] == "strap"
    r = fs("sql", "SELECT image_id, old_label, new_label, changed_by FROM label_changes")
    assert r.exit_code == 0 and "sneaker" in r.output
    r = fs("labels", "history", "--id", str(rows[0]["image_id"]), "--format", "csv")
    assert r.stdout.splitlines()[0].startswith("change,image_id,old,new")
    assert len(r.stdout.splitlines()) == 2


@pytest.mark.parametrize("condition", ["label = 'shirt'; DELETE FROM images", "id IN (SELECT load_extension('x'))",
                                       "label = (SELECT name FROM sqlite_master)"])
def test_where_obeys_readonly_rules(lstore: Store, condition: str) -> None:
    lstore.close()
    r = fs("labels", "set", "--where", condition, "sneaker")
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: bad --where condition") and len(r.output.strip().splitlines()) == 1
    assert fs("labels", "history", "--format", "json").stdout.strip() == "[]"


def test_set_refuses_bad_selection(lstore: Store) -> None:
    lstore.close()
    assert fs("labels", "set", "sneaker").exit_code == 2  # neither --id nor --where
    r = fs("labels", "set", "--where", "label = 'boot'", "sneaker")
    assert r.exit_code == 2 and "no image matches" in r.output
    r = fs("labels", "set", "--id", "9999", "sneaker")
    assert r.exit_code == 1 and "no image with id 9999" in r.output


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_import_csv_by_path_and_id(lstore: Store, image_tree: Path, tmp_path: Path) -> None:
    shirt = _ids(lstore, "shirt")
    sandal_path = next(p for p in sorted(image_tree.rglob("sandal1.*")))
    csv_path = _write(tmp_path / "fix.csv", f"image,label,reason\n{shirt[0]},sandal,wrong folder\n"
                                            f"{sandal_path},sneaker,\n{shirt[1]},shirt,already right\n")
    lstore.close()
    r = fs("labels", "import", str(csv_path))
    assert r.exit_code == 0, r.output
    assert "2 label(s) changed" in r.output and "1 row(s) already had their label" in r.output
    rows = json.loads(fs("labels", "history", "--format", "json").stdout)
    assert {(x["image_id"], x["new"], x["source"], x["reason"]) for x in rows} == {
        (shirt[0], "sandal", "import", "wrong folder"), (rows[0]["image_id"], "sneaker", "import", None)}


@pytest.mark.parametrize(("body", "message"), [
    ("{a},sneaker\n{b},snekaer\n", "fix.csv line 2: unknown label 'snekaer'"),
    ("{a},sneaker\nnot/there.png,sneaker\n", "fix.csv line 2: no stored image has the id or path 'not/there.png'"),
    ("{a},sneaker\n{a},sandal\n", "fix.csv line 2: image {a} is already relabelled on line 1"),
    ("{a}\n", "fix.csv line 1: expected image,label[,reason[,superclass]]"),
])
def test_import_refuses_bad_rows_whole(lstore: Store, tmp_path: Path, body: str, message: str) -> None:
    a, b = _ids(lstore, "shirt")[:2]
    path = _write(tmp_path / "fix.csv", body.format(a=a, b=b))
    lstore.close()
    r = fs("labels", "import", str(path))
    assert r.exit_code == 1
    assert message.format(a=a) in r.output and len(r.output.strip().splitlines()) == 1
    assert fs("labels", "history", "--format", "json").stdout.strip() == "[]"


def test_import_failing_midway_writes_nothing(lstore: Store, tmp_path: Path) -> None:
    shirt = _ids(lstore, "shirt")
    path = _write(tmp_path / "fix.csv", "".join(f"{i},sandal\n" for i in shirt))
    before = _labels(lstore)

    def fail_at_third(k: int) -> None:
        if k == 2:
            raise OSError("disk full (injected)")

    with lstore.writing(), pytest.raises(OSError, match="injected"):
        import_labels(lstore, path, before_each=fail_at_third)
    assert _labels(lstore) == before and lstore.catalog.label_history() == []


_KILLED_IMPORT = """
import sys, time
from pathlib import Path
from featurestore import connect
from featurestore.pipelines.labels import import_labels
store = connect(sys.argv[1])
def slow(k):
    if k == 2:
        Path(sys.argv[3]).write_text("2 rows written")
        time.sleep(60)
with store.writing():
    import_labels(store, Path(sys.argv[2]), before_each=slow)
"""


def test_killed_import_leaves_none_of_its_rows(lstore: Store, tmp_path: Path) -> None:
    shirt = _ids(lstore, "shirt")
    path = _write(tmp_path / "fix.csv", "".join(f"{i},sandal\n" for i in shirt))
    before = _labels(lstore)
    marker = tmp_path / "midway"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_")}
    if lstore.settings.database_url:
        env["FS_DATABASE_URL"] = lstore.settings.database_url
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IMPORT, str(lstore.root), str(path), str(marker)],
                            env=env)
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the import never reached its third row"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _labels(lstore) == before and lstore.catalog.label_history() == []
    with lstore.writing():  # the kernel released the killed writer's lock
        assert len(import_labels(lstore, path)[0]) == 4  # (PostgreSQL's sequence skips the rolled-back ids)
    assert {lb for i, (lb, _) in _labels(lstore).items() if i in shirt} == {"sandal"}


def test_writers_are_serialised_by_the_store_lock(lstore: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    shirt = _ids(lstore, "shirt")
    monkeypatch.setenv("FS_LOCK_TIMEOUT", "0.2")
    with lstore.writing():
        r = fs("labels", "set", "--id", str(shirt[0]), "sandal")
    assert r.exit_code == 1 and r.output.startswith("Error: store is busy")
    assert lstore.catalog.label_history() == []
