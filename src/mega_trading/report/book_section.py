"""Order-book section: the rebuild's bookTicker check and the order-book facts.

Shown only when the run holds `mega-trading book` output in ``RUN/book/`` (check.json,
and book_facts.json when the facts were computed); reads nothing else. Every number
carries its ``data-key`` (``book_check:…`` or ``book_facts:…``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.html import Section, cards, ci, esc, note, num, table

BOOK_DIR = "book"

HOW = """<p>The book is rebuilt from a REST snapshot plus depth diffs by Binance's rules; a
break in the update-id chain is a gap, and nothing is trusted until a later snapshot
resyncs the book. Where a <code>@bookTicker</code> message's update id is the last id of
an applied diff, the rebuilt best bid/ask (prices and sizes) must equal it exactly:
<em>checked</em> counts those messages, <em>mismatches</em> must be 0.</p>
<p>Each fact has a block-bootstrap 95 % CI and its value on the first and second half of
the sample. The <em>half gap</em> is the noise floor: two real samples of the same market
already differ by that much, so a model that lands within it is as good as real data.</p>"""

FACT_ROWS = (  # (label, path inside a book's facts, format)
    ("spread: share at one tick", ("spread_ticks", "share_one_tick"), ".3f"),
    ("spread: mean (ticks)", ("spread_ticks", "mean_ticks"), ".3g"),
    ("bid depth, level 1 (base)", ("depth_profile", "bid", "level_1"), ".4g"),
    ("bid depth, per level 2-5", ("depth_profile", "bid", "levels_2_5_per_level"), ".4g"),
    ("bid depth, per level 6-10", ("depth_profile", "bid", "levels_6_10_per_level"), ".4g"),
    ("ask depth, level 1 (base)", ("depth_profile", "ask", "level_1"), ".4g"),
    ("ask depth, per level 2-5", ("depth_profile", "ask", "levels_2_5_per_level"), ".4g"),
    ("ask depth, per level 6-10", ("depth_profile", "ask", "levels_6_10_per_level"), ".4g"),
    ("queue at touch, median (base)", ("queue_at_touch", "median_qty"), ".4g"),
    ("OFI slope, same interval (ticks/qty)", ("ofi", "slope_same_interval_ticks_per_qty"), ".4g"),
    ("OFI slope, next interval (ticks/qty)", ("ofi", "slope_next_interval_ticks_per_qty"), ".4g"),
    ("spread excess 0.1 s after touch-consuming order", ("resilience", "median_spread_excess_ticks_0.1s"), ".3g"),
    ("spread excess 1 s after", ("resilience", "median_spread_excess_ticks_1s"), ".3g"),
    ("spread excess 5 s after", ("resilience", "median_spread_excess_ticks_5s"), ".3g"),
)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _get(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _check_table(check: dict) -> str:
    rows = []
    for name, b in check.get("books", {}).items():
        key = f"book_check:books/{name}"
        rows.append([esc(name), num(b.get("diffs_applied"), ",d", f"{key}/diffs_applied"),
                     num(len(b.get("gaps", [])), "d"), num(b.get("resyncs"), "d", f"{key}/resyncs"),
                     num(b.get("bookticker_checked"), ",d", f"{key}/bookticker_checked"),
                     num(b.get("bookticker_total"), ",d", f"{key}/bookticker_total"),
                     num(b.get("bookticker_mismatches"), "d", f"{key}/bookticker_mismatches")])
    return table(["book", "diffs applied", "gaps", "resyncs", "bookTicker checked",
                  "bookTicker messages", "mismatches"], rows)


def _facts_table(name: str, book: dict) -> str:
    rows = []
    for label, path, spec in FACT_ROWS:
        fact = _get(book, path) or {}
        base = f"book_facts:books/{name}/{'/'.join(path)}"

        def key(field: str, fact=fact, base=base) -> str | None:
            return f"{base}/{field}" if fact.get(field) is not None else None

        rows.append([esc(label), num(fact.get("value"), spec, key("value")),
                     ci(fact.get("ci95"), spec, key("ci95")),
                     num(fact.get("first_half"), spec, key("first_half")),
                     num(fact.get("second_half"), spec, key("second_half")),
                     num(fact.get("half_gap"), spec, key("half_gap")),
                     num(fact.get("n"), ",d", key("n"))])
    ratio = book.get("cancel_to_trade", {})
    extra = (f"<p>Cancel-to-trade: {num(ratio.get('volume_ratio'), '.3g')} cancelled size per "
             f"traded size, {num(ratio.get('decreases_per_trade'), '.3g')} level decreases per "
             f"trade. Resilience sample: {num(book.get('resilience', {}).get('touch_consuming_orders'), 'd')} "
             "touch-consuming taker orders.</p>")
    warnings = "".join(note(esc(w), "warn") for w in book.get("warnings", []))
    return (f"<h3>{esc(name)}</h3>" + warnings + table(
        ["fact", "value", "95 % CI", "first half", "second half", "half gap (noise floor)", "n"],
        rows) + extra)


def book_section(art: Artifacts) -> Section | None:
    """None when the run has no book output (the section is then left out)."""
    folder = art.run_dir / BOOK_DIR
    check = _load(folder / "check.json")
    if check is None:
        return None
    facts = _load(folder / "book_facts.json") or {}
    mismatches = check.get("bookticker_mismatches")
    body = cards([
        ("bookTicker checked", num(check.get("bookticker_checked"), ",d", "book_check:bookticker_checked"),
         f"of {num(check.get('bookticker_total'), ',d', 'book_check:bookticker_total')} messages"),
        ("mismatches", num(mismatches, "d", "book_check:bookticker_mismatches"), "target 0"),
        ("gaps / resyncs", f"{num(len(check.get('gaps', [])), 'd')} / "
         f"{num(check.get('resyncs'), 'd', 'book_check:resyncs')}", "sequence breaks"),
    ]) + _check_table(check)
    if mismatches:
        body = note("The rebuilt book disagrees with the exchange's bookTicker.", "bad") + body
    for name, book in facts.get("books", {}).items():
        body += _facts_table(name, book)
    if not facts:
        body += note("Order-book facts not computed (<code>book --no-facts</code>).", "missing")
    return Section("order-book", "Order book", body, HOW)
