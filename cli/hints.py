"""The one place that words the library's errors for the ``fs`` command line.

The library's errors state facts (the file, the set, the value, what is
missing) and name the next step by a key (``FeatureStoreError.remedy``). Here
each key becomes the `fs` command or flag a person runs next, and each
parameter an error's message names becomes its ``--flag``: the line printed
after ``Error:`` reads as it always has, while the Python API and the HTTP
service keep the neutral message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from featurestore.errors import FeatureStoreError

# Parameters whose flag is not ``--`` + the name with dashes.
FLAGS: dict[str, str] = {
    "feature_set": "--features",
    "batch_size": "--batch",
    "n_splits": "--splits",
    "ray_address": "--ray",
    "image_id": "--id",
    "feature_sets": "--features",
}


def flag(param: str) -> str:
    """The ``fs`` option for a Python parameter name (``test_dataset`` -> ``--test-dataset``)."""
    return FLAGS.get(param) or "--" + param.replace("_", "-")


class Line(str):
    """A remedy template for the whole line, where the step belongs inside the sentence."""


def extract_command(fs: Any) -> str:
    """The ``fs extract`` command that computes the stored feature set ``fs`` (its catalog row or handle).

    Each feature kind words its own command (the ``command`` of its registration, hook
    ``register_feature_kinds``); a kind that does not is ``fs extract``.
    """
    from featurestore.features.registry import feature_kinds  # the feature kinds: only when a hint is worded

    kind = feature_kinds().get(fs.kind)
    return kind.command(fs.name, dict(fs.params or {}), fs.dim) if kind else "fs extract"


def _stored_command(exc: Any) -> str:
    """The `fs extract` line for the set an error names (its catalog row, or the command it was given)."""
    if getattr(exc, "command", ""):
        return str(exc.command)
    if getattr(exc, "stored", None) is not None:
        return extract_command(exc.stored)
    return "fs extract"


FIND_IDS = 'fs sql "SELECT id, source_path, label FROM images"'

Remedy = str | Callable[[Any], str]

# Remedy key -> what follows the facts on the error line: a str.format template over the error's attributes,
# or a function of the error; it starts with its own separator ("; ", ": ", ". "). A Line is the whole line.
REMEDIES: dict[str, Remedy] = {
    # errors.py
    "replace-set": "; choose a new name or pass --replace to drop and recompute it",
    "extract-missing": lambda e: f": run `{_stored_command(e)}` (or pass --skip-missing)",
    "extract-first": lambda e: f": run `{_stored_command(e)}` first",
    "extract-first-or-image": lambda e: f": run `{_stored_command(e)}` first, or search with --image PATH",
    "catalog-corrupt": "; move it aside (mv {path} {path}.bad) and restore it from a backup, or point --store/FS_STORE "
                       "at another store",
    "find-ids": f"; find ids with `{FIND_IDS}`",
    "list-ids": f"; list ids with `{FIND_IDS}`",
    # catalog
    "catalog-unreachable": "; check FS_DATABASE_URL / --store and that the database server is running and reachable",
    "not-a-catalog": "; point FS_DATABASE_URL/--store at an empty database or a featurestore catalog",
    "empty-catalog": ": run `fs ingest PATH` (or `fs db upgrade`) first",
    "db-upgrade": ": run `fs db upgrade`",
    "or-labels-set": " (or set the label you want with `fs labels set`)",
    "see-labels-history": "; see `fs labels history`",
    "see-runs": ". See `fs runs`",
    "create-set": ". Create it with `fs extract` (see `fs extract --help`)",
    "see-datasets": " (see `fs datasets list`)",
    "see-versions": " (see `fs versions {feature_set}`)",
    "ingest-first-or-store": ": run `fs ingest PATH` first, or pass --store",
    "sql-reads-sqlite": ", which `fs sql` already opens read-only",
    "db-upgrade-first": ": run `fs db upgrade` first",
    # pipelines
    "extract-cnn": " (or extract one with `fs extract --model efficientnet-lite0`)",
    "extract-what": Line("nothing to extract: give --rp K, --pixels WxH, --lowlevel or --model NAME"),
    "evaluate-folds": "; audit a run evaluated with --folds, e.g. `fs evaluate --features ... --folds 5`",
    "new-label": "; pass --new-label to create it",
    "select-images": ": give --id N (repeatable) or a --where condition that matches",
    "labels-set-instead": ", set the right label with `fs labels set`",
    "ingest-labelled": "; ingest labelled images (folders superclass/class/*.jpg) and run `fs extract`",
    "ingest-both": "; ingest labelled images into both datasets and run `fs extract`",
    "evaluate-test-dataset": " (`fs evaluate --test-dataset ...`)",
    "evaluate-both": "; evaluate both with `fs evaluate --features ... --features ...` or the same --seed/--splits on "
                     "the same images",
    "evaluate-again": " (`fs evaluate --test-dataset ...`)",
    "retrain": "; retrain with `fs train --features {features}`",
    "db-upgrade-and": " and run `fs db upgrade`",
    "extract-again": "; run `fs extract` again",
    "extract-rp-replace": ": run `fs extract --rp {k} --replace` to recompute all",
    "recompute-it": "; recompute it with `fs extract ... --replace`",
    "recompute-them": "; recompute them with `fs extract ... --replace`",
    "recompute-the-set": "; recompute the feature set with `fs extract ... --replace`",
    "recompute-set": "; recompute the set with `fs extract ... --replace`",
    "models-show": " (`fs models show`)",
    "models-add-onnx": " with `fs models add NAME --onnx FILE`",
    "re-ingest": "; re-ingest it with `fs ingest`",
    "retrain-newest": " with `fs train --features {features}`",
    "deleted-by-gc": " (`fs gc --force`); retrain with `fs train --features {features}`",
    "train-final": Line("run {run_id} has no final model (it came from `fs evaluate`); train one with "
                        "`fs train --features {features}`"),
    # store and files
    "create-store": ": run `fs ingest PATH` to create one, or pass --store/FS_STORE",
    "another-store": "; pass another --store",
    "run-verify": "; run `fs verify`",
    # search indexes
    "index-build": ": build one with `fs index build --features {feature_set}`",
    "extract-them-first": ": extract them first (`fs extract`)",
    "index-rebuild": "; rebuild it with `fs index build --features {feature_set} --rebuild`",
    "index-rebuild-or-drop": "; rebuild it with `fs index build --features {feature_set} --rebuild` or remove it "
                             "with `fs index drop {feature_set}`",
    "rebuild-flag": "; rebuild it with --rebuild",
    # CNN models
    "models-add": ". Register a checkpoint with `fs models add NAME ...`",
    "models-add-it": ": run `fs models add {model} ...`",
    "models-add-status": ": run `fs models add`",
    "models-add-files": ": run `fs models add {model} --symbol {symbol_file} --params {params_file}`",
    "models-add-replace": ": run `fs models add {model} ... --replace`",
    "restore-or-models-add": ": restore it or run `fs models add {model} ... --replace`",
    "replace-model": "; pass --replace to swap its files",
    "use-mxnet": "; use the mxnet runtime (`fs extract --runtime mxnet`; FS_CNN_RUNTIME=mxnet for search, predict "
                 "and serve)",
    "recompute-int8": ": recompute the int8 sets with `fs extract --model {model} --precision int8 --replace`",
    "restore-or-recompute-int8": ": restore it or run `fs extract --model {model} --precision int8 --replace`",
    "index-or-budget": ": build an index with `fs index build --features {feature_set}` (memory bounded), or raise "
                       "FS_SEARCH_MEMORY_MB",
    # shards and files
    "verify-shards": "; run `fs verify` to list the damaged shards and repair the catalog",
}


def step(remedy: str, **facts: Any) -> str:
    """The words of a remedy key that is not an error's (a status column), filled with ``facts``."""
    worded = REMEDIES[remedy]
    assert isinstance(worded, str), remedy  # a function of an error words errors only
    return worded.format_map(facts)


def message(exc: FeatureStoreError) -> str:
    """The one line ``fs`` prints after ``Error:`` for a library error: its facts, then the next step."""
    text = exc.worded(flag)
    remedy = REMEDIES.get(exc.remedy) if exc.remedy else None
    if remedy is None:
        return text
    if callable(remedy):
        return text + remedy(exc)
    worded = remedy.format_map(vars(exc))
    return worded if isinstance(remedy, Line) else text + worded
