"""Extraction and evaluation on a Ray cluster: the local pipelines' work, spread over the nodes.

Ray is an optional extra (``pip install "featurestore[ray]"``), imported inside
functions only. Connecting (``address`` is ``"local"``, ``"auto"`` or the head's
``HOST:PORT``) and the checks of the cluster's shape live in
:mod:`featurestore.pipelines.ray_cluster`.

Extraction (:func:`extract_on_ray`)
    The driver (the process running ``fs extract --ray``) holds the store's
    write lock and plans the pass exactly as the local path does
    (:func:`~featurestore.pipelines.extract.plan_extract`: same feature sets,
    same images lacking them), then cuts those images into tasks. A pool of
    actors, each reserving ``threads`` CPUs of its node (so actors x threads
    never exceeds a node's cores), rebuilds the extractors once from the
    feature sets' catalog rows through the registry (so vectors are those of
    the local path), runs the shared
    :func:`~featurestore.pipelines.extract.featurize_batches` on each task
    (decode once, feed every extractor) and writes one shard per feature set
    per task into the store folder (temp -> fsync -> rename). Only the driver
    registers shards in the catalog, one transaction each, with the image ids
    it reads back from the file.

Failures
    A killed worker process is restarted and its tasks retried by Ray. A task
    that died after writing its shard leaves an unregistered file: the driver
    registers each task once and each image once per set, and removes orphan
    files under the lock when the job ends (the next writer does if the driver
    itself dies). An image file a node cannot read is reported by path and
    node, and the job goes on. Ctrl-C kills the actors; every registered shard
    is complete, so the store stays consistent.

Evaluation (:func:`evaluate_on_ray`)
    The assembled matrix goes into Ray's object store once; each (combination,
    split) is one task running
    :func:`~featurestore.training.evaluation.fit_and_score` with the estimator
    and seed of the local path, so per-split scores are identical.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.config import Settings
from featurestore.errors import (
    ClusterError,
    FeatureStoreError,
    IntegrityError,
    InvalidParameterError,
)
from featurestore.features.base import Extractor
from featurestore.features.registry import extractor_for_sets
from featurestore.io.atomic import tmp_path_for
from featurestore.io.storage import BucketStorage
from featurestore.io.verified import digest_written
from featurestore.pipelines.extract import (
    FLUSH_BYTES,
    ExtractPlan,
    ExtractSummary,
    Progress,
    Work,
    featurize_batches,
    plan_extract,
)
from featurestore.pipelines.ray_cluster import (
    Node,  # noqa: F401  (re-exported: callers size a cluster with cluster.Node, check_catalog, pool_size)
    alive_nodes,
    check_catalog,
    pool_size,
    ray_session,
)
from featurestore.shards import ShardBytes, read_shard_ids, remove_orphans, write_shard
from featurestore.store import Store, work_folder
from featurestore.training.evaluation import EvaluationResult, Split, check_inputs, collect, fit_and_score

# Tasks in flight per actor: one running, one queued behind it so the actor never waits for the driver.
INFLIGHT_PER_ACTOR = 2
# A killed worker is restarted (and its tasks retried) this many times before the job fails.
RETRIES = 3
# How long a stopped job waits for its killed actors' tasks to end before sweeping their files.
KILL_WAIT_S = 30.0
# Images per extraction task when not given: about 8 tasks per actor (so the last ones balance), within these bounds.
MIN_TASK_ROWS, MAX_TASK_ROWS = 8, 1024


# -- extraction: the actor ---------------------------------------------------------------------------
@dataclass
class SetRecord:
    """A feature set's catalog facts, as shipped to the workers (the registry's ``StoredSet``)."""

    name: str
    kind: str
    dim: int
    params: dict[str, Any]


@dataclass(frozen=True)
class Task:
    index: int
    images: list[tuple[int, str]]
    lacking: dict[str, list[int]]  # per feature set: the ids of this task's images that lack it


@dataclass
class TaskResult:
    task: int
    shards: dict[str, tuple[str, int]]  # feature set -> (shard path relative to the store, rows)
    failed: list[tuple[str, str]]
    processed: int
    node: str
    runtimes: dict[str, str | None] = field(default_factory=dict)  # feature set -> what computed it (CNN sets)


class Featurizer:
    """The work of one Ray actor: a job's extractors, built once, applied task after task.

    Runs inside a Ray worker process (``ray.remote(Featurizer)``); construction
    errors are kept and reported by :meth:`ready`, so the driver prints them as
    one line instead of a dead actor's traceback.
    """

    def __init__(self, settings: dict[str, Any], groups: list[list[SetRecord]], threads: int, batch_size: int,
                 probe: tuple[str, str], runtimes: list[str | None] | None = None):
        # Before any numerical library starts its thread pool (mxnet is imported when a CNN is built below).
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        self.node = _node_address()
        self.root = Path(settings["store"])
        # A store in a bucket: shards are written here, put to the bucket, and the local file dropped.
        self.bucket: BucketStorage | None = None
        if str(settings["store"]).startswith("s3://"):
            self.root = work_folder(Settings(**settings))
            self.bucket = BucketStorage(str(settings["store"]), Settings(**settings))
        self.max_pixels = int(settings["max_image_pixels"])
        self.max_bytes = int(float(settings["max_file_mb"]) * 1024 * 1024)
        self.batch_size = batch_size
        self.sets = {r.name: r for group in groups for r in group}
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.extractors: list[tuple[Extractor, list[str]]] = []
        self.error: str | None = None
        try:
            self._check_probe(*probe)
            self._build(settings, groups, runtimes or [None] * len(groups), threads)
        except FeatureStoreError as exc:
            self.error = f"on node {self.node}: {exc}"
        except Exception as exc:  # reported to the driver as one line
            self.error = f"on node {self.node}: {type(exc).__name__}: {exc}"

    def _build(self, settings: dict[str, Any], groups: list[list[SetRecord]], runtimes: list[str | None],
               threads: int) -> None:
        """Rebuild each group's extractor from the catalog, on the runtime the driver's extractor uses."""
        for group, runtime in zip(groups, runtimes, strict=True):
            with Store.open(Settings(**settings, workers=threads, cnn_runtime=runtime)) as store:
                ex = extractor_for_sets(store, group, self.batch_size)
            if ex.runtime != runtime:  # each shard records what computed it: it must be what the driver says
                raise ClusterError(f"the {', '.join(r.name for r in group)} extractor runs on {ex.runtime} here, "
                                   f"not on {runtime} as on the driver")
            self.extractors.append((ex, [r.name for r in group]))

    def _check_probe(self, path: str, token: str) -> None:
        if self.bucket is not None:  # the object the driver put (errors name FS_S3_ENDPOINT / AWS_* to fix)
            if self.bucket.get(path).decode() != token:
                raise ClusterError(f"the check object {self.bucket.url}{path} holds another token here")
            return
        try:
            seen = Path(path).read_text()
        except OSError:
            seen = None
        if seen != token:
            raise ClusterError(
                "the store folder {root} is not visible here (the check file {path} the driver wrote is missing); put "
                "the store on storage every node mounts at the same path (e.g. NFS) and pass that path as {store} / "
                "FS_STORE", params=("store",), root=self.root, path=path)

    def ready(self) -> str | None:
        """None when the extractors are built, else why not."""
        return self.error

    def run(self, task: Task) -> TaskResult:
        """Featurize the task's images and write one shard per feature set."""
        if self.error:
            raise ClusterError(self.error)
        work = [Work(ex, {name: set(task.lacking.get(name, ())) for name in names}) for ex, names in self.extractors]
        ids: dict[str, list[np.ndarray]] = {}
        vecs: dict[str, list[np.ndarray]] = {}
        failed: list[tuple[str, str]] = []
        processed = 0
        for out in featurize_batches(work, task.images, pool=self.pool, batch_size=self.batch_size,
                                     max_pixels=self.max_pixels, max_bytes=self.max_bytes):
            failed += [(path, f"{reason} (on node {self.node})") for path, reason in out.failed]
            processed += out.processed
            for name, part in out.ids.items():
                ids.setdefault(name, []).append(part)
                vecs.setdefault(name, []).append(out.vectors[name])
        shards = {}
        for name, parts in ids.items():
            rec = self.sets[name]
            path = write_shard(self.root / "features" / name, name, rec.kind, rec.params, np.concatenate(parts),
                               np.concatenate(vecs[name]))
            rel = path.relative_to(self.root).as_posix()
            if self.bucket is not None:  # straight to the bucket: no shared file system; the driver registers it
                try:
                    self.bucket.put(rel, path.read_bytes())
                finally:
                    path.unlink(missing_ok=True)
            shards[name] = (rel, sum(len(p) for p in parts))
        runtimes = {name: ex.runtime for ex, names in self.extractors for name in names}
        return TaskResult(task.index, shards, failed, processed, self.node, runtimes)


