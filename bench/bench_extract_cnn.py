"""Right-flow extraction speed on real images (issues 4 and 12).

    python -m bench.bench_extract_cnn [--images 2000] [--gluon-images 0]

Prints, side by side in one run on the same Fashion-MNIST photos, for
efficientnet-lite0 (batch 32, FS_WORKERS threads, default all cores):
  (a) forward only on onnxruntime (the model's stored ONNX export), on
      pre-decoded, pre-normalised tensors of the real images,
  (b) end-to-end `fs extract --model efficientnet-lite0` on onnxruntime (the default):
      read, decode, resize, normalise, infer, write shards, register in the catalog,
  (c) end-to-end `fs extract --model efficientnet-lite0 --runtime mxnet`,
  (d) forward only on MXNet's symbolic executor (mx.mod.Module + MKLDNN fusion),
  (e) optionally (--gluon-images N) the same network as a hybridized Gluon block,
  (f) optionally (--baseline-onnx FILE) forward only on another export of the model, e.g.
      the one featurestore 0.1 made with MXNet's exporter (models/efficientnet-lite0/*.onnx
      of a store it wrote), with the largest difference between its vectors and (a)'s.
(c), (d) and (e) need MXNet (the mxnet extra); without it they are skipped with one line.
Targets: (b) >= 0.85x (a) and >= 1.7x (c) (issue 12); (c) >= 0.80x (d) (issue 4).

    python -m bench.bench_extract_cnn --int8 efficientnet-lite0,efficientnet-lite1,efficientnet-lite2 \
        --images 2000 --size 640x480

(issue 29) instead prints, per model, in one run on the same 640x480 JPEGs:
forward only at fp32 (the baseline) and int8 on pre-prepared tensors (at most
--forward-images of them), and end-to-end `fs extract` at fp32 and int8, each
with the full JPEG decode (`--exact-decode`, today's default before issue 29) and
the draft decode; the ratio of int8 + draft to fp32 + exact end to end (target
>= 1.6 for lite0), the mean cosine of the int8 vectors to the fp32 ones, the
one-off cost of making the int8 model (with its guard's per-tap cosine, before and
after the bias corrections), the CPU's SIMD flags and the operators of
the int8 graph after onnxruntime's optimisation (QLinearConv = int8 kernels).
Also printed per row: the process CPU time per image (all threads; on a shared
machine steadier than wall time) and the cores busy (CPU time / wall time); and
the largest difference between the vectors of (b) and (c).

The rows are measured in turn, --repeat times (default 2), and each row reports
its best pass (and its lowest CPU per image), so a burst of load from other
processes on a shared machine does not land on one row only. End-to-end times
exclude building the extractor (loading the model, about a second on either
runtime), as in a long extract.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np

from bench.bench_cnn_forward import bench_gluon
from bench.common import fashion_images, image_files, row, temp_store
from featurestore.errors import RuntimeUnavailableError
from featurestore.features.cnn.mxnet_backend import import_mxnet
from featurestore.features.cnn.onnx_backend import OnnxModel
from featurestore.features.cnn.registry import cnn_extractor
from featurestore.features.cnn.runtimes import load_model, load_onnx_model
from featurestore.io.images import load_rgb
from featurestore.pipelines.extract import extract
from featurestore.pipelines.ingest import ingest


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Best:
    """The best pass of one row: lowest wall time (with its cores busy) and lowest CPU time."""

    def __init__(self) -> None:
        self.seconds = self.cpu = float("inf")
        self.cores = 0.0

    def add(self, seconds: float, cpu: float) -> None:
        if seconds < self.seconds:
            self.seconds, self.cores = seconds, cpu / seconds
        self.cpu = min(self.cpu, cpu)


def _forward(model, batches: list[np.ndarray], best: Best) -> None:  # type: ignore[no-untyped-def]
    model.forward(batches[0])  # warm-up: memory planning, kernel selection
    t, c = time.perf_counter(), _cpu()
    for b in batches:
        model.forward(b)
    best.add(time.perf_counter() - t, _cpu() - c)


def _end_to_end(store, runtime: str, batch: int, n: int, best: Best) -> np.ndarray:  # type: ignore[no-untyped-def]
    """One `fs extract` pass (a fresh feature set) timed into ``best``; returns its vectors."""
    with store.writing():
        ex = cnn_extractor(store, "efficientnet-lite0", batch_size=batch, runtime=runtime)
        t, c = time.perf_counter(), _cpu()
        summary = extract(store, [ex], batch_size=batch, replace=True)
        best.add(time.perf_counter() - t, _cpu() - c)
    assert summary.processed == n and not summary.failed, summary
    return store.read_matrix(["efficientnet-lite0"]).X


def _have_mxnet() -> bool:
    try:
        import_mxnet()
    except RuntimeUnavailableError as exc:
        print(f"(c), (d), (e) skipped: {exc}")
        return False
    return True
def cpu_flags() -> str:
    """The SIMD extensions onnxruntime's int8 kernels (MLAS) choose from, as /proc/cpuinfo lists them."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{model}; " + " ".join(f"{f}{'+' if f in flags else '-'}" for f in wanted)


