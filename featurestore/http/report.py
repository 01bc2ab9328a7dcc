"""``fs report``: a run's report as one self-contained HTML file, to share.

The file holds everything it shows: the charts are inline SVG, the stylesheet is
inline, and the thumbnails of the most confident mistakes are embedded as
``data:`` JPEGs. It makes no request of any kind (its Content Security Policy
forbids them) and names no server path, so it can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from importlib import resources

from featurestore import __version__
from featurestore.errors import FeatureStoreError
from featurestore.http import charts
from featurestore.http.templating import render
from featurestore.io.thumbnails import thumbnail
from featurestore.pipelines.run_view import run_view
from featurestore.store import Store

REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
MISSING = "data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=="  # 1x1 white


def _thumbnail_uri(store: Store, image_id: int, size: int = 128) -> str:
    found = store.catalog.image_file(image_id)
    if found is None:
        return MISSING
    try:
        jpeg = thumbnail(store.root, found.source_path, found.sha256, found.bytes, size,
                         store.settings.max_image_pixels, store.files.bucket)
    except (FeatureStoreError, OSError):
        return MISSING  # the file is gone or changed: the report still shows the labels
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def render_report(store: Store, run_id: int, held_out_only: bool = False, mistakes: int = 12) -> str:
    """The HTML of run ``run_id``'s report (see the module docstring).

    Raises
    ------
    NotFoundError
        No such run.
    """
    view = run_view(store, run_id, held_out_only=held_out_only, mistakes=mistakes)
    thumbs = {m.image_id: _thumbnail_uri(store, m.image_id) for m in view.mistakes}
    css = (resources.files("featurestore.http") / "static" / "app.css").read_text(encoding="utf-8")
    return render(
        "report.html", view=view, css=css, csp=REPORT_CSP, version=__version__,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), links=False, wrong_url=None,
        mistake_src=thumbs.__getitem__,
        split_chart=charts.split_bars([("test accuracy", [s.test_accuracy for s in view.splits])],
                                      f"run {run_id}: test accuracy per split"),
        matrix=charts.confusion_matrix(view.confusion), scores_chart=charts.class_scores(view.confusion.per_class()),
    )