def _node_address() -> str:
    import ray

    return str(ray.util.get_node_ip_address()) if ray.is_initialized() else socket.gethostname()


# -- extraction: the driver ----------------------------------------------------------------------------
def cut_tasks(plan: ExtractPlan, actors: int, task_rows: int | None = None) -> list[Task]:
    """The images to featurize, in tasks of ``task_rows`` (default: about 8 per actor, 8..1024 images).

    A task's vectors stay under the local path's flush size (256 MB per task), so a
    worker's memory is bounded whatever the vector size.
    """
    n = len(plan.todo)
    rows = task_rows or min(MAX_TASK_ROWS, max(MIN_TASK_ROWS, math.ceil(n / (actors * 8))))
    per_image = sum(4 * fs.dim for fs in plan.sets.values()) or 1
    rows = max(1, min(rows, FLUSH_BYTES // per_image))
    lacking = {name: ids for w in plan.work for name, ids in w.lacking.items()}
    tasks = []
    for k, start in enumerate(range(0, n, rows)):
        images = plan.todo[start : start + rows]
        mine = {i for i, _ in images}
        tasks.append(Task(k, images, {name: sorted(mine & ids) for name, ids in lacking.items() if mine & ids}))
    return tasks


@dataclass
class Registrar:
    """The driver's side of a task: register its shards once, each image once per feature set."""

    store: Store
    plan: ExtractPlan
    summary: ExtractSummary
    done: set[int] = field(default_factory=set)
    have: dict[str, set[int]] = field(default_factory=dict)

    def accept(self, result: TaskResult, task: Task) -> None:
        if result.task in self.done:  # a duplicate answer: its files are orphans, swept at the end
            return
        self.done.add(result.task)
        shards = {}
        for name, (rel, rows) in result.shards.items():
            if self.store.bucket is not None:  # the object as the bucket holds it, read by the driver itself
                import hashlib

                data = self.store.bucket.get(rel)
                digest = hashlib.sha256(data).hexdigest()
                ids = read_shard_ids(ShardBytes(self.store.bucket.url + rel, data), digest)
            else:
                digest = digest_written(self.store.root / rel)  # the bytes registered are the bytes checked here
                ids = read_shard_ids(self.store.root / rel, digest)  # what the file holds, read by the driver
            if len(ids) != rows or not set(ids.tolist()) <= set(task.lacking.get(name, ())):
                raise IntegrityError(f"shard {rel} written by node {result.node} does not hold the images of "
                                     f"task {task.index}", remedy="extract-again", path=rel)
            shards[name] = (rel, ids, digest)
        # Tasks are disjoint, so only a replayed task can hold images already registered (then all of them).
        if any(self.have.get(name, set()).intersection(ids.tolist()) for name, (_, ids, _) in shards.items()):
            return
        self.summary.failed += result.failed
        self.summary.processed += result.processed
        for name, (rel, ids, digest) in shards.items():
            # What the worker says computed it (the driver's runtime: the workers are built with it).
            self.store.catalog.register_shard(self.plan.sets[name].id, rel, ids, runtime=result.runtimes.get(name),
                                              sha256=digest)
            self.have.setdefault(name, set()).update(ids.tolist())
            self.summary.written[name] = self.summary.written.get(name, 0) + len(ids)


class _Pool:
    """The actors of one extraction job and the loop that keeps them busy."""

    def __init__(self, ray: Any, store: Store, plan: ExtractPlan, size: int, threads: int, batch_size: int,
                 probe: tuple[str, str]):
        self.ray = ray
        s = store.settings
        settings = {"store": store.url or str(store.root.resolve()), "database_url": s.database_url,
                    "max_image_pixels": s.max_image_pixels, "max_file_mb": s.max_file_mb}
        if store.url:  # the workers reach the same bucket the same way
            settings.update({"s3_endpoint": s.s3_endpoint, "s3_timeout": s.s3_timeout, "AWS_REGION": s.aws_region,
                             "AWS_ACCESS_KEY_ID": s.aws_access_key_id,
                             "AWS_SECRET_ACCESS_KEY": s.aws_secret_access_key})
        groups = [[_record(plan.sets[name]) for name in w.lacking] for w in plan.work]
        actor = ray.remote(Featurizer).options(num_cpus=threads, max_restarts=RETRIES, max_task_retries=RETRIES,
                                               scheduling_strategy="SPREAD")
        runtimes = [w.extractor.runtime for w in plan.work]  # recorded per shard (plan.runtimes): use the same
        self.actors = [actor.remote(settings, groups, threads, batch_size, probe, runtimes) for _ in range(size)]
        self.inflight: dict[Any, tuple[int, Task]] = {}  # task ref -> (actor index, task)

    def check(self) -> None:
        try:
            errors = self.ray.get([a.ready.remote() for a in self.actors])
        except self.ray.exceptions.RayError as exc:
            raise ClusterError(
                f"the workers could not start on the Ray cluster ({_last_error_line(exc)}); every node needs the same "
                "featurestore and Ray versions: pip install 'featurestore[ray]'"
            ) from None
        for error in errors:
            if error:
                raise ClusterError(error)

    def run(self, tasks: Sequence[Task], accept: Callable[[TaskResult, Task], None],
            progress: Progress | None) -> None:
        queue = deque(tasks)
        inflight = self.inflight

        def submit(k: int) -> None:
            task = queue.popleft()
            inflight[self.actors[k].run.remote(task)] = (k, task)

        for k in range(len(self.actors)):
            for _ in range(INFLIGHT_PER_ACTOR):
                if queue:
                    submit(k)
        total = sum(len(t.images) for t in tasks)
        done = 0
        while inflight:
            ready, _ = self.ray.wait(list(inflight), num_returns=1)
            k, task = inflight.pop(ready[0])
            accept(_result(self.ray, ready[0]), task)
            done += len(task.images)
            if progress:
                progress(done, total)
            if queue:
                submit(k)

    def kill(self) -> None:
        """Kill the actors and wait (at most KILL_WAIT_S) until their tasks in flight have ended.

        ``ray.kill`` returns before the processes are gone: a task still writing its shard would
        leave its temp file behind the orphan sweep that follows. A task's result resolves (to
        an actor-died error) once its actor is dead.
        """
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        if self.inflight:
            self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=KILL_WAIT_S)


def _record(fs: Any) -> SetRecord:
    return SetRecord(fs.name, fs.kind, fs.dim, dict(fs.params))


def _result(ray: Any, ref: Any) -> Any:
    """``ray.get(ref)``, with a failure turned into a one-line error (the worker's own error if it is ours)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, FeatureStoreError):
            raise cause from None
        raise ClusterError(f"a task failed on the Ray cluster: {_first_line(cause or exc)}") from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(f"the Ray cluster lost a worker for good ({_first_line(exc)}); after {RETRIES} "
                           "restarts the job stops: see `ray status`, then run the command again "
                           "(what was registered is kept)") from None


def _last_error_line(exc: BaseException) -> str:
    """The innermost error of a remote traceback ("ModuleNotFoundError: ..."), else the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return errors[-1] if errors else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _store_probe(store: Store, plan: ExtractPlan) -> Iterator[tuple[str, str]]:
    """A file the workers must be able to read to prove they see the store folder (removed afterwards).

    It has a temp name inside a feature set's folder, so if the driver dies the
    next writer's orphan sweep removes it.
    """
    token = uuid.uuid4().hex
    if store.bucket is not None:  # an object the workers read from the bucket; a temp name the sweep removes
        key = f"features/{next(iter(plan.sets))}/{tmp_path_for(Path('ray-check')).name}"
        store.bucket.put(key, token.encode())
        try:
            yield key, token
        finally:
            store.bucket.delete(key)
        return
    folder = store.root.resolve() / "features" / next(iter(plan.sets))
    folder.mkdir(parents=True, exist_ok=True)
    path = tmp_path_for(folder / "ray-check")
    path.write_text(token)
    try:
        yield str(path), token
    finally:
        path.unlink(missing_ok=True)


def sweep_orphans(store: Store, plan: ExtractPlan) -> None:
    """Remove the shards written by tasks that were replayed or cancelled (never registered). Under the lock."""
    registered = store.catalog.shard_paths()
    if store.bucket is not None:  # under the lock, after the job's actors are gone: no grace needed
        store.remove_orphan_objects([f"features/{name}/" for name in plan.sets], grace=0.0)
        return
    for name in plan.sets:
        remove_orphans(store.root / "features" / name, registered)


def extract_on_ray(
    store: Store,
    extractors: list[Extractor],
    *,
    address: str,
    replace: bool = False,
    dataset: str | None = None,
    image_ids: list[int] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    threads: int = 1,
    task_rows: int | None = None,
    progress: Progress | None = None,
) -> ExtractSummary:
    """:func:`~featurestore.pipelines.extract.extract` on a Ray cluster. Call under ``store.writing()``.

    Parameters
    ----------
    address : str
        ``"local"``, ``"auto"`` or the head's ``HOST:PORT`` (see the module docstring).
    workers : int, optional
        Actors to start (default: as many as the nodes' CPUs hold at ``threads`` each).
    threads : int
        CPUs each actor reserves on its node: its decode threads and its
        numerical libraries' threads.
    task_rows : int, optional
        Images per task, i.e. per shard written (default: about 8 tasks per actor).
    """
    for value, param in ((batch_size, "batch_size"), (threads, "ray_threads"), (workers or 1, "ray_workers"),
                         (task_rows or 1, "task_rows")):
        if value < 1:
            raise InvalidParameterError(f"{{{param}}} must be at least 1", param, value=value)
    summary = ExtractSummary()
    start = time.perf_counter()
    with ray_session(address) as ray:
        nodes = alive_nodes(ray)
        check_catalog(store.settings, nodes)  # before anything is registered
        size = pool_size(nodes, threads, workers)
        plan = plan_extract(store, extractors, replace=replace, dataset=dataset, image_ids=image_ids,
                            summary=summary)
        if not plan.todo:
            return summary
        tasks = cut_tasks(plan, size, task_rows)
        registrar = Registrar(store, plan, summary)
        with _store_probe(store, plan) as probe:
            pool = _Pool(ray, store, plan, min(size, len(tasks)), threads, batch_size, probe)
            try:
                pool.check()
                pool.run(tasks, registrar.accept, progress)
            finally:
                pool.kill()
                sweep_orphans(store, plan)
    summary.seconds = time.perf_counter() - start
    return summary


# -- evaluation -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalJob:
    """One feature combination to evaluate: a fresh-estimator factory and its columns of the matrix."""

    make_estimator: Callable[[], Any]
    columns: np.ndarray | None = None


def fit_split(job: EvalJob, X: np.ndarray, y: np.ndarray, split: Split, index: int,
              superclass_of: dict[Any, Any] | None, threads: int) -> Any:
    """One (combination, split) task: the local path's :func:`fit_and_score` on the job's columns."""
    if job.columns is not None:
        X = X[:, job.columns]
    X, y, to_super = check_inputs(X, y, [split], superclass_of)
    estimator = job.make_estimator()
    if "n_jobs" in estimator.get_params():  # the task's CPUs, not the node's; results do not depend on it
        estimator.set_params(n_jobs=threads)
    return fit_and_score(estimator, X, y, split[0], split[1], index, to_super)


def evaluate_on_ray(jobs: Sequence[EvalJob], X: np.ndarray, y: np.ndarray, splits: Sequence[Split],
                    superclass_of: dict[Any, Any] | None, *, address: str,
                    progress: Progress | None = None) -> list[EvaluationResult]:
    """Evaluate every job on every split, one Ray task each, all in parallel; results in ``jobs`` order.

    ``X`` and ``y`` are put into the object store once and shared by all tasks.
    """
    X, y, _ = check_inputs(X, y, splits, superclass_of)
    total = len(jobs) * len(splits)
    with ray_session(address) as ray:
        nodes = alive_nodes(ray)
        cpus = sum(n.cpus for n in nodes)
        threads = max(1, min(min((n.cpus for n in nodes if n.cpus), default=1), cpus // max(total, 1)))
        task = ray.remote(fit_split).options(num_cpus=threads, max_retries=RETRIES)
        X_ref, y_ref = ray.put(X), ray.put(y)
        refs = {task.remote(job, X_ref, y_ref, split, i, superclass_of, threads): j
                for j, job in enumerate(jobs) for i, split in enumerate(splits)}
        records: list[list[Any]] = [[] for _ in jobs]
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                records[refs[ready[0]]].append(_result(ray, ready[0]))
                if progress:
                    progress(total - len(pending), total)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    return [collect(r) for r in records]