def optimized_ops(data: bytes, threads: int | None) -> str:
    """Operator counts of a model after onnxruntime's graph optimisation (what actually runs)."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    from featurestore.features.cnn.onnx_backend import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads)
        so.optimized_model_filepath = f"{tmp}/opt.onnx"
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(f"{tmp}/opt.onnx").graph.node)
    return ", ".join(f"{op} {k}" for op, k in ops.most_common(6))


def _extract_pass(store, name: str, batch: int, n: int, best: Best, **kw) -> np.ndarray:  # type: ignore[no-untyped-def]
    """One `fs extract --model name` pass with the given precision/decode, timed into ``best``; its vectors."""
    with store.writing():
        ex = cnn_extractor(store, name, batch_size=batch, save_export=True, **kw)
        t, c = time.perf_counter(), _cpu()
        summary = extract(store, [ex], batch_size=batch, replace=True)
        best.add(time.perf_counter() - t, _cpu() - c)
    assert summary.processed == n and not summary.failed, summary
    return store.read_matrix([ex.outputs()[0].name]).X


def int8_main(args: argparse.Namespace, models: list[str], files: list, root) -> None:  # type: ignore[no-untyped-def]
    """fp32 vs int8 and exact vs draft decode, forward only and end to end, per model (issue 29)."""
    n = len(files)
    print(f"{n} Fashion-MNIST images ({args.size} JPEG), batch {args.batch}, {os.cpu_count()} cores, "
          f"FS_WORKERS={os.environ.get('FS_WORKERS', '(all cores)')}, best of {max(1, args.repeat)}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"CPU: {cpu_flags()}")
    summary = []
    with temp_store("int8") as store:
        with store.writing():
            ingest(store, root)
        for name in models:
            line = _int8_model_rows(store, name, args, files)
            if line:
                summary.append(line)
    print()
    for line in summary:
        print(line + (" (target >= 1.6)" if "lite0" in line else ""))


def _int8_model_rows(store, name: str, args: argparse.Namespace, files: list) -> str | None:  # type: ignore[no-untyped-def]
    """Measure and print one model's rows; the summary line, or None when the guard refuses its int8 copy."""
    from featurestore.errors import FeatureStoreError
    from featurestore.features.cnn.quantize import Int8Options, mean_cosine
    from featurestore.features.cnn.registry import int8_export, load_int8_model, model_record

    n = len(files)
    with store.writing():
        t = time.perf_counter()
        try:
            int8_model, _, rec = load_int8_model(store, name, batch_size=args.batch, save_export=True,
                                                 opts=Int8Options(min_cosine=args.min_cosine))
        except FeatureStoreError as exc:  # refused by the guard: no int8 rows for this model
            print(f"\n{name}: {exc}")
            return None
        made = time.perf_counter() - t
        fp32_model, _ = load_onnx_model(store, name, batch_size=args.batch)
        row_ = model_record(store, name)
        q = rec["quantization"]
        data, _, _ = int8_export(store, row_, [row_.default_tap], Int8Options(sha256=q["sha256"]), False)
    k = min(n, args.forward_images)
    tensors = np.stack([fp32_model.prepare(load_rgb(p)) for p in files[:k]])
    batches = [tensors[i : i + args.batch] for i in range(0, k, args.batch)]
    f32, i8 = Best(), Best()
    e2e = {key: Best() for key in ("fp32 exact", "fp32 draft", "int8 exact", "int8 draft")}
    vecs: dict[str, np.ndarray] = {}
    for _ in range(max(1, args.repeat)):
        _forward(fp32_model, batches, f32)
        _forward(int8_model, batches, i8)
        for key, best in e2e.items():
            precision, decode = key.split()
            vecs[key] = _extract_pass(store, name, args.batch, n, best, precision=precision, decode=decode,
                                      int8=Int8Options(min_cosine=args.min_cosine))
    cal = q["calibration"]
    print(f"\n{name}: int8 model made in {made:.1f} s (calibrated "
          f"on {cal['images']} images, {cal['held_back']} held back; guard cosine "
          f"{', '.join(f'{t} {v:.4f}' for t, v in q['cosine'].items())}; "
          f"{q.get('convs_corrected', 0)} convolution biases corrected; before the bias corrections "
          f"{', '.join(f'{t} {v:.4f}' for t, v in q.get('cosine_uncorrected', {}).items())})")
    print(f"  int8 graph after optimisation: {optimized_ops(data, store.settings.workers)}")
    print(f"{row('  forward only, fp32 (base)', k, f32.seconds)}  {1000 * f32.cpu / k:5.1f} ms CPU/img")
    print(f"{row('  forward only, int8', k, i8.seconds, k / f32.seconds)}  {1000 * i8.cpu / k:5.1f} ms CPU/img")
    base = n / e2e["fp32 exact"].seconds
    for key, best in e2e.items():
        label = f"  fs extract, {key}" + (" (base)" if key == "fp32 exact" else "")
        print(f"{row(label, n, best.seconds, None if key == 'fp32 exact' else base)}  "
              f"{1000 * best.cpu / n:5.1f} ms CPU/img, {best.cores:.2f} cores busy")
    print(f"  mean cosine over {n} images: int8 vs fp32 (exact) "
          f"{mean_cosine(vecs['int8 exact'], vecs['fp32 exact']):.4f}; int8+draft vs fp32+exact "
          f"{mean_cosine(vecs['int8 draft'], vecs['fp32 exact']):.4f}; fp32 draft vs exact "
          f"{mean_cosine(vecs['fp32 draft'], vecs['fp32 exact']):.4f}")
    return (f"{name}: int8+draft / fp32+exact end to end = "
            f"{e2e['fp32 exact'].seconds / e2e['int8 draft'].seconds:.2f}x (CPU per image "
            f"{e2e['fp32 exact'].cpu / e2e['int8 draft'].cpu:.2f}x); forward only int8 / fp32 = "
            f"{f32.seconds / i8.seconds:.2f}x (CPU {f32.cpu / i8.cpu:.2f}x)")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--int8", metavar="MODELS", default=None,
                    help="comma-separated models: fp32 vs int8, exact vs draft decode (issue 29) instead")
    ap.add_argument("--forward-images", type=int, default=512, help="with --int8: images in the forward-only rows")
    ap.add_argument("--min-cosine", type=float, default=0.98, help="with --int8: the guard (lower it to time a "
                    "model whose int8 copy the default refuses)")
    ap.add_argument("--repeat", type=int, default=2, help="passes over every row; each row reports its best")
    ap.add_argument("--gluon-images", type=int, default=0, help="also time hybridized Gluon on N images")
    ap.add_argument("--size", default="224x224", help="size of the exported JPEGs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--baseline-onnx", type=Path, help="another export of efficientnet-lite0 to compare with (f)")
    return ap.parse_args()


