"""Section 6: closed-loop simulation results (RUN/simulate.json), when that stage ran.

A ``mega-trading/simulate@1`` document (simulate/run.py) gets a dedicated view: one row
per execution policy (shortfall, fill ratio, impact with CIs), the paired shortfall
differences, the post-trade impact curves and the per-episode shortfalls. Any other
layout is rendered generically: scalar entries as a table (each traceable to its JSON
path), numeric series as line charts and lists of records as tables.
"""

from __future__ import annotations

from typing import Any

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.charts import EXTRA_COLORS, embed, rgba, style
from mega_trading.report.html import Section, ci, esc, key_values, not_produced, note, num, table

MAX_ROWS = 50
MAX_CHARTS = 8
SKIP_KEYS = {"lineage", "provenance", "config", "format"}

SIM_FORMAT = "mega-trading/simulate@1"
SUMMARY_METRICS = (  # (key in a policy's summary, column header, format spec)
    ("shortfall_bps", "shortfall (bp)", ".3f"),
    ("fill_ratio", "fill ratio", ".3f"),
    ("time_to_complete_s", "time to complete (s)", ".3g"),
    ("n_fills", "fills", ".3g"),
    ("final_impact_bps", "final impact (bp)", ".3f"),
)

HOW = """<p>The simulator executes a parent order (buy or sell a quantity within a time
horizon) with several execution policies, against a market whose order flow comes from
the model (or from replayed real trades). In <em>closed loop</em> the agent's own fills
are inserted into the model's context, so the simulated market reacts to them.</p>
<p><strong>Implementation shortfall</strong> is the average fill price relative to the
price on arrival, in basis points, signed so that positive is a cost. <em>Fill ratio</em>
is the share of the parent order done by the horizon; <em>impact</em> is how far the
price has moved in the order's direction after the order is done. Every policy runs on
the same starting points and random streams, so the paired differences (each policy
minus the first) are much tighter than the separate intervals.</p>"""


def _fmt_for(value: Any) -> str:
    if isinstance(value, bool):
        return ""
    if isinstance(value, int):
        return ",d"
    return ".6g"


def _walk(doc: Any, path: str, scalars: list, series: list, records: list) -> None:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if path == "" and key in SKIP_KEYS:
                continue
            _walk(value, f"{path}/{key}" if path else str(key), scalars, series, records)
    elif isinstance(doc, list):
        if doc and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in doc):
            if len(doc) > 2:
                series.append((path, doc))
            else:
                for i, v in enumerate(doc):
                    scalars.append((f"{path}/{i}", v))
        elif doc and all(isinstance(v, dict) for v in doc):
            records.append((path, doc))
    elif isinstance(doc, (int, float, str, bool)) or doc is None:
        scalars.append((path, doc))


def _scalar_cell(path: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return num(value, _fmt_for(value), f"simulate:{path}")
    return esc(value)


def _series_chart(path: str, values: list, index: int) -> str:
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(y=values, mode="lines", name=path,
                               line={"color": EXTRA_COLORS[index % len(EXTRA_COLORS)]}))
    style(fig, half=True, height=280, xaxis_title="index", yaxis_title=path.rsplit("/", 1)[-1],
          showlegend=False)
    return embed(fig, f"sim-{index}", path)


def _records_table(path: str, rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows[:MAX_ROWS] for k in row))
    body = []
    for i, row in enumerate(rows[:MAX_ROWS]):
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(num(value, _fmt_for(value), f"simulate:{path}/{i}/{c}"))
            else:
                cells.append(esc(value if not isinstance(value, (dict, list)) else "…"))
        body.append(cells)
    more = f" (first {MAX_ROWS} of {len(rows)})" if len(rows) > MAX_ROWS else ""
    return table(columns, body, caption=f"{esc(path)}{more}", numeric_from=0)


def _policy_table(doc: dict) -> str:
    rows = []
    for name, result in doc.get("policies", {}).items():
        policy, summary = result.get("policy", {}), result.get("summary", {})
        what = (f"{esc(policy.get('side', ''))} {esc(policy.get('qty', ''))} in "
                f"{esc(policy.get('horizon_s', ''))} s")
        row = [f"<strong>{esc(name)}</strong><br><span class='muted'>{what}</span>"]
        for key, _, spec in SUMMARY_METRICS:
            stats = summary.get(key) or {}
            prefix = f"simulate:policies/{name}/summary/{key}"
            row.append(num(stats.get("mean"), spec, f"{prefix}/mean") + "<br>"
                       + ci(stats.get("ci95"), spec, f"{prefix}/ci95"))
        row.append(f"{num(summary.get('episodes'), ',d', f'simulate:policies/{name}/summary/episodes')}"
                   f" ({num(summary.get('truncated'), ',d', f'simulate:policies/{name}/summary/truncated')} truncated)")
        rows.append(row)
    return table(["policy", *[h for _, h, _ in SUMMARY_METRICS], "episodes"], rows,
                 caption="Mean per episode with its bootstrap 95% CI.")


