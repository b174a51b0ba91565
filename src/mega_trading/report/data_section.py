"""Section 1: data lineage (inputs, checksums, splits, token counts, tokenizer)."""

from __future__ import annotations

import math

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.charts import embed, rgba, style, times_to_iso
from mega_trading.report.html import (
    Section,
    cards,
    duration,
    esc,
    key_values,
    not_produced,
    num,
    short_hash,
    table,
    utc,
)

SPLITS = ("train", "validation", "backtest")
SPLIT_COLORS = {"train": "#1f4e9c", "validation": "#e0a43b", "backtest": "#12a37f",
                "gap": "#d0d5dd", "files": "#667085"}

HOW = """<p>Where every number in this report comes from. Each symbol's trades are cut
<em>in time order</em> into train, validation and backtest splits; a gap of
<code>gap_events</code> trades is dropped after each boundary so that no training window
touches held-out data. The tokenizer's bins are fitted on the train split only. The input
files are identified by their SHA-256, and the whole prepared data set by its manifest hash:
two reports with the same manifest hash were computed on identical tokens.</p>
<p>The first chart lays the splits out in <em>event order</em> (trade counts, so short
splits stay visible); the second shows the same data on the calendar, where the gaps
between input files appear.</p>"""


def _symbols(manifest: dict) -> list[str]:
    names = set(manifest.get("boundaries", {}))
    for by_symbol in manifest.get("shards", {}).values():
        names.update(by_symbol)
    return sorted(names)


def _event_order_chart(manifest: dict) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    shown = set()
    for symbol in _symbols(manifest):
        bounds = manifest.get("boundaries", {}).get(symbol, {})
        gap = int(bounds.get("gap_events") or 0)
        offset = 0
        for i, split in enumerate(SPLITS):
            info = manifest["shards"].get(split, {}).get(symbol)
            n = int(info["n_events"]) if info else 0
            if i and gap:
                fig.add_bar(y=[symbol], x=[gap], base=[offset], orientation="h",
                            marker_color=SPLIT_COLORS["gap"], name="gap (dropped)",
                            legendgroup="gap", showlegend="gap" not in shown,
                            hovertemplate=f"gap: {gap:,} events dropped<extra>{esc(symbol)}</extra>")
                shown.add("gap")
                offset += gap
            if not n:
                continue
            hover = (f"{split}: {n:,} events<br>{utc(info.get('start_time_us'))}"
                     f"<br>→ {utc(info.get('end_time_us'))}<extra>{esc(symbol)}</extra>")
            fig.add_bar(y=[symbol], x=[n], base=[offset], orientation="h",
                        marker_color=SPLIT_COLORS[split], name=split, legendgroup=split,
                        showlegend=split not in shown, hovertemplate=hover,
                        text=[f"{split} {n:,}"], textposition="inside", insidetextanchor="middle")
            shown.add(split)
            offset += n
    style(fig, height=150 + 60 * len(_symbols(manifest)), barmode="overlay",
          uniformtext={"mode": "hide", "minsize": 10},
          xaxis_title="events, in time order", yaxis={"autorange": "reversed"})
    return embed(fig, "split-timeline", "Split timeline per symbol (event order)",
                 "Bars are trade counts; grey blocks are the dropped gaps between splits.")


