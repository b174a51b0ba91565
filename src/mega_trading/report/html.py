"""Small HTML building blocks: escaping, numbers that tests can trace, tables, sections, page.

Every number copied from a JSON artifact goes through `num`, which writes the artifact path
it came from (``data-key="backtest:model/nll_nats"``) and the format spec used
(``data-fmt=".4f"``) beside the text, so a test can recompute the text from the JSON.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MISSING = "—"


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_value(value: Any, spec: str) -> str:
    """The text a number is shown as (the same rule the tests apply)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return format(value, spec)


def num(value: Any, spec: str, key: str | None = None) -> str:
    """A number as text; with `key` ("artifact:path/in/json"), traceable to its source."""
    text = esc(fmt_value(value, spec))
    if key is None:
        return f'<span class="num">{text}</span>'
    return f'<span class="num" data-key="{esc(key)}" data-fmt="{esc(spec)}">{text}</span>'


def ci(pair: Sequence[Any] | None, spec: str, key: str | None = None) -> str:
    """A 95% interval "[lo, hi]", each bound traceable as key/0 and key/1."""
    lo, hi = (pair or [None, None])[:2]
    k0 = f"{key}/0" if key else None
    k1 = f"{key}/1" if key else None
    return f'<span class="ci">[{num(lo, spec, k0)}, {num(hi, spec, k1)}]</span>'