def _paired_table(doc: dict) -> str:
    paired = doc.get("paired_shortfall") or {}
    base = paired.get("baseline")
    rows = []
    for name, entry in paired.items():
        if name == "baseline" or not isinstance(entry, dict):
            continue
        key = f"simulate:paired_shortfall/{name}"
        rows.append([esc(f"{name} − {base}"), num(entry.get("mean_bps"), "+.3f", f"{key}/mean_bps"),
                     ci(entry.get("ci95"), "+.3f", f"{key}/ci95")])
    if not rows:
        return ""
    return table(["comparison", "shortfall difference (bp)", "95% CI"], rows,
                 caption="Paired differences on the same episodes (negative: cheaper than the first policy).")


def _impact_chart(doc: dict) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    drawn = False
    for i, (name, result) in enumerate(doc.get("policies", {}).items()):
        curve = result.get("impact_curve") or {}
        lags, mean = curve.get("lags") or [], curve.get("mean_bps") or []
        if not any(v is not None for v in mean):
            continue
        color = EXTRA_COLORS[i % len(EXTRA_COLORS)]
        lo, hi = curve.get("ci95_lo_bps") or [], curve.get("ci95_hi_bps") or []
        fig.add_scatter(x=lags, y=hi, mode="lines", line={"width": 0}, showlegend=False,
                        hoverinfo="skip", legendgroup=name)
        fig.add_scatter(x=lags, y=lo, mode="lines", line={"width": 0}, fill="tonexty",
                        fillcolor=rgba(color, .15), showlegend=False, hoverinfo="skip",
                        legendgroup=name)
        fig.add_scatter(x=lags, y=mean, mode="lines+markers", name=name, legendgroup=name,
                        line={"color": color, "width": 2})
        drawn = True
    if not drawn:
        return note("No policy completed within its horizon, so there is no post-trade impact curve.", "info")
    style(fig, half=True, height=340, xaxis_title="market events after completion",
          yaxis_title="price move in the order's direction (bp)")
    return embed(fig, "sim-impact", "Post-trade impact (mean, 95% CI)")


def _shortfall_chart(doc: dict) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, result) in enumerate(doc.get("policies", {}).items()):
        values = [e.get("shortfall_bps") for e in result.get("episodes", [])
                  if isinstance(e, dict) and e.get("shortfall_bps") is not None]
        fig.add_box(y=values, name=name, boxpoints="all", jitter=0.4, pointpos=0,
                    marker={"color": EXTRA_COLORS[i % len(EXTRA_COLORS)], "size": 5})
    style(fig, half=True, height=340, yaxis_title="implementation shortfall (bp)", showlegend=False)
    return embed(fig, "sim-shortfall", "Shortfall per episode")


def _simulate_view(doc: dict) -> str:
    closed = "closed loop" if doc.get("closed_loop") else "open loop"
    lineage = doc.get("lineage", {})
    info = key_values([
        ("scenario", f"<code>{esc(doc.get('scenario'))}</code> {esc(doc.get('description') or '')}"),
        ("market", (f"{esc(doc.get('source'))} order flow, {closed}, "
                   f"{num(doc.get('episodes'), ',d', 'simulate:episodes')} episodes, seed {esc(doc.get('seed'))}")),
        ("checkpoint", f"step {esc(lineage.get('checkpoint_step', '—'))} on {esc(lineage.get('device', '—'))}"),
    ])
    charts = f'<div class="grid2">{_shortfall_chart(doc)}{_impact_chart(doc)}</div>'
    return info + _policy_table(doc) + _paired_table(doc) + charts


def _generic_view(doc: dict) -> str:
    scalars: list = []
    series: list = []
    records: list = []
    _walk(doc, "", scalars, series, records)
    body = []
    if scalars:
        body.append(key_values([(path, _scalar_cell(path, v)) for path, v in scalars]))
    charts = [_series_chart(path, values, i) for i, (path, values) in enumerate(series[:MAX_CHARTS])]
    if charts:
        body.append(f'<div class="grid2">{"".join(charts)}</div>')
    body += [_records_table(path, rows) for path, rows in records]
    return "".join(body) or '<p class="muted">simulate.json holds no figures to show.</p>'


def simulation_section(art: Artifacts) -> Section:
    title = "Closed-loop simulation"
    if art.simulate is None:
        why = esc(art.problems.get("simulate.json", ""))
        return Section("simulation", title, not_produced(
            "closed-loop simulation results (an optional stage)", art.run_dir / "simulate.json",
            why or "Run <code>mega-trading simulate</code> to add them."), HOW)
    doc = art.simulate
    body = _simulate_view(doc) if doc.get("format") == SIM_FORMAT else _generic_view(doc)
    return Section("simulation", title, body, HOW)
