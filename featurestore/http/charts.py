"""Charts as inline SVG, drawn on the server (no JavaScript chart library, nothing fetched).

Each function returns :class:`markupsafe.Markup` to put straight into a page or
into a report file. Every text that comes from the catalog is escaped. No
``xmlns`` attribute is written: inline SVG in HTML does not need it, and it keeps
report files free of any URL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from markupsafe import Markup, escape

from featurestore.training.confusion import ClassScores, Confusion

PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    "#1f77b4", "#aec7e8", "#ff7f0e", "#98df8a", "#d62728", "#9467bd", "#c5b0d5", "#8c564b", "#e377c2", "#17becf",
)
OTHER = "#9a9a9a"
CORRECT, WRONG = "#2e8b57", "#d1495b"
SERIES = ("#4e79a7", "#f28e2b")


def _f(x: float) -> str:
    return f"{x:.1f}"


def _svg(width: float, height: float, body: list[str], label: str, cls: str = "chart") -> Markup:
    return Markup(f'<svg class="{cls}" viewBox="0 0 {_f(width)} {_f(height)}" width="{_f(width)}" '
                  f'height="{_f(height)}" role="img" aria-label="{escape(label)}">' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: object, anchor: str = "middle", cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{c}{extra}>{escape(str(text))}</text>'


def split_bars(series: Sequence[tuple[str, Sequence[float]]], title: str, width: int = 640,
               height: int = 240) -> Markup:
    """Grouped bars of per-split accuracy (one group per split, one bar per series), with each series' mean.

    The y axis starts a little below the lowest value, so small differences between runs stay visible;
    its range is written on the axis. Each series' mean is a dashed line; the legend above the plot names
    the series and their means (so the labels never sit on top of each other, however close the means).
    """
    values = [v for _, vals in series for v in vals]
    if not values:
        return _svg(width, 40, [_text(width / 2, 24, "no per-split scores")], title)
    lo = max(0.0, np.floor((min(values) - 0.02) * 20) / 20)
    hi = min(1.0, max(lo + 0.05, np.ceil((max(values) + 0.005) * 20) / 20))
    legend_h = 18 * len(series)
    left, right, top, bottom = 44, 10, 28 + legend_h, 36
    height += legend_h
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(vals) for _, vals in series)
    group = plot_w / max(n, 1)
    bar = group * 0.8 / max(len(series), 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    body = [_text(left, 16, title, "start", "title")]
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        body.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_f(y(v))}" y2="{_f(y(v))}"/>')
        body.append(_text(left - 4, y(v) + 4, f"{100 * v:.0f}%", "end", "axis"))
    body.append('<g class="legend">')
    for s, (name, vals) in enumerate(series):
        colour = SERIES[s % len(SERIES)]
        mean = float(np.mean(vals)) if len(vals) else lo
        ly = 26 + 18 * s
        body.append(f'<rect x="{left}" y="{ly}" width="12" height="12" fill="{colour}"/>')
        body.append(f'<line class="mean" x1="{left + 18}" x2="{left + 40}" y1="{ly + 6}" y2="{ly + 6}" '
                    f'stroke="{colour}"/>')
        body.append(_text(left + 46, ly + 10, f"{name}: mean {100 * mean:.1f}% over {len(vals)} split"
                          f"{'' if len(vals) == 1 else 's'} (dashed)", "start", "axis legend-item"))
    body.append("</g>")
    for s, (name, vals) in enumerate(series):
        colour = SERIES[s % len(SERIES)]
        for i, v in enumerate(vals):
            x = left + i * group + group * 0.1 + s * bar
            body.append(f'<rect x="{_f(x)}" y="{_f(y(v))}" width="{_f(bar)}" height="{_f(top + plot_h - y(v))}" '
                        f'fill="{colour}"><title>{escape(name)}, split {i}: {100 * v:.2f}%</title></rect>')
        mean = float(np.mean(vals)) if len(vals) else lo
        body.append(f'<line class="mean" x1="{left}" x2="{width - right}" y1="{_f(y(mean))}" y2="{_f(y(mean))}" '
                    f'stroke="{colour}"><title>{escape(name)} mean {100 * mean:.1f}%</title></line>')
    for i in range(n):
        body.append(_text(left + (i + 0.5) * group, height - bottom + 14, str(i), cls="axis"))
    body.append(_text(left + plot_w / 2, height - 2, "split", cls="axis"))
    return _svg(width, height, body, title)


def confusion_matrix(conf: Confusion, link: Callable[[str, str], str] | None = None, max_cell: int = 44) -> Markup:
    """A heat map: rows are true classes, columns predicted; shade = share of the row; each cell a link."""
    n = len(conf.labels)
    if n == 0:
        return _svg(320, 40, [_text(160, 24, "no labelled predictions")], "confusion matrix")
    cell = max(14, min(max_cell, 520 // n))
    label_w = min(160, 8 + 7 * max(len(lb) for lb in conf.labels))
    left, top = label_w + 18, label_w + 18
    width, height = left + n * cell + 8, top + n * cell + 8
    rows = conf.counts.sum(axis=1)
    body = [_text(left + n * cell / 2, 12, "predicted", cls="axis"),
            f'<text class="axis" transform="translate(12 {_f(top + n * cell / 2)}) rotate(-90)" '
            f'text-anchor="middle">true</text>']
    for j, lb in enumerate(conf.labels):
        x = left + (j + 0.5) * cell + 4
        body.append(f'<text class="tick" transform="translate({_f(x)} {top - 4}) rotate(-60)">{escape(lb)}</text>')
        body.append(_text(left - 4, top + (j + 0.5) * cell + 4, lb, "end", "tick"))
    for i, truth in enumerate(conf.labels):
        for j, pred in enumerate(conf.labels):
            count = int(conf.counts[i, j])
            share = count / rows[i] if rows[i] else 0.0
            base = (46, 110, 180) if i == j else (209, 73, 91)
            fill = "#f7f7f7" if count == 0 else "rgb({},{},{})".format(
                *(int(255 - (255 - c) * (0.15 + 0.85 * share)) for c in base))
            x, y = left + j * cell, top + i * cell
            tip = f"true {truth}, predicted {pred}: {count} ({100 * share:.1f}% of {truth})"
            rect = (f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{fill}">'
                    f"<title>{escape(tip)}</title></rect>")
            txt = _text(x + cell / 2, y + cell / 2 + 4, count, cls="cell dark" if share > 0.55 else "cell") \
                if count and cell >= 22 else ""
            if link is not None and count:
                body.append(f'<a href="{escape(link(truth, pred))}" class="cm-cell" data-true="{escape(truth)}" '
                            f'data-pred="{escape(pred)}">{rect}{txt}</a>')
            else:
                body.append(rect + txt)
    return _svg(width, height, body, "confusion matrix", "chart confusion")


def class_scores(scores: Sequence[ClassScores], width: int = 640) -> Markup:
    """Horizontal bars of precision, recall and F1 per class."""
    if not scores:
        return _svg(width, 40, [_text(width / 2, 24, "no classes")], "per-class scores")
    label_w = min(160, 8 + 7 * max(len(s.label) for s in scores))
    row, top = 36, 24
    plot_w = width - label_w - 70
    height = top + row * len(scores) + 10
    metrics = (("precision", "#4e79a7"), ("recall", "#f28e2b"), ("F1", "#59a14f"))
    body = []
    for k, (name, colour) in enumerate(metrics):
        body.append(f'<rect x="{label_w + 10 + k * 90}" y="6" width="10" height="10" fill="{colour}"/>')
        body.append(_text(label_w + 24 + k * 90, 15, name, "start", "axis"))
    for i, s in enumerate(scores):
        y0 = top + i * row
        body.append(_text(label_w, y0 + row / 2 + 4, s.label, "end", "tick"))
        for k, (value, (name, colour)) in enumerate(zip((s.precision, s.recall, s.f1), metrics, strict=True)):
            y = y0 + 4 + k * 10
            w = plot_w * (value or 0.0)
            shown = "n/a" if value is None else f"{100 * value:.1f}%"
            body.append(f'<rect x="{label_w + 8}" y="{y}" width="{_f(w)}" height="9" fill="{colour}">'
                        f"<title>{escape(s.label)} {name}: {shown}</title></rect>")
            body.append(_text(label_w + 12 + w, y + 8, shown, "start", "small"))
    return _svg(width, height, body, "per-class precision, recall and F1")


def colour_for(values: Sequence[str | None], top: int = len(PALETTE)) -> tuple[list[str], list[tuple[str, str]]]:
    """A colour per value (the ``top`` most frequent get palette colours, the rest and None grey) and the legend."""
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    ranked = sorted(sorted(counts, key=lambda k: (-counts[k], k))[:top])
    colours = {k: PALETTE[i] for i, k in enumerate(ranked)}
    legend = [(k, colours[k]) for k in ranked]
    if len(counts) > len(ranked) or any(v is None for v in values):
        legend.append(("other / unlabelled" if len(counts) > len(ranked) else "unlabelled", OTHER))
    return [OTHER if v is None else colours.get(v, OTHER) for v in values], legend


def scatter(ids: np.ndarray, xy: np.ndarray, colours: Sequence[str], title: str,
            captions: Sequence[str] | None = None, size: int = 720,
            legend: Sequence[tuple[str, str]] | None = None) -> Markup:
    """A scatter plot of the map: one circle per image carrying ``data-id``, a caption ``data-c`` and, with a
    ``legend``, the index of its legend entry ``data-g`` (the page's script shows the thumbnail on hover, opens
    the image on click, zooms, pans, hides legend groups and selects with a lasso)."""
    pad = 12
    if len(ids) == 0:
        return _svg(size, 40, [_text(size / 2, 24, "no points")], title)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = float((hi - lo).max()) or 1.0  # one scale for both axes: distances on the map stay comparable
    scaled = pad + (xy - (lo + hi) / 2) / span * (size - 2 * pad) + (size - 2 * pad) / 2
    r = 2.2 if len(ids) > 5000 else 3.2 if len(ids) > 1000 else 4.5
    texts = captions if captions is not None else [""] * len(ids)
    group = {colour: k for k, (_, colour) in enumerate(legend or [])}
    body = [f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="{r}" fill="{c}" data-id="{int(i)}" data-c="{escape(t)}"'
            f'{f" data-g={chr(34)}{group[c]}{chr(34)}" if c in group else ""}/>'
            for i, (x, y), c, t in zip(ids.tolist(), scaled.tolist(), colours, texts, strict=True)]
    return _svg(size, size, ['<g class="points">', *body, "</g>"], title, "chart map")
