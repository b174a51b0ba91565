"""Section 2: training and validation loss, learning rate, throughput (RUN/metrics.jsonl)."""

from __future__ import annotations

import math

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.charts import MODEL_COLOR, color_of, embed, style
from mega_trading.report.html import Section, cards, duration, esc, not_produced, num

HOW = """<p>Loss is the mean next-token cross-entropy in nats: lower is better. The training
curve (one point per logged step, on random training windows) should fall; the validation
curve is measured on a fixed set of windows from the validation split, which the model
never trains on. A validation loss that rises while training loss keeps falling means
over-fitting. The dotted line <code>ln V</code> is what a uniform guess over the whole
vocabulary scores; a run that stays near it has learned nothing. When the backtest ran,
the best baseline's held-out NLL is drawn too, for scale only: it is measured on the
backtest split and counts event tokens only, so it is close to, not the same as, these
losses.</p><p>Throughput is training tokens per second of optimizer-step time; MFU is
the achieved fraction of the device's peak FLOP/s (on CPU the peak is a measured matmul
rate, so MFU there is only a rough guide).</p>"""


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _best_baseline(backtest: dict | None) -> tuple[str, float] | None:
    if not backtest or not backtest.get("baselines"):
        return None
    name, stats = min(backtest["baselines"].items(), key=lambda kv: kv[1].get("nll_nats", math.inf))
    return name, stats["nll_nats"]


def _loss_chart(art: Artifacts) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    steps, loss = _series(art.metrics, "loss")
    vsteps, vloss = _series(art.metrics, "val_loss")
    fig.add_scatter(x=steps, y=loss, name="train loss", mode="lines+markers",
                    line={"color": MODEL_COLOR, "width": 2}, marker={"size": 4})
    fig.add_scatter(x=vsteps, y=vloss, name="validation loss", mode="lines+markers",
                    line={"color": "#e0a43b", "width": 2}, marker={"size": 7, "symbol": "diamond"})
    vocab = (art.config or {}).get("model", {}).get("vocab_size")
    if vocab:
        fig.add_hline(y=math.log(vocab), line={"color": "#98a2b3", "dash": "dot"},
                      annotation_text=f"ln V = {math.log(vocab):.2f} (uniform guess)",
                      annotation_position="top right")
    best = _best_baseline(art.backtest)
    if best:
        fig.add_hline(y=best[1], line={"color": color_of(best[0]), "dash": "dash"},
                      annotation_text=f"{best[0]} on backtest = {best[1]:.3f}",
                      annotation_position="bottom right")
    style(fig, height=400, xaxis_title="optimizer step", yaxis_title="cross-entropy (nats)")
    return embed(fig, "loss", "Training and validation loss")


def _throughput_chart(records: list[dict]) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    steps, tok_s = _series(records, "tok_per_s")
    fig.add_scatter(x=steps, y=tok_s, name="tokens / s", mode="lines+markers",
                    line={"color": "#2e7d5b"}, marker={"size": 4})
    msteps, mfu = _series(records, "mfu")
    if mfu:
        fig.add_scatter(x=msteps, y=[100 * m for m in mfu], name="MFU %", yaxis="y2",
                        mode="lines", line={"color": "#8e5ea2", "dash": "dot"})
    style(fig, half=True, height=320, xaxis_title="optimizer step", yaxis_title="tokens / s",
          yaxis2={"title": "MFU (%)", "overlaying": "y", "side": "right", "showgrid": False,
                      "rangemode": "tozero"}, yaxis={"rangemode": "tozero"})
    return embed(fig, "throughput", "Throughput")


def _lr_chart(records: list[dict]) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, label, color in (("lr", "AdamW lr", MODEL_COLOR), ("muon_lr", "Muon lr", "#d1495b")):
        steps, values = _series(records, key)
        if values:
            fig.add_scatter(x=steps, y=values, name=label, mode="lines", line={"color": color})
    style(fig, half=True, height=320, xaxis_title="optimizer step", yaxis_title="learning rate",
          yaxis={"type": "log"})
    return embed(fig, "lr", "Learning-rate schedule")


def _headline(art: Artifacts) -> str:
    summary = art.train_summary or {}
    derived = (art.config or {}).get("derived", {})
    last = next((r for r in reversed(art.metrics) if "loss" in r), {})
    if summary:
        loss = num(summary.get("loss"), ".4f", "train_summary:loss")
        val = num(summary.get("val_loss"), ".4f", "train_summary:val_loss")
        first_val = num(summary.get("initial_val_loss"), ".4f", "train_summary:initial_val_loss")
        tok_s = num(summary.get("mean_tok_per_s"), ",.0f", "train_summary:mean_tok_per_s")
        tokens = num(summary.get("tokens_seen"), ",d", "train_summary:tokens_seen")
    else:
        val_records = [r for r in art.metrics if r.get("val_loss") is not None]
        loss = num(last.get("loss"), ".4f")
        val = num(val_records[-1]["val_loss"] if val_records else None, ".4f")
        first_val = num(val_records[0]["val_loss"] if val_records else None, ".4f")
        tok_s = num(last.get("tok_per_s"), ",.0f")
        tokens = num(last.get("tokens"), ",d")
    steps = last.get("step")
    return cards([
        ("optimizer steps", num(steps, ",d"), f"of {esc((art.config or {}).get('train', {}).get('steps', '—'))} configured"),
        ("final train loss", loss, "nats / token"),
        ("validation loss", val, f"at the start: {first_val}"),
        ("tokens seen", tokens,
         f"{derived.get('epochs', 0):.2f} epochs of the train split" if derived else ""),
        ("throughput", tok_s, f"tokens / s; training time {esc(duration(last.get('train_time_s')))}"),
    ])


def training_section(art: Artifacts) -> Section:
    if not art.metrics:
        why = art.problems.get("metrics.jsonl", "")
        return Section("training", "Training", not_produced("training metrics", art.run_dir / "metrics.jsonl", esc(why)), HOW)
    body = [_headline(art), _loss_chart(art),
            f'<div class="grid2">{_throughput_chart(art.metrics)}{_lr_chart(art.metrics)}</div>']
    return Section("training", "Training", "".join(body), HOW)