def _calendar_chart(manifest: dict) -> str:
    """Each input file's time span per symbol, with the split boundaries as markers."""
    import plotly.graph_objects as go

    fig = go.Figure()
    used = [i for i in manifest.get("inputs", []) if i.get("first_time_us") and i.get("symbol")]
    for k, info in enumerate(used):
        label = f"{info['symbol']} files"
        fig.add_scatter(
            x=times_to_iso([info["first_time_us"], info["last_time_us"]]), y=[label, label],
            mode="lines+markers", line={"color": SPLIT_COLORS["files"], "width": 10},
            marker={"size": 11, "symbol": "line-ns-open", "color": SPLIT_COLORS["files"]},
            name="input file", legendgroup="files", showlegend=k == 0,
            hovertemplate=(f"{esc(info.get('name'))}<br>{utc(info['first_time_us'])}<br>→ "
                           f"{utc(info['last_time_us'])}<br>{int(info.get('rows', 0)):,} rows"
                           "<extra></extra>"))
    for split in SPLITS:
        xs, ys, texts = [], [], []
        for symbol, bounds in sorted(manifest.get("boundaries", {}).items()):
            for edge in ("start", "end"):
                stamp = bounds.get(f"{split}_{edge}_us")
                if stamp:
                    xs.append(stamp)
                    ys.append(f"{symbol} splits")
                    texts.append(f"{split} {edge}: {utc(stamp)}")
        if xs:
            fig.add_scatter(x=times_to_iso(xs), y=ys, mode="markers", name=split,
                            marker={"size": 12, "symbol": "diamond", "color": rgba(SPLIT_COLORS[split], .85),
                                        "line": {"width": 1, "color": "#fff"}},
                            text=texts, hovertemplate="%{text}<extra></extra>")
    rows = len({i["symbol"] for i in used}) * 2
    style(fig, height=140 + 45 * max(rows, 2), xaxis_title="time (UTC)")
    return embed(fig, "calendar", "Calendar coverage: input files and split boundaries",
                 "Each grey bar is one input file (its first to last trade); diamonds mark where "
                 "each split starts and ends.")


def _shard_table(manifest: dict) -> str:
    rows = []
    for split in SPLITS:
        for symbol, info in sorted(manifest.get("shards", {}).get(split, {}).items()):
            key = f"manifest:shards/{split}/{symbol}"
            span = None
            if info.get("start_time_us") and info.get("end_time_us"):
                span = (info["end_time_us"] - info["start_time_us"]) / 1e6
            rows.append([esc(split), esc(symbol), num(info.get("n_events"), ",d", f"{key}/n_events"),
                         num(info.get("n_tokens"), ",d", f"{key}/n_tokens"),
                         num(info.get("n_windows"), ",d", f"{key}/n_windows"),
                         esc(utc(info.get("start_time_us"))), esc(utc(info.get("end_time_us"))),
                         esc(duration(span))])
    return table(["split", "symbol", "events", "tokens", "windows", "first trade", "last trade",
                  "span"], rows, numeric_from=2,
                 caption="Shards: one token file per split and symbol (windows never cross a shard).")


def _input_table(manifest: dict) -> str:
    rows = []
    for i, info in enumerate(manifest.get("inputs", [])):
        note = esc(info.get("skipped", ""))
        rows.append([esc(info.get("name") or info.get("path")), esc(info.get("symbol", "")),
                     esc(info.get("kind", "")), num(info.get("rows"), ",d", f"manifest:inputs/{i}/rows"),
                     esc(utc(info.get("first_time_us"))), esc(utc(info.get("last_time_us"))),
                     f"<code>{esc(info.get('sha256'))}</code>" + (f" <span class='muted'>{note}</span>" if note else "")])
    return table(["file", "symbol", "kind", "rows", "first trade", "last trade", "SHA-256"], rows,
                 numeric_from=3, caption="Input files (checksums of the exact bytes read).")


def _token_stats_table(manifest: dict) -> str:
    rows = []
    token_stats = manifest.get("token_stats", {})
    for split in sorted(token_stats, key=lambda name: (SPLITS + (name,)).index(name)):
        stats = token_stats[split]
        key = f"manifest:token_stats/{split}"
        rows.append([esc(split), num(stats.get("n_events"), ",d", f"{key}/n_events"),
                     num(stats.get("n_tokens"), ",d", f"{key}/n_tokens"),
                     num(stats.get("realized_vocab"), ",d", f"{key}/realized_vocab"),
                     num(stats.get("effective_vocab"), ".1f", f"{key}/effective_vocab")])
    return table(["split", "events", "tokens (with segment markers)", "distinct event tokens",
                  "effective vocab exp(H)"], rows,
                 caption=f"Token statistics (vocabulary {esc(manifest.get('vocab_size'))} ids).")


