"""Plotly figures as self-contained HTML snippets, with one look across the report.

`embed(fig, name)` returns a ``<div class="chart">`` plus the inline script that draws it
with the plotly.js bundled in the page (no CDN). The figure JSON is escaped so that text
from an artifact (a symbol name, a config value) can never close the script element.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from mega_trading.report.html import esc

MODEL_COLOR = "#1f4e9c"
REAL_COLOR = "#111827"
NOISE_COLOR = "#98a2b3"
BASELINE_COLORS = {
    "uniform": "#c0c4cc",
    "unigram": "#a47148",
    "copy_previous": "#e0a43b",
    "markov1": "#6aa56a",
    "markov3": "#2e7d5b",
    "compound_hawkes": "#d1495b",
    "tokenized_real": "#8e5ea2",
}
EXTRA_COLORS = ["#8e5ea2", "#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057"]
UP, DOWN = "#12a37f", "#d64545"
FONT = "-apple-system, Segoe UI, Roboto, Helvetica Neue, Arial, sans-serif"


def color_of(name: str) -> str:
    """A stable colour for a predictor / data source name."""
    if name == "model":
        return MODEL_COLOR
    if name == "real":
        return REAL_COLOR
    if name in ("noise_floor", "noise floor"):
        return NOISE_COLOR
    if name in BASELINE_COLORS:
        return BASELINE_COLORS[name]
    return EXTRA_COLORS[sum(map(ord, name)) % len(EXTRA_COLORS)]


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _legend_rows(fig, width_px: int) -> int:
    """Rows the horizontal legend will wrap into (an estimate from the entry names)."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    if not names:
        return 0
    total = sum(7 * len(name) + 45 for name in dict.fromkeys(names))
    return math.ceil(total / width_px)


def style(fig, height: int = 380, half: bool = False, **layout: Any):
    """The report's common layout: white, compact margins, legend on top.

    The top margin leaves room for the legend rows plus the mode bar above them (shown on
    hover, and always on touch screens), so the two never overlap. `half`: the chart sits
    in a half-width column, so its legend wraps sooner.
    """
    rows = 0 if layout.get("showlegend") is False else _legend_rows(fig, 430 if half else 980)
    fig.update_layout(
        template="plotly_white", height=height + 22 * max(rows - 1, 0),
        font={"family": FONT, "size": 12.5},
        margin={"l": 60, "r": 20, "t": 40 + 22 * rows, "b": 48},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "left", "x": 0},
        hoverlabel={"font_size": 12}, **layout,
    )
    return fig


def times_to_iso(time_us: Any) -> list[str]:
    """Epoch microseconds -> ISO strings Plotly reads as dates (UTC)."""
    arr = np.asarray(time_us, dtype=np.int64).astype("datetime64[us]")
    return [str(s) for s in np.datetime_as_string(arr, unit="ms")]


_SAFE_ID = re.compile(r"[^a-zA-Z0-9_-]+")


def embed(fig, name: str, title: str = "", caption: str = "") -> str:
    """A chart box: title, the Plotly div drawn by an inline script, and a caption."""
    import plotly.io as pio

    div_id = "chart-" + _SAFE_ID.sub("-", name)
    spec = pio.to_json(fig, validate=True, pretty=False)
    spec = spec.replace("</", "<\\/")  # a "</script>" inside a string must not end the script
    config = '{"responsive": true, "displaylogo": false}'
    head = f'<div class="chart-title">{esc(title)}</div>' if title else ""
    tail = f'<div class="chart-caption">{caption}</div>' if caption else ""
    return (f'<div class="chart-box">{head}<div id="{div_id}" class="chart" data-chart="{esc(name)}">'
            f"</div>{tail}<script>(function(){{var f={spec};"
            f'Plotly.newPlot("{div_id}", f.data, f.layout, {config});}})();</script></div>')


def plotly_js() -> str:
    """The full plotly.js bundle shipped with the Python package, for inline embedding."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().replace("</script", "<\\/script")