def main() -> None:
    args = _args()
    have_mx = _have_mxnet()
    w, h = (int(v) for v in args.size.split("x"))
    root = fashion_images(args.images, (w, h))
    files = image_files(root)
    if args.int8:
        int8_main(args, [m.strip() for m in args.int8.split(",") if m.strip()], files, root)
        return
    n = len(files)
    with temp_store("cnn") as store:
        with store.writing():
            ingest(store, root)
            onnx_model, row_ = load_onnx_model(store, "efficientnet-lite0", batch_size=args.batch)
            mx_model = load_model(store, "efficientnet-lite0", batch_size=args.batch)[0] if have_mx else None
        base_model = None
        if args.baseline_onnx:
            base_model = OnnxModel.load(args.baseline_onnx.read_bytes(), onnx_model.preprocess, onnx_model.taps,
                                        batch_size=args.batch, threads=store.settings.workers,
                                        where=str(args.baseline_onnx))
        tensors = np.stack([onnx_model.prepare(load_rgb(p)) for p in files])
        batches = [tensors[i : i + args.batch] for i in range(0, n, args.batch)]
        ort_fwd, ort_e2e, mx_e2e, mx_fwd, base_fwd = Best(), Best(), Best(), Best(), Best()
        diff = base_diff = 0.0
        for _ in range(max(1, args.repeat)):
            _forward(onnx_model, batches, ort_fwd)
            if base_model is not None:
                _forward(base_model, batches, base_fwd)
                base_diff = max(base_diff, max(float(np.abs(onnx_model.forward(b)[t] - base_model.forward(b)[t]).max())
                                               for b in batches for t in onnx_model.taps))
            ort_vecs = _end_to_end(store, "onnxruntime", args.batch, n, ort_e2e)
            if mx_model is not None:
                mx_vecs = _end_to_end(store, "mxnet", args.batch, n, mx_e2e)
                diff = max(diff, float(np.abs(ort_vecs - mx_vecs).max()))
                _forward(mx_model, batches, mx_fwd)
        del onnx_model, mx_model, base_model
        g = min(args.gluon_images, n) if have_mx else 0
        gluon_rate = None
        if g:
            symbol, params = store.root / row_.symbol_path, store.root / row_.params_path
            gluon_rate = bench_gluon(symbol, params, "global_pool", batches[: -(-g // args.batch)], args.batch)
    _report(args, n, {"a": ort_fwd, "b": ort_e2e, "c": mx_e2e, "d": mx_fwd, "f": base_fwd}, diff, base_diff,
            (g, gluon_rate), have_mx)


def _report(args: argparse.Namespace, n: int, bests: dict[str, Best], diff: float, base_diff: float,
            gluon: tuple[int, float | None], have_mx: bool) -> None:
    ort_fwd, ort_e2e, mx_e2e, mx_fwd, base_fwd = (bests[k] for k in "abcdf")
    g, gluon_rate = gluon
    base = n / ort_fwd.seconds
    print(f"{n} real images ({args.size} JPEG), batch {args.batch}, {os.cpu_count()} cores, "
          f"FS_WORKERS={os.environ.get('FS_WORKERS', '(all cores)')}, best of {max(1, args.repeat)}")
    for name, best in [("(a) forward only, onnxruntime", ort_fwd), ("(b) fs extract --model efficientnet-lite0",
                       ort_e2e), ("(c) fs extract ... --runtime mxnet", mx_e2e),
                       ("(d) forward only, MXNet Module (MKLDNN)", mx_fwd),
                       (f"(f) forward only, {args.baseline_onnx}", base_fwd)]:
        if best.seconds == float("inf"):
            continue
        print(f"{row(name, n, best.seconds, None if best is ort_fwd else base)}  "
              f"{1000 * best.cpu / n:5.1f} ms CPU/img, {best.cores:.2f} cores busy")
    if gluon_rate:
        print(row("(e) forward only, hybridized Gluon", g, g / gluon_rate, base))
    if args.baseline_onnx:
        print(f"max |(a) - (f)| over {n} images, every registered tap: {base_diff:.2e}")
    if not have_mx:
        print(f"wall: (b)/(a) = {ort_fwd.seconds / ort_e2e.seconds:.2f} (target >= 0.85)")
        return
    print(f"max |(b) - (c)| over {n} vectors: {diff:.2e}")
    print(f"wall: (b)/(a) = {ort_fwd.seconds / ort_e2e.seconds:.2f} (target >= 0.85); (b)/(c) = "
          f"{mx_e2e.seconds / ort_e2e.seconds:.2f} (target >= 1.7); (c)/(d) = {mx_fwd.seconds / mx_e2e.seconds:.2f} "
          f"(target >= 0.80)")
    print(f"CPU per image: (b)/(a) = {ort_fwd.cpu / ort_e2e.cpu:.2f}; (b)/(c) = {mx_e2e.cpu / ort_e2e.cpu:.2f}; "
          f"(c)/(d) = {mx_fwd.cpu / mx_e2e.cpu:.2f}")


if __name__ == "__main__":
    main()
