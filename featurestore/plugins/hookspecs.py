"""The hooks a featurestore plugin may implement (pluggy hook specifications).

Each hook hands the plugin a ``register`` callable (or the CLI app) and the
plugin calls it once per thing it adds, the way ``llm`` and ``sqlite-utils``
plugins do. The built-in feature kinds, CNN runtimes and index backends are
registered through these same hooks (:mod:`featurestore.plugins.feature_kinds`,
:mod:`featurestore.plugins.cnn_runtimes`, :mod:`featurestore.plugins.index_backends`).

A plugin module is imported when the ``fs`` command starts (``fs --help``
included), so it should import its heavy libraries inside its hook
implementations or in the callables it registers, not at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("featurestore")


@hookspec
def register_feature_kinds(register: Callable[[Any], None]) -> None:
    """Register feature kinds: call ``register(FeatureKind(...))`` for each.

    A :class:`featurestore.features.registry.FeatureKind` names the kind (the
    catalog's ``kind`` column and the ``fs extract --feature KIND`` argument),
    its :class:`~featurestore.features.base.Extractor` class, ``create`` (a new
    extractor from the user's ``key=value`` options), ``build`` (the extractor of
    a stored set, from its recorded params) and ``command`` (the ``fs extract``
    command that computes a set, for messages). The extractor's ``outputs()``
    give each set's name, dims and params.
    """


@hookspec
def register_cnn_runtimes(register: Callable[[Any], None]) -> None:
    """Register CNN runtimes: call ``register(CNNRuntime(...))`` for each.

    A :class:`featurestore.features.cnn.registry.CNNRuntime` names the runtime
    (``fs extract --runtime NAME``, ``FS_CNN_RUNTIME``) and gives ``load``, which
    returns a model with the ``TapModel`` interface of
    :mod:`featurestore.features.cnn.mxnet_backend` and the model's catalog row.
    """


@hookspec
def register_index_backends(register: Callable[[Any], None]) -> None:
    """Register approximate nearest-neighbour index backends: ``register(IndexBackend(...))`` for each.

    A :class:`featurestore.search.backends.IndexBackend` names the library its
    index records carry (``params["library"]``) and gives the functions that
    build, search, list and drop its indexes.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``fs`` CLI: ``cli`` is its Typer app (``cli.command()(fn)``, ``cli.add_typer(...)``)."""
