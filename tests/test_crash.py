"""kill -9 a writer at random moments; the catalog and the files must stay consistent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from featurestore.config import Settings
from featurestore.features.base import FeatureSpec
from featurestore.pipelines.ingest import ingest
from featurestore.store import Store
from helpers import make_image

WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from pathlib import Path
    from featurestore.config import Settings
    from featurestore.features.base import FeatureSpec
    from featurestore.store import Store
    import os, signal
    import featurestore.io.atomic as atomic, featurestore.store as store_mod
    mode = sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "before-rename":  # temp file fully written, not yet renamed
        atomic._fsync_file = die
    elif mode == "after-rename":  # shard renamed into place, catalog not yet told
        original = store_mod.write_shard
        store_mod.write_shard = lambda *a, **k: (original(*a, **k), die())[0]
    store = Store.open(Settings.from_env(store=Path(sys.argv[1])))
    ids = [r[0] for r in store.select_images()]
    with store.writing():
        fs = store.ensure_feature_set(FeatureSpec("v", "test", 512, {}))
        print("ready", flush=True)
        k = 0
        while True:  # rewrite every image's vector again and again, one shard per image
            i = ids[k % len(ids)]
            if i in store.images_lacking("v", [i]):
                store.append_vectors(fs, [i] * 1, np.full((1, 512), i, dtype=np.float32))
            else:
                store.compact("v", min_rows=10**9)
            k += 1
    """
)


@pytest.mark.slow
def test_kill_9_leaves_catalog_and_files_consistent(tmp_path: Path) -> None:
    root = tmp_path / ".fs"
    settings = Settings.from_env(store=root)
    store = Store.open(settings, create=True)
    for k in range(40):
        make_image(tmp_path / "imgs" / "c" / f"{k}.png", size=(8, 8), seed=k)
    with store.writing():
        ingest(store, tmp_path / "imgs")
    store.close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = np.random.default_rng(0)
    modes = ["before-rename", "after-rename"] + ["random"] * 10
    for mode in modes:
        proc = subprocess.Popen([sys.executable, str(script), str(root), mode], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        if mode == "random":
            time.sleep(float(rng.uniform(0.05, 0.6)))
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
        store = Store.open(settings)
        try:
            # Every registered shard exists and holds the vectors the catalog says.
            fm = store.read_matrix(["v"], skip_missing=True)
            assert np.all(fm.X == fm.image_ids[:, None].astype(np.float32))
            folder = root / "features" / "v"
            on_disk = {p.name for p in folder.iterdir()} if folder.exists() else set()
            with store.session() as s:
                from sqlalchemy import select

                from featurestore.catalog.schema import FeatureShard
                registered = {Path(p).name for p in s.scalars(select(FeatureShard.path))}
            assert registered <= on_disk
            if mode != "random":  # the crash left exactly the orphan it was placed to leave
                assert len(on_disk - registered) == 1
            with store.writing():  # the next writer removes what the crash left behind
                pass
            left = {p.name for p in folder.iterdir()} if folder.exists() else set()
            assert left == registered
        finally:
            store.close()


def test_crash_between_rename_and_registration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the shard file is renamed but before the catalog commit leaves no trace."""
    store = Store.open(Settings.from_env(store=tmp_path / ".fs"), create=True)
    make_image(tmp_path / "i" / "c" / "a.png")
    with store.writing():
        ingest(store, tmp_path / "i")
        fs = store.ensure_feature_set(FeatureSpec("v", "test", 2, {}))

        def boom(*a: object, **k: object) -> None:
            raise RuntimeError("simulated crash during registration")

        monkeypatch.setattr(type(store.catalog), "session", lambda self: boom())
        with pytest.raises(RuntimeError):
            store.append_vectors(fs, [1], np.zeros((1, 2)))
    monkeypatch.undo()
    assert list((tmp_path / ".fs" / "features" / "v").glob("*.h5")) == []
    assert store.images_lacking("v") == [1]
    store.close()


REPLACER = textwrap.dedent(
    """
    import sys, os, signal
    from pathlib import Path
    from featurestore.config import Settings
    from featurestore.features.base import FeatureSpec
    from featurestore.pipelines.versions import gc
    from featurestore.store import Store
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    Store._discard_files = die  # the catalog has committed; the old files are not deleted yet
    store = Store.open(Settings(store=Path(sys.argv[1])))
    with store.writing():
        store.ensure_feature_set(FeatureSpec("v", "test", 3, {"version": 2}), replace=True)
    gc(store)  # issue 26: replace keeps the old version; gc deletes it
    """
)


def test_kill_between_replace_commit_and_file_delete(tmp_path: Path) -> None:
    """`--replace` then `fs gc` (which deletes the old version) commit first and delete after: a kill in between
    never leaves rows pointing at missing files."""
    root = tmp_path / ".fs"
    store = Store.open(Settings(store=root), create=True)
    for k in range(6):
        make_image(tmp_path / "imgs" / "c" / f"{k}.png", size=(8, 8), seed=k)
    with store.writing():
        ingest(store, tmp_path / "imgs")
        fs = store.ensure_feature_set(FeatureSpec("v", "test", 3, {"version": 1}))
        for i in range(1, 7):
            store.append_vectors(fs, [i], np.full((1, 3), i, dtype=np.float32))
    store.close()
    old = sorted((root / "features" / "v").glob("*.h5"))
    assert len(old) == 6
    script = tmp_path / "replacer.py"
    script.write_text(REPLACER)
    proc = subprocess.run([sys.executable, str(script), str(root)], env={**os.environ,
                          "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    store = Store.open(Settings(store=root))
    try:
        # The catalog already holds the new, empty set: no row points at the old files left on disk.
        assert store.feature_set("v").params == {"version": 2}
        assert store.coverage() == [("v", "test", 3, 0, 0)]
        assert store.images_lacking("v") == [1, 2, 3, 4, 5, 6]
        assert all(p.exists() for p in old)  # orphans until the next writer
        with store.writing():
            pass
        assert list((root / "features" / "v").glob("*.h5")) == []
    finally:
        store.close()
