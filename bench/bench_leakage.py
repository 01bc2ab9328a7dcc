"""Near-copy leakage across splits, and what --group-duplicates does about it (issue 25).

    python -m bench.bench_leakage [--images 5000] [--size 640x480] [--copies 0.1] [--threshold 0.95[,0.9...]]

The Table-1 protocol (class-balanced Fashion-MNIST photos, efficientnet-lite0
features, 10 repeated 90/10 splits, seed 0) on three image sets, in one run:

* copy-free: the N photos;
* plain: the N photos plus ``copies x N`` planted near copies (each a stored photo
  re-encoded as JPEG at quality 60 instead of 90, cropped by 5 % of each side and
  resized back, or shifted by 3 % of its size; same label), ordinary stratified splits;
* grouped: the same N + copies with ``--group-duplicates THRESHOLD`` (one row per threshold given).

For each: accuracy (mean ± std over the splits), the number of train/test
near-duplicate pairs (cosine >= the row's threshold, or the first one for the
ungrouped rows, in the CNN set, summed over the splits, counted exactly from the
stored split images, ``run_split_images``), and the planted copy pairs that
straddle a split whatever their similarity (the leak the grouping must remove).
Then the cost of grouping the N + copies images, exactly and through the HNSW
index (build + grouping), projected to 1M images from the index's per-vector
cost (HNSW queries grow about with log n) and 16 cores.
Targets: 0 cross-split pairs with groups; grouped accuracy within 0.5 points of
the copy-free one; grouping 1M projected under 30 min on 16 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import BENCH_DIR, fashion_images, image_files, temp_store

KINDS = ("reencode", "crop", "shift")
_BUILT: list[float] = []  # seconds of the index build


def plant(originals: list[Path], dest: Path, share: float, seed: int = 0) -> list[tuple[Path, Path, str]]:
    """Write ``share x len(originals)`` near copies of distinct originals under ``dest`` (same class folders)."""
    rng = random.Random(seed)
    chosen = rng.sample(originals, round(share * len(originals)))
    root = originals[0].parents[2]
    out = []
    for n, src in enumerate(chosen):
        kind = KINDS[n % len(KINDS)]
        target = dest / src.relative_to(root).parent / f"copy-{kind}-{src.stem}.jpg"
        out.append((src, target, kind))
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(src).convert("RGB")
        w, h = img.size
        if kind == "reencode":
            img.save(target, "JPEG", quality=60)
            continue
        if kind == "crop":
            dx, dy = round(0.05 * w / 2), round(0.05 * h / 2)
            img = img.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BILINEAR)
        else:
            canvas = Image.new("RGB", (w, h), img.getpixel((0, 0)))
            canvas.paste(img, (round(0.03 * w), round(0.03 * h)))
            img = canvas
        img.save(target, "JPEG", quality=90)
    return out


def cross_split_pairs(store, run_id: int, grouping, planted: set[tuple[int, int]]) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(near-duplicate train/test pairs summed over the run's splits, planted copy pairs straddling a split)."""
    from featurestore.search.groups import cross_pairs

    ids = store.catalog.run_image_ids(run_id)
    total = mine = 0
    for test in store.catalog.split_test_ids(run_id).values():
        pairs = cross_pairs(store, grouping, ids[~np.isin(ids, test)], test)
        total += len(pairs)
        in_test = set(test.tolist())
        in_run = set(ids.tolist())
        mine += sum(o in in_run and c in in_run and ((o in in_test) != (c in in_test)) for o, c in planted)
    return total, mine


def _store_with_copies(store, src: Path, copies_dir: Path, planted_files, model: str):  # type: ignore[no-untyped-def]
    """Ingest the photos ("orig") and copies ("copies"), extract the CNN set; (set name, all ids, planted id pairs)."""
    from featurestore.features.cnn.registry import cnn_extractor
    from featurestore.pipelines.extract import extract
    from featurestore.pipelines.ingest import ingest

    t = time.perf_counter()
    with store.writing():
        a = ingest(store, src, dataset="orig")
        b = ingest(store, copies_dir, dataset="copies")
        extract(store, [cnn_extractor(store, model)])
    cnn = next(fs.name for fs in store.feature_sets() if fs.kind == "cnn")
    print(f"ingest + extract {cnn}: {time.perf_counter() - t:.0f} s")
    by_path = {r.source_path: r.id for r in store.select_images()}
    planted = {(by_path[str(o)], by_path[str(c)]) for o, c, _ in planted_files
               if str(o) in by_path and str(c) in by_path}
    kinds = {(by_path[str(o)], by_path[str(c)]): k for o, c, k in planted_files
             if str(o) in by_path and str(c) in by_path}
    return cnn, np.array(sorted(a.image_ids + b.image_ids), dtype=np.int64), planted, kinds


