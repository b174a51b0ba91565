"""Section 3: held-out scoring of the model beside every baseline (RUN/backtest.json)."""

from __future__ import annotations

import math

from mega_trading.eval.realism import headline
from mega_trading.report.artifacts import Artifacts
from mega_trading.report.charts import color_of, embed, rgba, style
from mega_trading.report.html import (
    Section,
    cards,
    ci,
    esc,
    key_values,
    not_produced,
    note,
    num,
    table,
)
from mega_trading.report.markets_table import markets_table

# (json key, column header, format spec): the table's metric columns, in order.
METRICS = (
    ("nll_nats", "NLL (nats)", ".4f"),
    ("bits_per_event", "bits / event", ".4f"),
    ("perplexity", "perplexity", ",.2f"),
    ("top1", "top-1", ".4f"),
    ("top5", "top-5", ".4f"),
    ("ece", "ECE", ".4f"),
)
DELTA_FMT = "+.4f"

HOW = """<p>Every predictor scores exactly the same held-out events (the backtest split, never
seen in training; baselines are fitted on the train split only). <strong>NLL</strong> is the
mean negative log-probability of the true next trade token, in nats: lower is better, and
a gain of 0.1 nats means the true token got about 10% more probability on average.
<em>bits / event</em> is the same in bits; <em>perplexity</em> = exp(NLL) is the effective
number of tokens the predictor hesitates between; <em>top-1 / top-5</em> are how often the
true token is the most likely / among the 5 most likely.</p>
<p>The baselines: <code>uniform</code> (every token equally likely), <code>unigram</code>
(token frequencies of the train split), <code>copy_previous</code> (the last token again,
smoothed), <code>markov1</code> / <code>markov3</code> (smoothed n-gram models with 1 / 3
tokens of context). The 95% intervals come from a block bootstrap over stretches of
consecutive events. The column <em>model − baseline</em> is a <em>paired</em> difference
on the same events (negative: the model is better); when its interval excludes 0 the
difference is more than noise. The calibration chart compares the model's confidence in
its top guess with how often that guess is right: points on the diagonal are well
calibrated; ECE summarizes the gap.</p>"""


def _verdict(delta: dict | None) -> str:
    if not delta or delta.get("delta_nll_nats") is None:
        return '<span class="muted">—</span>'
    lo, hi = delta.get("ci95") or [None, None]
    if hi is not None and hi < 0:
        return '<span class="good">model better</span>'
    if lo is not None and lo > 0:
        return '<span class="bad">model worse</span>'
    return '<span class="neutral">no clear difference</span>'


def _metric_cells(stats: dict, prefix: str) -> list[str]:
    cells = []
    for key, _, spec in METRICS:
        cells.append(num(stats.get(key), spec, f"{prefix}/{key}"))
        if key == "nll_nats":
            cells.append(ci(stats.get("nll_nats_ci95"), spec, f"{prefix}/nll_nats_ci95"))
    return cells


def _main_table(bt: dict) -> str:
    headers = ["predictor"]
    for key, header, _ in METRICS:
        headers.append(header)
        if key == "nll_nats":
            headers.append("NLL 95% CI")
    headers += ["model − predictor (nats)", "95% CI", "verdict"]
    model = bt.get("model", {})
    rows = [["<strong>model</strong>", *_metric_cells(model, "backtest:model"),
             '<span class="muted">—</span>', "", ""]]
    for name, stats in bt.get("baselines", {}).items():
        delta = model.get("vs_baselines", {}).get(name)
        dkey = f"backtest:model/vs_baselines/{name}"
        rows.append([esc(name), *_metric_cells(stats, f"backtest:baselines/{name}"),
                     num((delta or {}).get("delta_nll_nats"), DELTA_FMT, f"{dkey}/delta_nll_nats"),
                     ci((delta or {}).get("ci95"), DELTA_FMT, f"{dkey}/ci95"), _verdict(delta)])
    html = table(headers, rows, cls="backtest-table",
                 caption="Held-out scores. Lower NLL / bits / perplexity / ECE is better; higher top-k is better.")
    # the first body row is the model: highlight it
    return html.replace("<tbody><tr>", '<tbody><tr class="model-row">', 1)