def _dt_text(log_us: float) -> str:
    if log_us == 0:
        return "0"
    seconds = math.exp(log_us) / 1e6
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _tokenizer_table(tok: dict) -> str:
    fields = tok.get("fields", {})
    order = tok.get("field_order") or list(fields)
    units = {"side": "", "move": " bps", "size": " (log notional vs its recent level)", "dt": ""}
    rows = []
    for name in order:
        info = fields.get(name, {})
        reps = info.get("representatives", [])
        # dt bins are fitted on ln(µs) (0 is the exact-zero bin): show them as durations
        texts = [_dt_text(r) for r in reps] if name == "dt" else [f"{r:.4g}" for r in reps]
        shown = ", ".join(texts[:16]) + (" …" if len(texts) > 16 else "")
        rows.append([esc(name), num(info.get("n_bins"), "d", f"tokenizer:fields/{name}/n_bins"),
                     f"<span class='muted'>{esc(shown)}{esc(units.get(name, ''))}</span>"])
    return table(["field", "bins", "representative value per bin (training median)"], rows,
                 numeric_from=99,
                 caption="Tokenizer: each trade is one token, the mixed-radix product of its field bins.")


def data_section(art: Artifacts) -> Section:
    manifest = art.manifest
    if manifest is None:
        where = art.data_dir / "manifest.json" if art.data_dir else "DATA/manifest.json"
        hint = ("Pass the prepared data directory with <code>--data DIR</code>."
                if art.data_dir is None or not art.data_dir.is_dir() else "")
        return Section("data", "Data lineage", not_produced("the prepared data manifest", where, hint), HOW)
    stats = manifest.get("token_stats", {})
    prov = manifest.get("provenance", {})
    head = cards([
        ("symbols", esc(", ".join(_symbols(manifest))), f"kind: {esc(manifest.get('kind'))}"),
        ("train events", num(stats.get("train", {}).get("n_events"), ",d", "manifest:token_stats/train/n_events"),
         "tokenizer fitted here only"),
        ("held-out events", num(stats.get("backtest", {}).get("n_events"), ",d",
                                "manifest:token_stats/backtest/n_events"), "backtest split"),
        ("vocabulary", num(manifest.get("vocab_size"), ",d", "manifest:vocab_size"),
         f"{esc(stats.get('train', {}).get('realized_vocab', '—'))} event tokens seen in train"),
    ])
    ids = key_values([
        ("data directory", f"<code>{esc(art.data_dir)}</code>"),
        ("manifest hash", short_hash(manifest.get("manifest_hash"), 64)),
        ("tokenizer hash", short_hash(manifest.get("tokenizer_hash"), 64)),
        ("prepared with", (f"mega-trading {esc(prov.get('package_version'))}, commit "
                          f"<code>{esc(prov.get('git_commit'))}</code>, {esc(prov.get('created_utc'))}")),
        ("split rule", esc(_split_rule(manifest.get("config", {})))),
    ])
    body = [head, ids, _event_order_chart(manifest), _calendar_chart(manifest),
            _shard_table(manifest), _input_table(manifest), _token_stats_table(manifest)]
    if art.tokenizer:
        body.append(_tokenizer_table(art.tokenizer))
    return Section("data", "Data lineage", "".join(body), HOW)


def _split_rule(cfg: dict) -> str:
    if cfg.get("split_times"):
        times = cfg["split_times"]
        rule = f"validation from {times[0]}, backtest from {times[1]}"
    else:
        fractions = cfg.get("splits") or []
        rule = "event fractions " + " / ".join(f"{f:g}" for f in fractions) + " (train / validation / backtest)"
    gap = cfg.get("gap_events")
    gap_text = f"{gap:,}" if gap is not None else f"{cfg.get('block_size', '?')} (one block)"
    return f"{rule}; gap after each boundary: {gap_text} events; block {cfg.get('block_size')}, stride {cfg.get('stride')}"
