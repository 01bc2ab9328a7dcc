"""Jinja2 templates of the web app and of ``fs report`` (shipped in ``featurestore/http/templates``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


def pct(value: float | None, digits: int = 1) -> str:
    """0.8567 -> '85.7%'; None -> an en dash."""
    return "\u2013" if value is None else f"{100 * value:.{digits}f}%"


def when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("featurestore.http", "templates"),
                      autoescape=select_autoescape(["html"], default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = pct
    env.filters["when"] = when
    return env


ENV = _environment()


def render(name: str, **context: Any) -> str:
    """Render one template with ``context``."""
    return ENV.get_template(name).render(**context)