def _nll_chart(bt: dict) -> str:
    import plotly.graph_objects as go

    scorers = [("model", bt["model"]), *bt.get("baselines", {}).items()]
    scorers = [(n, s) for n, s in scorers if s.get("nll_nats") is not None]
    scorers.sort(key=lambda kv: kv[1]["nll_nats"])
    values = [s["nll_nats"] for _, s in scorers]
    lo = [v - (s.get("nll_nats_ci95") or [v, v])[0] for v, (_, s) in zip(values, scorers)]
    hi = [(s.get("nll_nats_ci95") or [v, v])[1] - v for v, (_, s) in zip(values, scorers)]
    fig = go.Figure(go.Bar(
        x=[n for n, _ in scorers], y=values, marker_color=[color_of(n) for n, _ in scorers],
        error_y={"type": "data", "array": hi, "arrayminus": lo, "color": "#344054", "thickness": 1.4},
        text=[f"{v:.3f}" for v in values], textposition="inside", insidetextanchor="start",
        textfont={"color": "#fff"},
        hovertemplate="%{x}: %{y:.4f} nats<extra></extra>"))
    style(fig, height=380, yaxis_title="NLL (nats / event), 95% CI", showlegend=False,
          yaxis={"rangemode": "tozero"})
    return embed(fig, "backtest-nll", "Held-out NLL, model vs baselines (lower is better)")


def _per_field_chart(bt: dict) -> str:
    import plotly.graph_objects as go

    scorers = [("model", bt["model"]), *bt.get("baselines", {}).items()]
    fields = list(bt["model"].get("per_field", {}))
    fig = go.Figure()
    for name, stats in scorers:
        per_field = stats.get("per_field", {})
        fig.add_bar(x=fields, y=[per_field.get(f, {}).get("nll_nats") for f in fields], name=name,
                    marker_color=color_of(name),
                    hovertemplate=f"{esc(name)} · %{{x}}: %{{y:.4f}} nats<extra></extra>")
    style(fig, half=True, height=380, barmode="group", yaxis_title="NLL of the field (nats)",
          xaxis_title="token field")
    return embed(fig, "backtest-fields", "Per-field NLL (side, price move, size, time gap)",
                 "Each field's marginal probability under the predictor's distribution over trade "
                 "tokens: which part of a trade is hard to predict.")


def _reliability_chart(bt: dict) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                    line={"color": "#98a2b3", "dash": "dot"})
    best = min(bt.get("baselines", {}).items(), key=lambda kv: kv[1].get("nll_nats", math.inf),
               default=None)
    for name, stats in [("model", bt["model"])] + ([best] if best else []):
        bins = [b for b in stats.get("reliability", []) if b.get("count")]
        if not bins:
            continue
        total = sum(b["count"] for b in bins)
        fig.add_scatter(
            x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins],
            mode="lines+markers", name=name if name == "model" else f"{name} (best baseline)",
            line={"color": color_of(name), "width": 2 if name == "model" else 1.5},
            marker={"size": [6 + 18 * math.sqrt(b["count"] / total) for b in bins],
                        "color": rgba(color_of(name), .75)},
            customdata=[[b["count"], b["lo"], b["hi"]] for b in bins],
            hovertemplate=("confidence %{x:.3f}, accuracy %{y:.3f}<br>%{customdata[0]:,} events "
                           "in bin [%{customdata[1]:.2f}, %{customdata[2]:.2f})<extra>" + esc(name) + "</extra>"))
    style(fig, half=True, height=400, xaxis_title="confidence (top-1 probability)",
          yaxis_title="accuracy (top-1 hit rate)", xaxis={"range": [0, 1]}, yaxis={"range": [0, 1]})
    ece = bt["model"].get("ece")
    return embed(fig, "calibration", "Calibration (reliability diagram)",
                 f"Marker size grows with the number of events in the bin. Model ECE: "
                 f"{num(ece, '.4f', 'backtest:model/ece')}.")


def _per_symbol_table(bt: dict) -> str:
    per_symbol = bt.get("per_symbol", {})
    if not per_symbol:
        return ""
    names = list(bt.get("baselines", {}))
    rows = []
    for symbol, info in per_symbol.items():
        key = f"backtest:per_symbol/{symbol}"
        tag = ' <span class="neutral">zero-shot</span>' if info.get("zero_shot") else ""
        row = [esc(symbol) + tag, num(info.get("n_scored"), ",d", f"{key}/n_scored"),
               num(info.get("model", {}).get("nll_nats"), ".4f", f"{key}/model/nll_nats"),
               ci(info.get("model", {}).get("nll_nats_ci95"), ".4f", f"{key}/model/nll_nats_ci95")]
        row += [num(info.get("baselines", {}).get(n, {}).get("nll_nats"), ".4f",
                    f"{key}/baselines/{n}/nll_nats") for n in names]
        rows.append(row)
    return table(["symbol", "events scored", "model NLL", "95% CI", *names], rows,
                 caption="NLL (nats) per symbol. A zero-shot symbol had no training data.")