def _grouping_cost(store, cnn: str, ids: np.ndarray, threshold: float, planted: set[tuple[int, int]],  # type: ignore[no-untyped-def]
                   have_index: bool, kinds: dict[tuple[int, int], str]):
    from featurestore.search.groups import group_near_duplicates

    exact = group_near_duplicates(store, cnn, ids, threshold, exact=True)
    same = {(i, j) for g in exact.groups for i in g for j in g}
    found = sum(p in same for p in planted)
    sims = _planted_similarities(store, cnn, planted)
    largest = max(map(len, exact.groups), default=1)
    print(f"grouping {ids.size} images at cosine >= {threshold:g} in {cnn}: exact {exact.seconds:.2f} s, "
          f"{len(exact.groups)} groups of {exact.n_grouped} images (largest {largest}); {found}/{len(planted)} "
          f"planted copies grouped with their photo (their cosine: min {np.min(sims):.3f}, "
          f"median {np.median(sims):.3f})")
    for kind in KINDS:
        of_kind = [p for p, k in kinds.items() if k == kind]
        k_sims = _planted_similarities(store, cnn, set(of_kind))
        print(f"  {kind:<8}: {sum(p in same for p in of_kind)}/{len(of_kind)} grouped, cosine min "
              f"{np.min(k_sims):.3f} median {np.median(k_sims):.3f}")
    if have_index:
        from featurestore.search.index import build_index

        if not _BUILT:  # one index serves every threshold: its build is counted in each projection
            t = time.perf_counter()
            build_index(store, cnn)
            _BUILT.append(time.perf_counter() - t)
        built = _BUILT[0]
        indexed = group_near_duplicates(store, cnn, ids, threshold)
        agree = indexed.groups == exact.groups
        per_vec = (built + indexed.seconds) / ids.size
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        projected = per_vec * 1_000_000 * math.log(1_000_000) / math.log(ids.size) * cores / 16
        print(f"through the HNSW index: build {built:.2f} s + grouping {indexed.seconds:.2f} s "
              f"({'same groups as exact' if agree else 'groups differ from exact'}); projected to 1M images "
              f"on 16 cores: {projected / 60:.1f} min (per-vector cost x log(1M)/log({ids.size}) x {cores}/16)")
    return exact


def _runs(store, cnn: str, args: argparse.Namespace, exact: dict, planted: set[tuple[int, int]]) -> list[tuple]:  # type: ignore[no-untyped-def]
    from featurestore.pipelines.train import TrainConfig, train

    rows = []
    first = args.thresholds[0]
    for name, cfg, t_pairs in (
        ("copy-free", TrainConfig([cnn], classifier=args.classifier, n_splits=args.splits, dataset="orig"), first),
        ("plain", TrainConfig([cnn], classifier=args.classifier, n_splits=args.splits), first),
        *((f"grouped {t:g}", TrainConfig([cnn], classifier=args.classifier, n_splits=args.splits,
                                         group_duplicates=t), t) for t in args.thresholds),
    ):
        t = time.perf_counter()
        with store.writing():
            out = train(store, cfg, fit_final=False)
        acc = out.evaluation.summary["accuracy"]
        pairs, mine = cross_split_pairs(store, out.run_id, exact[t_pairs], planted)
        rows.append((name, out.n_images, out.split_scheme, acc.mean, acc.std or 0.0, pairs, mine,
                     time.perf_counter() - t))
    return rows


def _report(rows: list[tuple], args: argparse.Namespace, cnn: str) -> None:
    base = rows[0][3]
    print(f"\n{'images':<13} {'n':>6}  {'splits':<17} {'accuracy':>14} {'vs copy-free':>12} "
          f"{'cross-split pairs':>18} {'planted across':>14} {'s':>6}")
    for name, n, scheme, mean, std, pairs, mine, secs in rows:
        print(f"{name:<13} {n:>6}  {scheme:<17} {100 * mean:>7.2f} ± {100 * std:4.2f} {100 * (mean - base):>+12.2f} "
              f"{pairs:>18} {mine:>14} {secs:>6.0f}")
    print(f"\nclassifier {args.classifier}, {args.splits} x 0.1 splits, seed 0; pairs: cosine >= the row's threshold "
          f"({args.thresholds[0]:g} for the ungrouped rows) in {cnn}, train x test, summed over the splits; planted "
          "across: planted copy pairs with one image in training and one in test, summed over the splits")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--copies", type=float, default=0.1)
    ap.add_argument("--threshold", default="0.95", help="One or more cosine thresholds, comma-separated.")
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--classifier", default="rf")
    ap.add_argument("--model", default="efficientnet-lite0")
    args = ap.parse_args(argv)
    args.thresholds = [float(t) for t in args.threshold.split(",")]
    try:
        import usearch  # noqa: F401
        have_index = True
    except ImportError:
        print("bench_leakage: usearch is not installed; the index rows are skipped")
        have_index = False
    w, h = (int(v) for v in args.size.lower().split("x"))
    src = fashion_images(args.images, (w, h))
    originals = image_files(src)
    copies_dir = BENCH_DIR / f"leakage-copies-{args.images}-{w}x{h}-{args.copies:g}"
    planted_files = plant(originals, copies_dir, args.copies)
    print(f"{len(originals)} photos + {len(planted_files)} planted near copies ({args.size}); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with temp_store("leakage") as store:
        cnn, ids, planted, kinds = _store_with_copies(store, src, copies_dir, planted_files, args.model)
        exact = {t: _grouping_cost(store, cnn, ids, t, planted, have_index, kinds) for t in args.thresholds}
        rows = _runs(store, cnn, args, exact, planted)
    _report(rows, args, cnn)
    return 0


def _planted_similarities(store, feature_set: str, planted: set[tuple[int, int]]) -> np.ndarray:  # type: ignore[no-untyped-def]
    if not planted:
        return np.array([np.nan])
    pairs = sorted(planted)
    ids = sorted({i for p in pairs for i in p})
    fm = store.read_matrix([feature_set], image_ids=ids)
    unit = fm.X / np.linalg.norm(fm.X, axis=1, keepdims=True)
    pos = {int(i): n for n, i in enumerate(fm.image_ids)}
    return np.array([float(unit[pos[a]] @ unit[pos[b]]) for a, b in pairs])


if __name__ == "__main__":
    raise SystemExit(main())
