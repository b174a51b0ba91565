"""Section 5: stylized facts, real vs generated, against the noise floor (RUN/facts.json).

facts.json (``mega_trading.eval.scorecard.scorecard``) holds, for each source, its facts (moments,
tails, autocorrelation curves, response), the distances of its distributions to the real
backtest events with bootstrap CIs, and the gap of each fact to the real one. Sources:
``real`` (backtest events, the reference), ``noise_floor`` (real training events: how far
two real samples already are), ``model`` (the model's rollouts) and ``baselines``.

The tables and curves are drawn from facts.json only. The histograms and the QQ plot need
the samples themselves, which facts.json does not store: they are drawn from the events of
the prepared data and the rollouts file, prepared by the same ``facts.prepare_events``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mega_trading.eval.distances import distribution_values
from mega_trading.eval.scorecard import lookup
from mega_trading.eval.statistics import prepare_events
from mega_trading.report.artifacts import Artifacts
from mega_trading.report.charts import color_of, embed, style
from mega_trading.report.html import Section, ci, esc, not_produced, note, num, table

FACT_FMT = ".4g"
DIST_FMT = ".4f"
MAX_SAMPLE_EVENTS = 200_000  # per source, for the histograms

# (label, path in one source's facts, what it shows)
HEADLINE_FACTS = (
    ("events", ("n_events",), ",d"),
    ("return std (bp)", ("returns", "std"), FACT_FMT),
    ("share of zero returns", ("returns", "share_zero"), FACT_FMT),
    ("return excess kurtosis", ("returns", "excess_kurtosis"), FACT_FMT),
    ("Hill tail index of |r|", ("tail", "hill_index"), FACT_FMT),
    ("return ACF, lag 1", ("return_acf", 0), FACT_FMT),
    ("|r| ACF, lag 1", ("abs_return_acf", 0), FACT_FMT),
    ("|r| ACF, lag 10", ("abs_return_acf", 9), FACT_FMT),
    ("sign ACF, lag 1", ("sign", "acf", 0), FACT_FMT),
    ("sign ACF power-law exponent γ", ("sign", "powerlaw", "gamma"), FACT_FMT),
    ("buy share − sell share (mean sign)", ("sign", "mean"), FACT_FMT),
    ("share of zero time gaps", ("inter_arrival", "share_zero"), FACT_FMT),
    ("time-gap coefficient of variation", ("inter_arrival", "cv"), FACT_FMT),
    ("median time gap (µs)", ("inter_arrival", "median_dt_us"), FACT_FMT),
    ("log size std", ("size", "std"), FACT_FMT),
    ("response R(1) (bp)", ("response", 0), FACT_FMT),
)
CURVES = (  # (chart name, title, path to the curve, y label)
    ("return_acf", "Autocorrelation of returns", ("return_acf",), "ACF of r"),
    ("abs_return_acf", "Volatility clustering: ACF of |returns|", ("abs_return_acf",), "ACF of |r|"),
    ("sign_acf", "Order-flow memory: ACF of trade signs", ("sign", "acf"), "ACF of sign"),
    ("dt_acf", "Clustering in time: ACF of time gaps", ("inter_arrival", "acf"), "ACF of dt"),
    ("response", "Price response to a trade R(l)", ("response",), "R(l) (bp)"),
)
DISTRIBUTION_LABELS = {"returns": "returns (bp)", "abs_returns": "|returns| (bp)",
                       "log_size": "log size", "log1p_dt": "log(1 + time gap µs)"}
GAP_ORDER = ("return_acf", "abs_return_acf", "sign_acf", "dt_acf", "response", "excess_kurtosis",
             "hill_index", "sign_gamma", "dt_share_zero", "dt_cv", "log_size_std")
DISPLAY_NAMES = {"tokenized_real": "tokenized real (bins only)",
                 "compound_hawkes": "compound Hawkes", "markov3": "markov3 rollouts"}
METRIC_LABELS = {"ks": "KS statistic", "wasserstein": "W1 (standardized)", "l1_bins": "binned L1"}

HOW = """<p>Stylized facts are the statistical regularities every real market shows: returns
with fat tails (excess kurtosis, a Hill tail index of a few), almost no autocorrelation of
returns but long-lasting autocorrelation of their size (volatility clustering), long memory
in the sign of trades (buys follow buys), clustered arrival times, and a price that moves
in the direction of the trade (the response R(l)). Each is computed the same way for the
real held-out events, for the model's generated trades and for each baseline generator.</p>
<p>The <strong>noise floor</strong> is real data compared with real data: the training
period against the backtest period. No generator can be expected to be closer to the
backtest than another stretch of the same market, so a generator is as good as real data
on a fact when its distance or gap is near the noise floor's, and clearly worse when it is
far above it. Distances come with bootstrap 95% intervals; when a generator's interval lies
above the noise floor's interval, the difference is more than sampling noise.</p>
<p>The comparison generators: <em>markov3 rollouts</em> continue the model's own prompts
with the n-gram baseline; <em>compound Hawkes</em> draws self-exciting arrival times with
independently resampled trades; <em>tokenized real (bins only)</em> is the real backtest
passed through the tokenizer and decoded back, so it shows how much of any distance is due
to quantizing trades into bins alone: the model, whose trades are decoded tokens, cannot be
expected to beat it.</p>"""


def display_name(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def _sources(facts: dict) -> list[tuple[str, str, dict | None]]:
    """(label, json path prefix under facts/, that source's facts), reference first."""
    out = [("real (backtest)", "real", facts.get("real")),
           ("noise floor (train)", "noise_floor", facts.get("noise_floor")),
           ("model", "model", facts.get("model"))]
    out += [(display_name(name), f"baselines/{name}", f) for name, f in facts.get("baselines", {}).items()]
    return out


def _roles(section: dict) -> list[tuple[str, str, Any]]:
    """(label, json path prefix, value) of the generated sides of one distances/gaps entry."""
    out = [("noise floor", "noise_floor", section.get("noise_floor")),
           ("model", "model", section.get("model"))]
    out += [(display_name(name), f"baselines/{name}", v) for name, v in section.get("baselines", {}).items()]
    return out


def _ordered(mapping: dict, order: tuple) -> list[tuple[str, Any]]:
    """Items in the preferred order (JSON is written key-sorted), unknown keys last."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(mapping.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def _color(role: str) -> str:
    return color_of(role.removeprefix("baselines/").split(" ")[0])


def _facts_table(facts: dict) -> str:
    sources = [s for s in _sources(facts) if s[2] is not None]
    rows = []
    for label, path, spec in HEADLINE_FACTS:
        json_path = "/".join(str(p) for p in path)
        row = [esc(label)]
        for _, prefix, source in sources:
            row.append(num(lookup(source, path), spec, f"facts:facts/{prefix}/{json_path}"))
        rows.append(row)
    return table(["fact", *[s[0] for s in sources]], rows, cls="facts-table",
                 caption="Headline facts of each source (returns in basis points, one event per trade).")


def _verdict(model: dict | None, floor: dict | None) -> str:
    if not model or not floor or model.get("ci_low") is None or floor.get("ci_high") is None:
        return '<span class="muted">—</span>'
    if model["ci_low"] > floor["ci_high"]:
        return '<span class="bad">farther than real</span>'
    return '<span class="good">within noise floor</span>'


def _distance_table(distances: dict) -> str:
    if not distances:
        return ""
    first = next(iter(distances.values()))
    roles = [r for r in _roles(first) if r[2] is not None]
    headers = ["distribution", "distance", *[label for label, _, _ in roles], "model vs noise floor"]
    rows = []
    for dist, section in _ordered(distances, tuple(DISTRIBUTION_LABELS)):
        for i, (metric, metric_label) in enumerate(METRIC_LABELS.items()):
            row = [esc(DISTRIBUTION_LABELS.get(dist, dist)) if i == 0 else "", esc(metric_label)]
            for _, prefix, _ in _roles(section):
                if prefix not in [r[1] for r in roles]:
                    continue
                entry = lookup(section, tuple(prefix.split("/"))) or {}
                key = f"facts:distances/{dist}/{prefix}/{metric}"
                value = entry.get(metric) or {}
                row.append(num(value.get("value"), DIST_FMT, f"{key}/value")
                           + f'<br><span class="ci ci-sub">[{num(value.get("ci_low"), DIST_FMT, f"{key}/ci_low")}, '
                           f'{num(value.get("ci_high"), DIST_FMT, f"{key}/ci_high")}]</span>')
            row.append(_verdict(lookup(section, ("model", metric)), lookup(section, ("noise_floor", metric))))
            rows.append(row)
    return table(headers, rows, cls="distance-table", numeric_from=2,
                 caption="Distance of each source's distribution to the real backtest events "
                         "(0 = identical; lower is better), with its bootstrap 95% CI below.")


def _gap_table(gaps: dict) -> str:
    if not gaps:
        return ""
    first = next(iter(gaps.values()))
    roles = [r for r in _roles(first)]
    rows = []
    for name, section in _ordered(gaps, GAP_ORDER):
        row = [esc(name.replace("_", " "))]
        for _, prefix, _ in roles:
            row.append(num(lookup(section, tuple(prefix.split("/"))), FACT_FMT, f"facts:fact_gaps/{name}/{prefix}"))
        floor, model = section.get("noise_floor"), section.get("model")
        if floor is None or model is None:
            ratio = '<span class="muted">—</span>'
        elif model <= floor:
            ratio = '<span class="good">≤ noise floor</span>'
        else:
            ratio = (f'<span class="{"neutral" if model <= 2 * floor else "bad"}">'
                     f'{model / floor:.1f}× noise floor</span>' if floor > 0 else '<span class="bad">above</span>')
        row.append(ratio)
        rows.append(row)
    return table(["fact", *[r[0] for r in roles], "model vs noise floor"], rows, cls="gap-table",
                 caption="Gap of each fact to the real backtest value: mean |difference| over lags "
                         "for curves, |difference| for numbers. Lower is better.")


def _curve_chart(facts: dict, name: str, title: str, path: tuple, ylabel: str) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, prefix, source in _sources(facts):
        curve = lookup(source, path)
        if not curve:
            continue
        lags = source.get("lags") or list(range(1, len(curve) + 1))
        role = prefix.removeprefix("baselines/")
        dash = {"real": "solid", "noise_floor": "dash"}.get(role, "solid")
        width = 2.6 if role in ("real", "model") else 1.5
        fig.add_scatter(x=lags, y=curve, name=label, mode="lines",
                        line={"color": _color(role), "dash": dash, "width": width},
                        hovertemplate=f"{esc(label)} lag %{{x}}: %{{y:.4f}}<extra></extra>")
    fig.add_hline(y=0, line={"color": "#d0d5dd", "width": 1})
    style(fig, half=True, height=340, xaxis_title="lag (trades)", yaxis_title=ylabel,
          xaxis={"type": "log"})
    return embed(fig, f"fact-{name}", title)


def _aggregation_chart(facts: dict) -> str:
    """Aggregational Gaussianity: kurtosis of h-trade returns falls as h grows."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, prefix, source in _sources(facts):
        agg = lookup(source, ("aggregation", "event")) or {}
        points = sorted((int(h), v.get("excess_kurtosis")) for h, v in agg.items())
        if not points:
            continue
        role = prefix.removeprefix("baselines/")
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=label,
                        mode="lines+markers",
                        line={"color": _color(role), "dash": "dash" if role == "noise_floor" else "solid"})
    style(fig, half=True, height=340, xaxis_title="horizon h (trades summed)",
          yaxis_title="excess kurtosis of h-trade returns", xaxis={"type": "log"})
    return embed(fig, "fact-aggregation", "Aggregational Gaussianity")


