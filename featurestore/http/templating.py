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


CONFUSION_SOURCE = (
    "Computed from this run's stored predictions (the predictions table, written by `fs predict --run {id}`) "
    "joined with the images' catalogue {truth}s, not from the run's evaluation splits."
)
TEST_SOURCE = (
    "Computed from the predictions this run made of its test dataset {test} when it was evaluated (never trained "
    "on), joined with the images' catalogue {truth}s."
)


def source_parts(view: Any) -> list[tuple[str, bool]]:
    """Where a run view's confusion matrix comes from, as (text, is_code) parts (commands shown as code)."""
    if view.source_kind == "test":
        text = TEST_SOURCE.format(test=view.run.test_dataset, truth=view.truth)
    else:
        text = CONFUSION_SOURCE.format(id=view.run.id, truth=view.truth)
    return [(p, i % 2 == 1) for i, p in enumerate(text.split("`")) if p]


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("featurestore.http", "templates"),
                      autoescape=select_autoescape(["html"], default_for_string=True, default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = pct
    env.filters["when"] = when
    env.filters["source_parts"] = source_parts
    return env


ENV = _environment()


def render(name: str, **context: Any) -> str:
    """Render one template with ``context``."""
    return ENV.get_template(name).render(**context)
