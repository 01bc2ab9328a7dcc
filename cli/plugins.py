"""``fs plugins``: the plugins loaded (built-ins and those installed with pip) and where they come from."""

from __future__ import annotations

from typing import Any

import typer

from featurestore.cli import common
from featurestore.plugins import hookimpl

COLUMNS = ["name", "hooks", "provides", "module", "distribution", "version", "error"]


def plugins_command(
    fmt: common.Format = typer.Option(common.Format.table, "--format", "-f", help="Output format (table or json)."),
) -> None:
    """List the plugins loaded: built-ins and packages installed with an entry point in the group `featurestore`.

    Each row gives the plugin's name, the hooks it implements, what it registers
    (feature kinds, CNN runtimes, index backends), its module and the
    distribution (with version) that installed it. A plugin that failed to import
    is listed with its error and not used.

    Example: pip install examples/plugins/featurestore-colour-moments && fs plugins --format json
    """
    from featurestore import plugins

    listed = fmt == common.Format.json
    rows = [{"name": p.name, "hooks": list(p.hooks) if listed else ", ".join(p.hooks),
             "provides": list(p.provides) if listed else ", ".join(p.provides),
             "module": p.module, "distribution": p.distribution, "version": p.version, "error": p.error}
            for p in plugins.plugins()]
    cols = COLUMNS if any(r["error"] for r in rows) or listed else COLUMNS[:-1]
    common.emit(rows, fmt, cols)


@hookimpl
def register_commands(cli: Any) -> None:
    cli.command("plugins")(plugins_command)
