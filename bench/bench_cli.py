"""Benchmark: CPU seconds an ``fs`` command costs, beside bare Python imports measured in the same run.

Each command runs in a fresh process ``--repeats`` times; the figure is the
median CPU time (user + system, from ``getrusage`` of the finished child), so a
loaded machine inflates it less than wall time. Measured:

* ``python -c "import typer, rich.progress"`` (baseline of ``fs --help``) and
  ``python -c "import numpy, sqlalchemy"`` (baseline of ``fs status`` / ``fs sql``);
* ``fs --help``, ``fs status``, ``fs sql "SELECT 1"`` on a store holding a
  100,000 x 256 feature set, and ``fs search --features bench --id 1 -k 10``
  through that set's HNSW index (``fs index build``).

featurestore's own bytecode is written first (``compileall``), as ``pip install``
does for an installed package: under ``PYTHONDONTWRITEBYTECODE=1`` an editable
install would otherwise compile its ~60 modules from source on every start
(about 0.07 s CPU), while the baselines' site-packages come compiled.

The store is generated once (random vectors, fake catalog rows; about a minute)
and cached under ``$FS_BENCH_DIR/cli-<n>x<dim>-<schema head>``; a cached store of
an older schema is copied and migrated instead of generated again.

Targets (issue 28): ``--help`` <= 3x the typer/rich import; ``status`` and ``sql``
<= 2x the numpy/sqlalchemy import; indexed search <= 1.0 s CPU.

Run::

    python -m bench.bench_cli                 # 100,000 x 256, 5 repeats
    python -m bench.bench_cli --n 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH_DIR

SET = "bench"


def cpu_of(cmd: list[str], env: dict[str, str]) -> float:
    """CPU seconds (user + system) of one run of ``cmd`` in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def store_folder(n: int, dim: int) -> Path:
    """Where the benchmark's store is cached: one folder per schema head, so branches never share one."""
    from featurestore.catalog.database import head_revision

    return BENCH_DIR / f"cli-{n}x{dim}-{head_revision('sqlite://')}"


def _reuse_older(root: Path, n: int, dim: int) -> bool:
    """Copy a ready store of an older schema (same size) to ``root`` and migrate the copy; False if none."""
    from featurestore.catalog.database import make_engine, upgrade

    candidates = [BENCH_DIR / f"cli-{n}x{dim}", *BENCH_DIR.glob(f"cli-{n}x{dim}-*")]
    older = sorted(p for p in candidates if p != root and (p / "ready").is_file())
    for src in reversed(older):
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("write.lock"))
        url = f"sqlite:///{root / 'catalog.db'}"
        engine = make_engine(url)
        try:
            upgrade(engine, url)
        except Exception as exc:  # noqa: BLE001 - a newer schema (another branch): build a fresh store instead
            print(f"cannot migrate the cached store {src.name} ({type(exc).__name__}); building a new one")
            shutil.rmtree(root, ignore_errors=True)
            continue
        finally:
            engine.dispose()
        print(f"migrated a copy of the cached store {src.name}")
        return True
    return False


def prepare(root: Path, n: int, dim: int) -> None:
    """A store with an ``n`` x ``dim`` feature set and its HNSW index (kept for reruns)."""
    if (root / "ready").is_file() or _reuse_older(root, n, dim):
        return
    from bench.bench_ann import build_store
    from featurestore.config import Settings
    from featurestore.search.index import build_index
    from featurestore.store import Store

    t = time.perf_counter()
    if not (root / "vectors-written").is_file():  # a run stopped during the index build keeps its vectors
        shutil.rmtree(root, ignore_errors=True)
        rng = np.random.default_rng(0)
        build_store(root, rng.standard_normal((n, dim), dtype=np.float32), rng.integers(0, 10, n))
        (root / "vectors-written").write_text("ok")
    with Store.open(Settings(store=root)) as store:
        build_index(store, SET)  # takes the store's write lock itself
    (root / "ready").write_text("ok")
    print(f"built the store ({n:,} x {dim} and its index) in {time.perf_counter() - t:.0f}s")


def compile_bytecode() -> None:
    """Write the bytecode of featurestore's packages (the library, its CLI and migrations) if missing."""
    import compileall
    import importlib

    for name in ("featurestore", "featurestore.cli", "featurestore.migrations"):
        folder = Path(importlib.import_module(name).__file__ or "").parent
        if not compileall.compile_dir(folder, quiet=1):
            raise SystemExit(f"could not compile the modules under {folder}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.n < 1 or args.dim < 1:
        raise SystemExit("--n, --dim and --repeats must be at least 1")
    try:
        import usearch  # noqa: F401
        indexed = True
    except ImportError:
        print("skipped the indexed search: usearch is not installed")
        indexed = False
    root = store_folder(args.n, args.dim)
    prepare(root, args.n, args.dim)
    compile_bytecode()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_")} | {"FS_STORE": str(root)}
    fs = [sys.executable, "-m", "featurestore.cli.main"]
    cases = [
        ("import typer, rich.progress", [sys.executable, "-c", "import typer, rich.progress"], None, None),
        ("import numpy, sqlalchemy", [sys.executable, "-c", "import numpy, sqlalchemy"], None, None),
        ("fs --help", [*fs, "--help"], "import typer, rich.progress", 3.0),
        ("fs status", [*fs, "status"], "import numpy, sqlalchemy", 2.0),
        ('fs sql "SELECT 1"', [*fs, "sql", "SELECT 1"], "import numpy, sqlalchemy", 2.0),
        ("fs search --id 1 -k 10 (index)", [*fs, "search", "--features", SET, "--id", "1", "-k", "10"], None, None),
    ][: None if indexed else -1]
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"median CPU seconds of {args.repeats} runs; featurestore's bytecode compiled first")
    got: dict[str, float] = {}
    print(f"{'command':34} {'CPU s':>7} {'baseline':>26} {'ratio':>6} {'target':>7}")
    for name, cmd, base, target in cases:
        got[name] = statistics.median(cpu_of(cmd, env) for _ in range(args.repeats))
        if base is None:
            goal = "<= 1.0 s" if name.startswith("fs search") else ""
            print(f"{name:34} {got[name]:7.3f} {'':>26} {'':>6} {goal:>7}")
            continue
        ratio = got[name] / got[base]
        print(f"{name:34} {got[name]:7.3f} {base:>26} {ratio:5.2f}x {f'<= {target:g}x':>7}")


if __name__ == "__main__":
    main()