def _headline(bt: dict) -> str:
    model = bt["model"]
    baselines = bt.get("baselines", {})
    best = min(baselines.items(), key=lambda kv: kv[1].get("nll_nats", math.inf), default=None)
    items = [("model NLL", num(model.get("nll_nats"), ".4f", "backtest:model/nll_nats"),
              f"nats / event; 95% CI {ci(model.get('nll_nats_ci95'), '.4f', 'backtest:model/nll_nats_ci95')}")]
    if best:
        name, stats = best
        delta = model.get("vs_baselines", {}).get(name, {})
        items.append((f"best baseline: {name}", num(stats.get("nll_nats"), ".4f", f"backtest:baselines/{name}/nll_nats"),
                      (f"model − {esc(name)}: {num(delta.get('delta_nll_nats'), DELTA_FMT, f'backtest:model/vs_baselines/{name}/delta_nll_nats')} "
                      f"{ci(delta.get('ci95'), DELTA_FMT, f'backtest:model/vs_baselines/{name}/ci95')}")))
    items += [("events scored", num(bt.get("n_scored"), ",d", "backtest:n_scored"),
               f"split: {esc(bt.get('split'))}"),
              ("top-1 accuracy", num(model.get("top1"), ".4f", "backtest:model/top1"),
               f"top-5: {num(model.get('top5'), '.4f', 'backtest:model/top5')}")]
    return cards(items)


def _verdict_note(bt: dict) -> str:
    deltas = bt["model"].get("vs_baselines", {})
    if not deltas:
        return ""
    beaten = [n for n, d in deltas.items() if (d.get("ci95") or [None, None])[1] is not None and d["ci95"][1] < 0]
    lost = [n for n, d in deltas.items() if (d.get("ci95") or [None, None])[0] is not None and d["ci95"][0] > 0]
    if deltas and len(beaten) == len(deltas):
        return note("The model beats <strong>every</strong> baseline on held-out data, each "
                    "with a paired 95% interval below zero.", "good")
    parts = []
    if beaten:
        parts.append(f"beats {esc(', '.join(beaten))}")
    if lost:
        parts.append(f"is <strong>worse</strong> than {esc(', '.join(lost))}")
    rest = [n for n in deltas if n not in beaten and n not in lost]
    if rest:
        parts.append(f"is not distinguishable from {esc(', '.join(rest))}")
    return note("On held-out data the model " + "; ".join(parts) + ".", "bad" if lost else "warn")


def _realism_line(art: Artifacts) -> str:
    """Likelihood is half the story: the generated flow's realism score beside it."""

    realism = (art.facts or {}).get("realism")
    if not realism:
        return ""
    sampling = (art.facts or {}).get("sampling") or {}
    return note(f"Realism of the generated flow ({esc(sampling.get('label', '?'))}, "
                f"{esc(sampling.get('source', '?'))}): {esc(headline(realism))}. "
                "See the stylized-facts section.", "info")


def backtest_section(art: Artifacts) -> Section:
    bt = art.backtest
    title = "Backtest: model vs baselines"
    if bt is None or "model" not in bt:
        why = art.problems.get("backtest.json", "")
        return Section("backtest", title, not_produced("the backtest", art.run_dir / "backtest.json", esc(why)), HOW)
    lineage = bt.get("lineage", {})
    info = key_values([
        ("scored split", (f"{esc(bt.get('split'))}: {num(bt.get('n_tokens'), ',d', 'backtest:n_tokens')} tokens, "
                         f"{num(bt.get('n_scored'), ',d', 'backtest:n_scored')} trade events scored")),
        ("labels", (f"{num(bt.get('n_distinct_labels'), ',d', 'backtest:n_distinct_labels')} distinct tokens, "
                   f"effective vocabulary exp(H) = {num(bt.get('effective_vocab'), '.1f', 'backtest:effective_vocab')}")),
        ("checkpoint", (f"step {esc(lineage.get('checkpoint_step'))}, scored on {esc(lineage.get('device'))} "
                       f"with context {esc(lineage.get('block_size'))} tokens")),
        ("baselines fitted on", esc(lineage.get("baselines_fitted_on", "train"))),
    ])
    body = [_headline(bt), _verdict_note(bt), _realism_line(art)]
    if bt.get("max_tokens"):
        body.append(note(f"Only the first {int(bt['max_tokens']):,} tokens of each symbol's "
                         "backtest shard were scored (<code>--max-tokens</code>): a quick look, "
                         "not the full held-out split.", "warn"))
    body += [info, _main_table(bt), _nll_chart(bt),
             f'<div class="grid2">{_per_field_chart(bt)}{_reliability_chart(bt)}</div>',
             _per_symbol_table(bt), markets_table(bt)]
    return Section("backtest", title, "".join(body), HOW)
