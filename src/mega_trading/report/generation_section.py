"""Section 4: real held-out price action beside generated continuations of the same prompt.

Reads RUN/rollouts.parquet (one row per generated token, see generate.py) with its lineage
(the prompts: symbol, split, start position, last real trade) and the real events of the
prompt's shard from the prepared data directory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.charts import (
    DOWN,
    MODEL_COLOR,
    REAL_COLOR,
    UP,
    embed,
    rgba,
    style,
    times_to_iso,
)
from mega_trading.report.html import Section, esc, key_values, not_produced, note, utc

MAX_LINES = 64  # rollouts drawn individually; more would only blur the fan
TARGET_CANDLES = 60
MAX_SINGLE = 4  # prompts drawn side by side when each has a single continuation
BUCKETS_US = [int(s * 1e6) for s in (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600,
                                     900, 1800, 3600, 7200, 14400, 43200, 86400)]

HOW = """<p>The model is given a real stretch of held-out trades (the <em>prompt</em>) and
samples what comes next, trade by trade; each sampled trade is decoded back to a price move,
size and time gap, and prices are chained from the prompt's last real price. The top chart
shows the prompt and what really happened next as candles (open, high, low, close of the
trade prices in fixed time buckets) and overlays every generated continuation of that
same prompt as a line starting where the prompt ends (the dashed vertical line). A good
model produces a fan of plausible paths around the real one; it is not expected to
forecast the real path.</p><p>The second chart pools all prompts: cumulative return in
basis points (1 bp = 0.01%) after each trade, real continuations in black, generated ones
in blue, with medians and 10–90% bands. Comparable spreads mean the model reproduces the
size of short-term price moves.</p>"""


@dataclass
class Prompt:
    rollouts: list[int]
    symbol: str
    split: str
    start_pos: int
    length: int
    last_trade_id: int
    last_price: float
    last_time_us: int


def group_prompts(prompts: list[dict]) -> list[Prompt]:
    """Rollouts that continue the same real window, largest group first."""
    groups: dict[tuple, Prompt] = {}
    for p in prompts:
        key = (p["symbol"], p["split"], int(p["start_pos"]), int(p["length"]))
        if key not in groups:
            groups[key] = Prompt([], p["symbol"], p["split"], int(p["start_pos"]), int(p["length"]),
                                 int(p["last_trade_id"]), float(p["last_price"]), int(p["last_time_us"]))
        groups[key].rollouts.append(int(p["rollout"]))
    return sorted(groups.values(), key=lambda g: (-len(g.rollouts), min(g.rollouts)))


class RealEvents:
    """Real events around the prompts, read prompt by prompt (never a whole split)."""

    def __init__(self, shards):
        self.shards = shards
        self._segs: dict[tuple[str, str], object] = {}

    def _seg_positions(self, split: str, symbol: str):
        key = (split, symbol)
        if key not in self._segs:
            try:
                self._segs[key] = self.shards.seg_positions(split, symbol)
            except (KeyError, OSError):
                self._segs[key] = None
        return self._segs[key]

    def around(self, prompt: Prompt, n_after: int):
        """(prompt events, real continuation) of a prompt; the continuation stops at a new
        segment (a hole in the data), so it never jumps across a gap."""
        segs = self._seg_positions(prompt.split, prompt.symbol)
        if segs is None:
            return None, None
        end = prompt.start_pos + prompt.length
        # the anchor (last event of the window, or the event after a bare SEG) and n_after more
        events = self.shards.events_between_tokens(prompt.split, prompt.symbol, prompt.start_pos,
                                                   end, n_after + 1, segs)
        inside = events.filter(events["token_pos"] < end)
        anchor = np.flatnonzero(events["trade_id"].to_numpy() == prompt.last_trade_id)
        if not len(anchor):
            return inside, None
        after = events.slice(int(anchor[0]) + 1, n_after)
        starts = np.flatnonzero(after["segment_start"].to_numpy())
        if len(starts):
            after = after.head(int(starts[0]))
        if inside.height == 0:  # a bare segment-start prompt: anchor on its first event
            inside = events.slice(int(anchor[0]), 1)
        return inside, after


def _paths(rollouts, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """rollout -> (time_us, price) of its generated trade events, in order."""
    import polars as pl

    frame = rollouts.filter(pl.col("rollout").is_in(ids) & pl.col("is_event")).sort("rollout", "step")
    out = {}
    for (rid,), part in frame.group_by(["rollout"], maintain_order=True):
        out[int(rid)] = (part["time_us"].to_numpy(), part["price"].to_numpy())
    return out


def _bucket_us(span_us: int) -> int:
    for width in BUCKETS_US:
        if span_us / width <= TARGET_CANDLES:
            return width
    return BUCKETS_US[-1]


def _candles(time_us: np.ndarray, price: np.ndarray, t0: int, width: int):
    import polars as pl

    frame = pl.DataFrame({"t": time_us, "p": price}).with_columns(b=(pl.col("t") - t0) // width)
    agg = frame.group_by("b", maintain_order=True).agg(
        o=pl.col("p").first(), h=pl.col("p").max(), lo=pl.col("p").min(), c=pl.col("p").last()).sort("b")
    starts = t0 + agg["b"].to_numpy() * width
    return starts + width // 2, agg


def _candle_chart(prompt: Prompt, inside, after, paths: dict, name: str = "candles",
                  half: bool = False) -> str:
    import plotly.graph_objects as go

    t_first = int(inside["time_us"][0]) if inside is not None and inside.height else prompt.last_time_us
    ends = [prompt.last_time_us] + [int(t[-1]) for t, _ in paths.values() if len(t)]
    if after is not None and after.height:
        ends.append(int(after["time_us"][-1]))
    width = _bucket_us(max(ends) - t_first)
    fig = go.Figure()
    for label, frame, colors, opacity in (("prompt (real)", inside, (UP, DOWN), 1.0),
                                          ("what really followed", after, ("#7fd6bd", "#f2a3a3"), 0.9)):
        if frame is None or not frame.height:
            continue
        x, agg = _candles(frame["time_us"].to_numpy(), frame["price"].to_numpy(), t_first, width)
        fig.add_candlestick(x=times_to_iso(x), open=agg["o"], high=agg["h"], low=agg["lo"],
                            close=agg["c"], name=label, opacity=opacity,
                            increasing={"line": {"color": colors[0]}, "fillcolor": colors[0]},
                            decreasing={"line": {"color": colors[1]}, "fillcolor": colors[1]})
    few = len(paths) <= 3  # a lone path gets a strong line, a fan lighter ones
    for k, (rid, (t, p)) in enumerate(sorted(paths.items())[:MAX_LINES]):
        fig.add_scatter(x=times_to_iso(np.r_[prompt.last_time_us, t]), y=np.r_[prompt.last_price, p],
                        mode="lines", line={"color": rgba(MODEL_COLOR, .9 if few else .5),
                                            "width": 2 if few else 1.3},
                        name="generated continuations", legendgroup="gen", showlegend=k == 0,
                        hovertemplate=f"rollout {rid}<br>%{{x}}<br>%{{y:.2f}}<extra></extra>")
    boundary = times_to_iso([prompt.last_time_us])[0]
    fig.add_shape(type="line", x0=boundary, x1=boundary, y0=0, y1=1, yref="paper",
                  line={"color": "#667085", "dash": "dash", "width": 1})
    fig.add_annotation(x=boundary, y=0, yref="paper", text=" prompt ends", showarrow=False,
                       xanchor="left", yanchor="bottom", font={"size": 11, "color": "#667085"})
    style(fig, height=400 if half else 460, half=half, xaxis_title="time (UTC)",
          yaxis_title=f"{prompt.symbol} price",
          xaxis={"rangeslider": {"visible": False}})
    n = len(prompt.rollouts)
    caption = (f"{esc(prompt.symbol)}, {esc(prompt.split)} split, prompt of {prompt.length} tokens ending "
               f"{esc(utc(prompt.last_time_us))} at {prompt.last_price:g}; {n} generated "
               f"continuation{'s' if n != 1 else ''}; candles of {width / 1e6:g} s.")
    title = ("Real prompt and continuation (candles) vs generated continuations (lines)" if not half
             else f"{prompt.symbol}: real (candles) vs generated (line)")
    return embed(fig, name, title, caption)


def _returns_bps(prices: np.ndarray, start: float, length: int) -> np.ndarray:
    out = np.full(length + 1, np.nan)
    out[0] = 0.0
    values = (np.asarray(prices[:length], dtype=np.float64) / start - 1.0) * 1e4
    out[1:len(values) + 1] = values
    return out


def _fan_chart(prompts: list[Prompt], rollouts, real: RealEvents | None) -> str:
    import plotly.graph_objects as go

    ids = [r for p in prompts for r in p.rollouts]
    paths = _paths(rollouts, ids)
    horizon = max((len(p) for _, p in paths.values()), default=0)
    gen, obs = [], []
    for prompt in prompts:
        for rid in prompt.rollouts:
            if rid in paths:
                gen.append(_returns_bps(paths[rid][1], prompt.last_price, horizon))
        if real is not None:
            _, after = real.around(prompt, horizon)
            if after is not None and after.height:
                obs.append(_returns_bps(after["price"].to_numpy(), prompt.last_price, horizon))
    steps = np.arange(horizon + 1)
    fig = go.Figure()
    for label, rows, color in (("real", obs, REAL_COLOR), ("generated", gen, MODEL_COLOR)):
        if not rows:
            continue
        mat = np.vstack(rows)
        for row in rows[:MAX_LINES]:
            fig.add_scatter(x=steps, y=row, mode="lines", line={"color": rgba(color, .18), "width": 1},
                            legendgroup=label, showlegend=False, hoverinfo="skip")
        # summarize a step only while at least half of the paths still run, so the band
        # does not jump when the longest ones are all that is left
        enough = np.isfinite(mat).sum(axis=0) >= max(1, (len(rows) + 1) // 2)
        with np.errstate(all="ignore"):
            lo, med, hi = (np.where(enough, np.nanquantile(np.where(np.isfinite(mat), mat, np.nan), q, axis=0), np.nan)
                           if enough.any() else np.full(mat.shape[1], np.nan) for q in (0.1, 0.5, 0.9))
        fig.add_scatter(x=steps, y=hi, mode="lines", line={"width": 0}, legendgroup=label,
                        showlegend=False, hoverinfo="skip")
        fig.add_scatter(x=steps, y=lo, mode="lines", line={"width": 0}, fill="tonexty",
                        fillcolor=rgba(color, .15), legendgroup=label, name=f"{label} 10–90%",
                        hoverinfo="skip")
        fig.add_scatter(x=steps, y=med, mode="lines", line={"color": color, "width": 2.5},
                        legendgroup=label, name=f"{label} median ({len(rows)} paths)",
                        hovertemplate=f"{label} median after %{{x}} trades: %{{y:.2f}} bp<extra></extra>")
    style(fig, height=400, xaxis_title="trades after the prompt",
          yaxis_title="cumulative return (bp)")
    return embed(fig, "fan", "Return paths from every prompt: real vs generated",
                 "Each thin line is one continuation, measured from its prompt's last real price.")


def _settings(art: Artifacts, prompts: list[Prompt]) -> str:
    lineage = art.rollouts_lineage
    cfg = lineage.get("config", {})
    sampling = (lineage.get("sampling") or {}).get("settings") or cfg.get("sampling") or {}
    how = (lineage.get("sampling") or {}).get("source", "config")
    frame = art.rollouts
    n_rollouts = frame["rollout"].n_unique()
    n_seg = int(frame["segment_start"].sum()) if "segment_start" in frame.columns else 0
    return key_values([
        ("rollouts", (f"{n_rollouts:,} × {frame.height // max(n_rollouts, 1):,} generated tokens "
                     f"({int(frame['is_event'].sum()):,} trades, {n_seg:,} segment markers)")),
        ("prompts", (f"{len(prompts)} distinct real window(s) from the {esc(cfg.get('prompt_from', '?'))} "
                    f"split, {esc(cfg.get('prompt_length', '?'))} tokens each")),
        ("sampling", (f"temperature {esc(sampling.get('temperature'))}, top-k {esc(sampling.get('top_k'))}, "
                     f"top-p {esc(sampling.get('top_p'))}, min-p {esc(sampling.get('min_p', 0.0))}, "
                     f"tick support {'on' if sampling.get('tick_support') else 'off'} "
                     f"({esc(how)}), seed {esc(lineage.get('seed', cfg.get('seed')))}")),
        ("checkpoint", f"step {esc(lineage.get('step', '—'))}"),
        ("file", f"<code>{esc(art.rollouts_path)}</code>"),
    ])


def generation_section(art: Artifacts) -> Section:
    title = "Generated order flow vs real"
    if art.rollouts is None:
        why = esc(art.problems.get("rollouts.parquet", art.problems.get("rollouts.csv", "")))
        return Section("generation", title, not_produced("generated rollouts", art.run_dir / "rollouts.parquet", why), HOW)
    prompts = group_prompts(art.rollouts_lineage.get("prompts", []))
    if not prompts:
        return Section("generation", title, note("The rollouts file records no prompts in its "
                                                 "lineage, so they cannot be set beside real data.", "warn"), HOW)
    shards = art.shards()
    real = RealEvents(shards) if shards is not None else None
    body = [_settings(art, prompts)]
    if real is None:
        body.append(note("The prepared data directory is not available, so the real prompt and "
                         "continuation cannot be drawn; only generated paths are shown.", "warn"))
    # A fan needs several rollouts of one prompt; when every rollout has its own prompt,
    # a few prompts are shown side by side instead.
    shown = prompts[:1] if len(prompts[0].rollouts) > 1 or len(prompts) == 1 else prompts[:MAX_SINGLE]
    if len(shown) > 1:
        body.append(note(f"Each rollout continues a different prompt, so there is no fan of one prompt: "
                         f"{len(shown)} prompts are shown with their single continuation; the pooled "
                         f"chart below compares all {len(prompts)}.", "info"))
    charts = []
    for i, prompt in enumerate(shown):
        paths = _paths(art.rollouts, prompt.rollouts)
        horizon = max((len(t) for t, _ in paths.values()), default=0)
        inside, after = real.around(prompt, horizon) if real else (None, None)
        charts.append(_candle_chart(prompt, inside, after, paths, "candles" if i == 0 else f"candles-{i + 1}",
                                    half=len(shown) > 1))
    body.append(f'<div class="grid2">{"".join(charts)}</div>' if len(charts) > 1 else charts[0])
    body.append(_fan_chart(prompts, art.rollouts, real))
    return Section("generation", title, "".join(body), HOW)
