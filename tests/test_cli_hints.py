"""Library errors state facts; `cli/hints.py` words the `fs` command or flag to run next.

A scan of every string literal in ``featurestore/`` (docstrings and comments
aside) fails when one names an ``fs`` command or a ``--flag``, so CLI wording
cannot creep back into the library; the allow-list below says why each
exception stands.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import featurestore
from featurestore.cli import hints
from featurestore.cli.main import app
from featurestore.errors import (
    FeatureStoreError,
    ImageNotFoundError,
    InvalidParameterError,
    MissingFeaturesError,
    NotFoundError,
    ParamsMismatchError,
)
from featurestore.pipelines.train import TrainConfig

PACKAGE = Path(featurestore.__file__).parent
CLI_WORDING = re.compile(r"(?<![\w-])(fs [a-z]|--[a-z][a-z0-9-]+)")

# Whole files or folders whose strings may name `fs` commands and flags.
ALLOWED_FILES = {
    # The HTTP service is a front end like cli/: its messages address the person running `fs serve`
    # (--allow-writes, --port, --allowed-host) and its pages tell the reader which command wrote what.
    "http/",
}
# Single strings, by file and text: flags of other programs, and the feature kinds' own `fs extract` spelling.
ALLOWED_STRINGS = {
    ("pipelines/ray_cluster.py", "`ray start --head`"),  # Ray's command, not ours
    ("features/cnn/efficientnet.py", "pip install --force-reinstall"),
    ("io/fashion_mnist.py", "apt-get install --reinstall"),
    # The built-in feature kinds' `command` (hook register_feature_kinds): how each kind is extracted again,
    # worded by the kind itself as a plugin's kind does; cli/hints.extract_command calls it.
    ("plugins/feature_kinds.py", "fs extract --rp "),
    ("plugins/feature_kinds.py", "fs extract --pixels {}x{}"),
    ("plugins/feature_kinds.py", "fs extract --lowlevel"),
    # The label of a user's SQL condition in its error messages, by default the flag that gives it.
    ("catalog/readonly.py", "--where"),
    ("catalog/readonly_rules.py", "--where"),
    ("features/cnn/views.py", "fs extract --model"),
    ("features/cnn/views.py", "--layers"),
    ("features/cnn/views.py", "--resize"),
    ("features/cnn/views.py", "--grid"),
    ("features/cnn/views.py", "--tta"),
    ("features/cnn/views.py", "--precision"),
    # pipelines.compare.labels_note: a note printed beside `fs compare`, pinned word for word by its test.
    ("pipelines/compare.py", ", see `fs labels history`)"),
}


def _documentation(tree: ast.AST) -> set[int]:
    """ids of the string constants that are statements of their own: docstrings and attribute docstrings."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def cli_wording(root: Path) -> list[tuple[str, int, str]]:
    """(path under root, line, string) of every non-documentation string literal naming `fs ...` or a --flag."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _documentation(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and CLI_WORDING.search(node.value)):
                found.append((rel, node.lineno, node.value))
    return sorted(found)


def _allowed(rel: str, text: str) -> bool:
    return (any(rel == f or (f.endswith("/") and rel.startswith(f)) for f in ALLOWED_FILES)
            or any(rel == f and allowed in text for f, allowed in ALLOWED_STRINGS))


def test_library_strings_name_no_fs_command_or_flag() -> None:
    offenders = [f"{rel}:{line}: {text[:100]!r}" for rel, line, text in cli_wording(PACKAGE)
                 if not _allowed(rel, text)]
    assert offenders == [], "raise an error with facts and a remedy key, word it in cli/hints.py:\n" + \
        "\n".join(offenders)


def test_the_scan_sees_cli_wording(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text('"""Run `fs extract --rp 8` (docs may say it)."""\n'
                                     'X = 1\n"""An attribute docstring naming --flags is documentation too."""\n'
                                     'def f():\n    raise ValueError("run `fs verify` first")\n'
                                     'MSG = f"pass --replace to redo {X}"\nOK = "a -- b, fs-ok, --"\n')
    assert [(line, text) for _, line, text in cli_wording(tmp_path)] == [
        (5, "run `fs verify` first"), (6, "pass --replace to redo ")]


def test_allow_list_has_no_stale_entries() -> None:
    found = cli_wording(PACKAGE)
    for f in ALLOWED_FILES:
        assert (PACKAGE / f).exists(), f
    for f, text in ALLOWED_STRINGS:
        assert any(rel == f and text in s for rel, _, s in found), (f, text)


def _remedy_keys(root: Path) -> set[str]:
    keys = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "remedy" and isinstance(node.value, ast.Constant):
                keys.add(node.value.value)
            if isinstance(node, ast.arguments):  # a default: def __init__(..., remedy="extract-first")
                named = [*node.posonlyargs, *node.args][-len(node.defaults):] if node.defaults else []
                for arg, default in [*zip(named, node.defaults, strict=True),
                                     *zip(node.kwonlyargs, node.kw_defaults, strict=True)]:
                    if arg.arg == "remedy" and isinstance(default, ast.Constant):
                        keys.add(default.value)
    return keys - {""}


def test_every_remedy_the_library_names_is_worded() -> None:
    used = _remedy_keys(PACKAGE)
    assert used, "the scan found no remedy keys"
    assert sorted(used - set(hints.REMEDIES)) == []
    assert sorted(set(hints.REMEDIES) - used) == []  # no wording left for a remedy nothing raises


def test_parameters_read_as_python_names_in_the_library_and_as_flags_in_the_cli() -> None:
    exc = InvalidParameterError("{folds} and {test_dataset} exclude each other (got {value})", "folds",
                                "test_dataset", value="{not a field}")
    assert str(exc) == "folds and test_dataset exclude each other (got {not a field})"
    assert hints.message(exc) == "--folds and --test-dataset exclude each other (got {not a field})"
    assert exc.value == "{not a field}" and exc.params == ("folds", "test_dataset")
    assert hints.flag("n_splits") == "--splits" and hints.flag("feature_set") == "--features"


@pytest.mark.parametrize(("exc", "library", "cli"), [
    (MissingFeaturesError("rp8", 7, "fs extract --rp 8"), "7 image(s) lack rp8",
     "7 image(s) lack rp8: run `fs extract --rp 8` (or pass --skip-missing)"),
    (ParamsMismatchError("rp8", {"seed": 0}, {"seed": 1}),
     "feature set 'rp8' already exists with different parameters (seed: stored 0 vs requested 1)",
     "feature set 'rp8' already exists with different parameters (seed: stored 0 vs requested 1); choose a new "
     "name or pass --replace to drop and recompute it"),
    (ImageNotFoundError(5, 2, remedy="find-ids"), "no image with id 5 in the catalog; 2 of the ids given do not exist",
     'no image with id 5 in the catalog; 2 of the ids given do not exist; find ids with '
     '`fs sql "SELECT id, source_path, label FROM images"`'),
    (NotFoundError("run", "9", ["1"], remedy="see-runs"), "unknown run '9'; available: 1",
     "unknown run '9'; available: 1. See `fs runs`"),
    (FeatureStoreError("plain facts"), "plain facts", "plain facts"),
])
def test_the_cli_line_is_the_facts_then_the_step(exc: FeatureStoreError, library: str, cli: str) -> None:
    assert str(exc) == library
    assert hints.message(exc) == cli


def test_train_flags_are_worded_as_before(tmp_path: Path) -> None:
    # The CLI's wording is unchanged: the library's check names parameters, `fs train` prints their flags.
    cfg = TrainConfig(["a"], folds=5, test_dataset="t")
    with pytest.raises(InvalidParameterError) as info:
        cfg.check()
    assert str(info.value).startswith("folds and test_dataset exclude each other")
    result = CliRunner().invoke(app, ["--store", str(tmp_path / ".fs"), "train", "--features", "a", "--folds",
                                      "5", "--test-dataset", "t"])
    assert result.exit_code == 2, result.output
    assert "--folds and --test-dataset exclude each other" in result.output


def test_unknown_remedy_keeps_the_facts() -> None:
    assert hints.message(FeatureStoreError("facts only", remedy="no-such-step")) == "facts only"
