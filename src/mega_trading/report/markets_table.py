"""The cross-market / cross-symbol table of the backtest section: one row per stream
(symbol, market), with its events, the model's bits/event, the best baseline on that
stream with the paired CI, and whether the stream was zero-shot. Where the model does not
clearly win, the note under the table says so by name."""

from __future__ import annotations

from mega_trading.report.html import ci, esc, note, num, table

MARKET_NAMES = {"spot": "spot", "um": "USD-M futures"}


def _row(stream: str, info: dict) -> list[str]:
    key = f"backtest:per_symbol/{stream}"
    best = info.get("vs_best_baseline") or {}
    rival = (info.get("vs_unigram") or {}) if info.get("zero_shot") else {}
    rival_key = f"{key}/vs_unigram"
    verdict = best.get("verdict", "—")
    cls = {"model better": "good", "model worse": "bad"}.get(verdict, "neutral")
    return [
        esc(info.get("symbol", stream)),
        esc(MARKET_NAMES.get(info.get("market", "spot"), info.get("market"))),
        num(info.get("n_scored"), ",d", f"{key}/n_scored"),
        num(info.get("model", {}).get("bits_per_event"), ".3f", f"{key}/model/bits_per_event"),
        esc(best.get("baseline", "—")),
        num(best.get("bits_per_event"), ".3f", f"{key}/vs_best_baseline/bits_per_event"),
        num(best.get("delta_bits"), "+.3f", f"{key}/vs_best_baseline/delta_bits")
        + " " + ci(best.get("ci95_bits"), "+.3f", f"{key}/vs_best_baseline/ci95_bits"),
        f'<span class="{cls}">{esc(verdict)}</span>',
        ("yes" if info.get("zero_shot") else "no")
        + (" (vs unigram " + num(rival.get("delta_bits"), "+.3f", f"{rival_key}/delta_bits") + " "
           + ci(rival.get("ci95_bits"), "+.3f", f"{rival_key}/ci95_bits") + ")" if rival else ""),
    ]


def _losses(per_symbol: dict) -> str:
    lost = [s for s, i in per_symbol.items() if (i.get("vs_best_baseline") or {}).get("verdict") == "model worse"]
    unclear = [s for s, i in per_symbol.items()
               if (i.get("vs_best_baseline") or {}).get("verdict") == "no clear difference"]
    if not lost and not unclear:
        return note("On every (symbol, market) the model beats the best baseline with a paired "
                    "95% interval below zero.", "good")
    parts = []
    if lost:
        parts.append(f"the model <strong>loses</strong> to the best baseline on {esc(', '.join(lost))}")
    if unclear:
        parts.append(f"is not distinguishable from it on {esc(', '.join(unclear))}")
    return note("Per (symbol, market): " + "; ".join(parts) + ".", "bad" if lost else "warn")


def markets_table(bt: dict) -> str:
    per_symbol = bt.get("per_symbol", {})
    if not per_symbol:
        return ""
    rows = [_row(stream, info) for stream, info in sorted(per_symbol.items())]
    headers = ["symbol", "market", "events", "model bits/event", "best baseline",
               "its bits/event", "model − best (bits) [paired 95% CI]", "verdict", "zero-shot"]
    caption = ("Per (symbol, market). Spot and USD-M futures of one symbol are different "
               "streams. A zero-shot stream had no training data at all; for it the model is "
               "also compared with unigram.")
    return "<h3>Across markets and symbols</h3>" + table(headers, rows, caption=caption, numeric_from=2) + _losses(per_symbol)