# --- histograms from the samples ------------------------------------------------------------

def _samples(art: Artifacts) -> dict[str, dict[str, np.ndarray]]:
    """label -> distribution values, for real / noise floor / model, prepared as facts does."""
    import polars as pl


    out: dict[str, dict[str, np.ndarray]] = {}
    shards = art.shards()
    if shards is not None:
        for label, split in (("real (backtest)", "backtest"), ("noise floor (train)", "train")):
            frames = [_tail_events(shards, split, s, MAX_SAMPLE_EVENTS // max(1, len(shards.symbols(split))))
                      for s in shards.symbols(split)]
            frames = [f for f in frames if f is not None and f.height]
            if frames:
                out[label] = distribution_values(prepare_events(pl.concat(frames, how="diagonal_relaxed")))
    if art.rollouts is not None:
        out["model"] = distribution_values(prepare_events(art.rollouts.head(MAX_SAMPLE_EVENTS)))
    return out


def _tail_events(shards, split: str, symbol: str, max_rows: int):
    """The last `max_rows` events of a shard (nearest the backtest), reading only needed parts."""
    return shards.events(split, symbol, tail=max_rows)


def _histogram_chart(samples: dict, dist: str) -> str:
    import plotly.graph_objects as go

    # Simultaneous trades (gap 0) are an atom that would flatten the rest of the gap
    # histogram; their share is a fact of its own (the tables above), so it is left out here.
    samples = {k: {dist: v[dist][v[dist] > 0] if dist == "log1p_dt" else v[dist]}
               for k, v in samples.items()}
    reference = samples.get("real (backtest)")
    pooled = reference[dist] if reference is not None else np.concatenate([s[dist] for s in samples.values()])
    lo, hi = np.quantile(pooled, [0.001, 0.999]) if pooled.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    edges = np.linspace(lo, hi, 61)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for label, values in samples.items():
        counts, _ = np.histogram(np.clip(values[dist], lo, hi), bins=edges)
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        role = label.split(" ")[0].replace("noise", "noise_floor")
        # a log axis cannot show empty bins: leave them out, and mark every bin so a lone
        # one (an atom such as "no price change") stays visible
        log_y = dist in ("returns", "abs_returns")
        fig.add_scatter(x=centers, y=np.where(density > 0, density, np.nan) if log_y else density,
                        name=label, mode="lines+markers" if log_y else "lines",
                        marker={"size": 4, "color": _color(role)},
                        line={"shape": "hvh", "color": _color(role),
                              "dash": "dash" if role == "noise_floor" else "solid",
                              "width": 2 if role != "noise_floor" else 1.5})
    style(fig, half=True, height=340, xaxis_title=DISTRIBUTION_LABELS.get(dist, dist), yaxis_title="density",
          yaxis={"type": "log"} if log_y else {})
    zero_note = " Zero gaps (simultaneous trades) are left out." if dist == "log1p_dt" else ""
    return embed(fig, f"hist-{dist}", f"Distribution of {DISTRIBUTION_LABELS.get(dist, dist)}",
                 "Values beyond the real 0.1–99.9% range are piled into the edge bins." + zero_note)


def _qq_chart(samples: dict) -> str:
    import plotly.graph_objects as go

    reference = samples["real (backtest)"]["returns"]
    probs = np.linspace(0.005, 0.995, 199)
    ref_q = np.quantile(reference, probs)
    fig = go.Figure()
    fig.add_scatter(x=[ref_q[0], ref_q[-1]], y=[ref_q[0], ref_q[-1]], mode="lines",
                    name="identical distributions", line={"color": "#98a2b3", "dash": "dot"})
    for label, values in samples.items():
        if label.startswith("real"):
            continue
        role = label.split(" ")[0].replace("noise", "noise_floor")
        fig.add_scatter(x=ref_q, y=np.quantile(values["returns"], probs), name=label,
                        mode="markers", marker={"color": _color(role), "size": 5},
                        hovertemplate=f"{esc(label)}: real %{{x:.3f}} bp vs %{{y:.3f}} bp<extra></extra>")
    style(fig, half=True, height=340, xaxis_title="real return quantile (bp)", yaxis_title="quantile of the source (bp)")
    return embed(fig, "qq-returns", "QQ plot of returns against the real backtest",
                 "Points on the diagonal: same distribution. A flat staircase: returns take few values.")


def _headline(facts: dict, distances: dict) -> str:
    within, total = 0, 0
    for section in distances.values():
        for metric in METRIC_LABELS:
            model, floor = lookup(section, ("model", metric)), lookup(section, ("noise_floor", metric))
            if model and floor and model.get("ci_low") is not None and floor.get("ci_high") is not None:
                total += 1
                within += model["ci_low"] <= floor["ci_high"]
    if not total:
        return ""
    kind = "good" if within == total else "warn" if within else "bad"
    return note(f"The model's distributions are within the noise floor on <strong>{within} of "
                f"{total}</strong> distance measures (its 95% interval reaches the real-vs-real "
                f"interval).", kind)


def _realism_table(realism: dict | None) -> str:
    """One row per source: facts within 1.5x the noise floor, facts better than compound
    Hawkes, geometric-mean gap / noise floor with its block-bootstrap CI (realism.py)."""
    if not realism:
        return note("facts.json has no realism block (written by an older version).", "missing")
    rows = []
    for name, s in realism.get("sources", {}).items():
        key = f"facts:realism/sources/{name}"
        rows.append([esc(name), f"{num(s.get('within'), 'd', f'{key}/within')} / {num(s.get('n_facts'), 'd', f'{key}/n_facts')}",
                     num(s.get("beat_reference"), "d", f"{key}/beat_reference"),
                     num(s.get("geo_mean_ratio"), ".3f", f"{key}/geo_mean_ratio"),
                     ci(s.get("geo_ci95"), ".3f", f"{key}/geo_ci95")])
    return table(["source", f"within {realism.get('within_factor', 1.5):g}x floor",
                  "better than Hawkes", "geo-mean gap / floor", "95% CI"], rows,
                 caption="Realism score per source (lower geo-mean is better; 1 = as close to the "
                         "real backtest as real training data). The CI resamples the source's "
                         f"events in blocks of {realism.get('block_events')} "
                         f"({realism.get('n_boot')} replicates).")


def _sample_note(real_sample: dict | None) -> str:
    """How much real data the facts read: whole splits, or a bounded stratified sample."""
    if not real_sample:
        return ""
    parts = []
    for label, key in (("real (backtest)", "real"), ("noise floor (train)", "noise_floor")):
        info = real_sample.get(key) or {}
        if not info:
            continue
        if info.get("complete"):
            parts.append(f"{esc(label)}: all {info['events']:,} events of the {esc(info['split'])} split")
        else:
            parts.append(f"{esc(label)}: {info['events']:,} of {info['events_in_split']:,} events, "
                         f"{info['windows']:,} windows of {info['window_events']:,} drawn "
                         f"(stratified by symbol and time, seed {info['seed']})")
    return note("Real data read: " + "; ".join(parts) + ".", "info") if parts else ""


def facts_section(art: Artifacts) -> Section:
    title = "Stylized facts: real vs generated"
    card = art.facts
    if card is None:
        why = esc(art.problems.get("facts.json", ""))
        return Section("facts", title, not_produced("the stylized-facts scorecard", art.run_dir / "facts.json", why), HOW)
    facts, distances, gaps = card.get("facts", {}), card.get("distances", {}), card.get("fact_gaps", {})
    body = [_headline(facts, distances)]
    if facts.get("model") is None:
        body.append(note("The scorecard has no model source (no rollouts were scored).", "missing"))
    for label, _, source in _sources(facts):
        if source and source.get("warnings"):
            body.append(note(f"<strong>{esc(label)}</strong>: " + esc("; ".join(source["warnings"])), "warn"))
    body.append(_sample_note(card.get("real_sample")))
    body += [_realism_table(card.get("realism")), _distance_table(distances), _gap_table(gaps),
             _facts_table(facts)]
    charts = [_curve_chart(facts, *curve) for curve in CURVES] + [_aggregation_chart(facts)]
    body.append(f'<div class="grid2">{"".join(charts)}</div>')
    samples = _samples(art)
    if "real (backtest)" in samples and len(samples) > 1:
        hists = [_histogram_chart(samples, d) for d in ("returns", "log_size", "log1p_dt")]
        body.append("<h3>Distributions</h3>"
                    f'<div class="grid2">{"".join(hists)}{_qq_chart(samples)}</div>')
    else:
        body.append(note("Histograms need the real events (the prepared data directory) and the "
                         "rollouts; one of them is not available.", "missing"))
    return Section("facts", title, "".join(body), HOW)

