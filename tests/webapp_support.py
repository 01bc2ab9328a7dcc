"""A small store for the web-app tests, and `fs serve` on a free loopback port (tests and bench share it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from featurestore.config import Settings
from featurestore.features.pixels import PixelsExtractor
from featurestore.features.projection import projection_extractor
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest
from featurestore.pipelines.predict import predict
from featurestore.pipelines.train import TrainConfig, evaluate_many, train
from featurestore.store import Store

CLASSES = [("footwear", "sneaker"), ("footwear", "sandal"), ("tops", "shirt")]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def class_image(path: Path, cls: int, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A picture whose colour and stripes depend on its class (so features can tell classes apart)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([(200, 60, 60), (60, 160, 70), (60, 80, 200)][cls % 3], dtype=np.float64)
    y, x = np.mgrid[0:h, 0:w]
    stripes = ((x if cls % 2 else y) // (4 + cls)) % 2
    arr = base + 50 * stripes[..., None] + rng.normal(0, 25, (h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(path)
    return path


def build_store(base: Path, per_class: int = 8) -> Path:
    """A store of ``3 * per_class`` labelled images (dataset "shoes", superclass/class folders) with rp16 and
    pixels8x6; run 1 trained on them (rp16, final model) and two evaluated runs (2, 3) on the same splits.
    Then dataset "later" (ingested after the runs): 2 images per class plus 3 whose label disagrees with
    their content (so run 1 gets them wrong). Run 1's predictions of every image are stored."""
    seed = 0
    for k, (sc, cls) in enumerate(CLASSES):
        for i in range(per_class):
            class_image(base / "shoes" / sc / cls / f"{cls}{i}.png", k, seed)
            seed += 1
        for i in range(2):
            class_image(base / "later" / sc / cls / f"later-{cls}{i}.png", k, 1000 + seed + i)
        # content of the next class, labelled as this one
        class_image(base / "later" / sc / cls / f"odd-{cls}.png", (k + 1) % 3, 2000 + seed)
    settings = Settings(store=base / ".fs", workers=2)
    with Store.open(settings, create=True) as store, store.writing():
        ingest(store, base / "shoes", dataset="shoes")
        rp16 = projection_extractor(store, 16, (32, 24))
        pixels = PixelsExtractor((8, 6))
        extract(store, [rp16, pixels])
        run = train(store, TrainConfig(["rp16"], n_splits=3, trees=10)).run_id
        evaluate_many(store, [["rp16"], ["pixels8x6"]], TrainConfig(["rp16"], n_splits=3, trees=10))
        ingest(store, base / "later", dataset="later")
        extract(store, [rp16, pixels])
        predict(store, run, [r[0] for r in store.select_images()])
    return base / ".fs"


def add_fixed_test_runs(store_path: Path) -> tuple[int, int]:
    """Two runs scored on the fixed test dataset "later" after training on "shoes": a trained one (rp16, final
    model, then `fs predict` of every image, so it has stored predictions too) and an evaluated one (pixels8x6).
    Returns their ids."""
    with Store.open(Settings(store=store_path, workers=2)) as store, store.writing():
        cfg = TrainConfig(["rp16"], trees=10, dataset="shoes", test_dataset="later")
        trained = train(store, cfg).run_id
        (evaluated,) = (o.run_id for o in evaluate_many(store, [["pixels8x6"]], cfg))
        predict(store, trained, [r[0] for r in store.select_images()])
    return trained, evaluated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(store: Path, *, token: str | None = None, allow_writes: bool = False, log: Path | None = None
            ) -> Iterator[str]:
    """`fs serve` in a subprocess on a free loopback port; yields its base URL, stops it afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_")}
    if token:
        env["FS_API_TOKEN"] = token
    cmd = [sys.executable, "-m", "featurestore.cli.main", "--store", str(store), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"] + (["--allow-writes"] if allow_writes else [])
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fs serve did not start (exit code {proc.poll()}); see {log}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]
