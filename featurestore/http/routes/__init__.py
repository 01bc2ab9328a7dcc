"""One ``APIRouter`` per resource (``router`` in each module), included by :func:`featurestore.http.app.create_app`.

A route is a module-level function taking its dependencies as ``Annotated``
types from :mod:`featurestore.http.deps` (``store: StoreDep``); a router that
needs the token declares ``dependencies=[Authenticated]`` itself, so it is
guarded wherever it is included. A new module is one more
``app.include_router(module.router)`` line in ``create_app``.
"""
