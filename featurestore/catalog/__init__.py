"""The SQL catalog: every statement featurestore runs on its own tables.

Layout: ``schema`` (ORM tables), ``database`` (engines, Alembic), one module per aggregate (``images``
with datasets, ``feature_sets`` with shards, ``versions``, ``indexes``, ``models``, ``runs``,
``run_images``, ``run_notes``, ``run_outcomes``, ``browse``, ``labels``, ``audits``, ``exports``) and
``repository``, whose :class:`~featurestore.catalog.repository.Catalog` composes them. User-written SQL
is checked by ``readonly_rules`` and run by ``readonly`` on a separate read-only connection.

One style: each aggregate is a class derived from :class:`~featurestore.catalog.common.Repository`.
Its methods use ``self.engine`` and run their own short transaction, or join the caller's transaction
when passed its ``Session`` as ``s``; rows come back as plain values or frozen dataclasses. One way in:
code outside this package reaches SQL only through ``store.catalog`` (a ``Catalog``), never through
module functions or ``store.engine``.
"""