def utc(time_us: int | None, seconds: bool = True) -> str:
    if time_us is None:
        return MISSING
    stamp = dt.datetime.fromtimestamp(time_us / 1e6, dt.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + " UTC"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def short_hash(value: str | None, n: int = 12) -> str:
    if not value:
        return f'<span class="muted">{MISSING}</span>'
    return f'<code title="{esc(value)}">{esc(value[:n])}</code>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "",
          caption: str | None = None, numeric_from: int = 1) -> str:
    """A table of pre-rendered HTML cells; columns from `numeric_from` on are right-aligned."""
    head = "".join(f'<th class="{"r" if i >= numeric_from else ""}">{esc(h)}</th>'
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"r" if i >= numeric_from else ""}">{c}</td>'
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table class="{cls}">{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def key_values(pairs: Iterable[tuple[str, str]], cls: str = "") -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<div class="table-wrap"><table class="kv {cls}"><tbody>{rows}</tbody></table></div>'


def note(text: str, kind: str = "info") -> str:
    """A callout; kind: info, missing (artifact not produced), warn, bad, good."""
    return f'<div class="note note-{kind}">{text}</div>'


def not_produced(what: str, path: Any, hint: str = "") -> str:
    extra = f" {hint}" if hint else ""
    return note(f"<strong>Not produced in this run:</strong> {esc(what)} "
                f"(<code>{esc(path)}</code> does not exist).{extra}", "missing")


def cards(items: Iterable[tuple[str, str, str]]) -> str:
    """Headline figures: (label, value html, sub-line html)."""
    out = []
    for label, value, sub in items:
        out.append(f'<div class="card"><div class="card-label">{esc(label)}</div>'
                   f'<div class="card-value">{value}</div><div class="card-sub">{sub}</div></div>')
    return f'<div class="cards">{"".join(out)}</div>'


def how_to_read(text: str) -> str:
    return f'<div class="how"><div class="how-title">How to read this</div>{text}</div>'


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    body: str
    how: str = ""  # the "how to read this" paragraph (HTML)

    def render(self, number: int) -> str:
        how = how_to_read(self.how) if self.how else ""
        return (f'<section id="{esc(self.id)}" class="report-section" data-section="{esc(self.id)}">'
                f'<h2><span class="secnum">{number}</span>{esc(self.title)}</h2>{how}{self.body}'
                f"</section>")


CSS = """
:root { --ink:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f6f7f9; --card:#fff;
        --accent:#1f4e9c; --good:#13795b; --bad:#b42318; --warn:#b54708; }
* { box-sizing: border-box; }
html { scroll-behavior: smooth; }
body { margin:0; font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: var(--ink); background: var(--bg); }
header.top { background: #14213d; color: #fff; padding: 28px 0 22px; }
header.top h1 { margin: 0 0 4px; font-size: 26px; font-weight: 650; letter-spacing: .2px; }
header.top .sub { color: #c9d3e6; font-size: 14px; }
header.top code { color: #fff; background: rgba(255,255,255,.12); }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
nav.toc { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
          padding: 14px 20px; margin: 22px 0; }
nav.toc h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .08em;
             color: var(--muted); margin: 0 0 6px; }
nav.toc ol { margin: 0; padding-left: 22px; columns: 2; column-gap: 40px; }
nav.toc li { margin: 2px 0; }
nav.toc a { color: var(--accent); text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
section.report-section { background: var(--card); border: 1px solid var(--line);
          border-radius: 10px; padding: 20px 24px 24px; margin: 0 0 22px; }
section h2 { margin: 0 0 12px; font-size: 21px; font-weight: 650; }
section h3 { margin: 22px 0 8px; font-size: 16px; font-weight: 650; }
.secnum { display:inline-block; min-width: 28px; height: 28px; line-height: 28px;
          text-align:center; border-radius: 50%; background: var(--accent); color:#fff;
          font-size: 14px; margin-right: 10px; vertical-align: 2px; }
.how { background: #f0f5ff; border-left: 4px solid var(--accent); padding: 10px 14px;
       margin: 0 0 16px; border-radius: 0 6px 6px 0; font-size: 14px; }
.how-title { font-weight: 650; font-size: 12px; text-transform: uppercase;
             letter-spacing: .06em; color: var(--accent); margin-bottom: 2px; }
.how p { margin: 4px 0; }
.note { padding: 10px 14px; border-radius: 6px; margin: 10px 0; font-size: 14px; }
.note-info { background: #f2f4f7; }
.note-missing { background: #fffaeb; border: 1px dashed #fec84b; }
.note-warn { background: #fffaeb; border-left: 4px solid var(--warn); }
.note-bad { background: #fef3f2; border-left: 4px solid var(--bad); }
.note-good { background: #ecfdf3; border-left: 4px solid var(--good); }
.table-wrap { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
caption { text-align: left; color: var(--muted); font-size: 13px; padding-bottom: 4px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
thead th { background: #f9fafb; font-weight: 600; color: #344054; white-space: nowrap;
           border-bottom: 2px solid var(--line); }
td.r, th.r { text-align: right; }
td .num, td .ci { font-variant-numeric: tabular-nums; white-space: nowrap; }
.ci-sub { font-size: 12px; color: var(--muted); }
tr.model-row td { background: #eef4ff; font-weight: 600; }
table.kv th { width: 30%; color: #344054; font-weight: 600; background: #fcfcfd; }
code { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: #f2f4f7; padding: 1px 4px; border-radius: 4px; word-break: break-all; }
pre { background: #f8f9fb; border: 1px solid var(--line); padding: 10px; border-radius: 6px;
      overflow-x: auto; font-size: 12.5px; max-height: 360px; }
.muted { color: var(--muted); }
.good { color: var(--good); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.neutral { color: var(--warn); font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr));
         gap: 12px; margin: 6px 0 16px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background:#fcfcfd; }
.card-label { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing:.05em; }
.card-value { font-size: 22px; font-weight: 650; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card-sub { font-size: 12.5px; color: var(--muted); }
.chart-box { border: 1px solid var(--line); border-radius: 8px; padding: 6px; margin: 10px 0 16px;
             background: #fff; }
.chart-title { font-weight: 600; font-size: 14px; margin: 4px 6px 0; }
.chart-caption { font-size: 13px; color: var(--muted); margin: 2px 6px 6px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } nav.toc ol { columns: 1; } }
ul.limits li { margin: 4px 0; }
footer { color: var(--muted); font-size: 12.5px; padding: 10px 0 40px; }
"""


def page(title: str, subtitle_html: str, sections: Sequence[Section], plotly_js: str,
         footer_html: str) -> str:
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(s.render(i + 1) for i, s in enumerate(sections))
    # plotly.js goes first so every chart's inline script can call Plotly.newPlot at once.
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
<script>{plotly_js}</script>
</head>
<body>
<header class="top"><div class="wrap"><h1>{esc(title)}</h1><div class="sub">{subtitle_html}</div></div></header>
<main class="wrap">
<nav class="toc" id="contents"><h2>Contents</h2><ol>{toc}</ol></nav>
{body}
<footer>{footer_html}</footer>
</main>
</body>
</html>
"""
