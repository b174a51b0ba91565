"""The run report: one self-contained HTML file (RUN/report.html) that works offline.

`build_report(run_dir, data_dir=None, out_path=None)` reads only artifacts written by the
earlier stages (the prepared data manifest, tokenizer and events; RUN/config.json,
metrics.jsonl, backtest.json, rollouts.parquet, facts.json and, when present,
simulate.json) and renders them as interactive Plotly charts and tables. Numbers are
copied from the artifacts, never recomputed or typed by hand: each one carries a
``data-key="artifact:json/path"`` attribute so that tests can trace it back.

The page embeds plotly.js inline (no CDN), so it opens from a file:// URL with no network.
A missing optional artifact gives a "not produced in this run" note in its section.

Layout: ``artifacts.py`` reads the files, ``html.py`` holds the page, CSS and table
helpers, ``charts.py`` the Plotly embedding, and one module per section renders it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mega_trading.core.lineage import provenance, write_text_atomic
from mega_trading.report.artifacts import Artifacts, load_artifacts, recorded_data_dir
from mega_trading.report.backtest_section import backtest_section
from mega_trading.report.book_section import book_section
from mega_trading.report.charts import plotly_js
from mega_trading.report.data_section import data_section
from mega_trading.report.facts_section import facts_section
from mega_trading.report.generation_section import generation_section
from mega_trading.report.headline import headline_cards
from mega_trading.report.html import esc, note, page
from mega_trading.report.model_card import model_card_section
from mega_trading.report.simulation_section import simulation_section
from mega_trading.report.training_section import training_section

__all__ = ["build_report", "load_artifacts", "recorded_data_dir", "render_report"]

REPORT_NAME = "report.html"


def _sections(art: Artifacts) -> list:

    builders = (data_section, training_section, backtest_section, generation_section,
                facts_section, simulation_section, model_card_section)
    sections = [build(art) for build in builders]

    book = book_section(art)  # only when RUN/book/ holds `mega-trading book` output
    return sections + ([book] if book is not None else [])


def _subtitle(art: Artifacts) -> str:

    cfg = art.config or {}
    prov = cfg.get("provenance", {})
    step = (art.checkpoint_state or {}).get("step")
    parts = [f"run <code>{esc(art.run_dir.resolve())}</code>"]
    if step is not None:
        parts.append(f"checkpoint step {esc(step)}")
    if prov.get("git_commit"):
        parts.append(f"commit <code>{esc(prov['git_commit'][:12])}</code>")
    return " · ".join(parts)


def _problems_note(art: Artifacts) -> str:

    if not art.problems:
        return ""
    items = "".join(f"<li><strong>{esc(k)}</strong>: {esc(v)}</li>" for k, v in art.problems.items())
    return note(f"Some artifacts could not be read:<ul>{items}</ul>", "bad")


def render_report(art: Artifacts) -> str:
    """The whole HTML page for loaded artifacts."""

    sections = _sections(art)
    # problems and the headline (NLL beside realism and sampling) open the first section
    top = _problems_note(art) + headline_cards(art)
    if top:
        first = sections[0]
        sections[0] = type(first)(first.id, first.title, top + first.body, first.how)
    prov = provenance(stage="report")
    footer = (f"Generated {esc(prov['created_utc'])} by mega-trading {esc(prov['package_version'])} "
              f"(commit <code>{esc(prov['git_commit'])}</code>) from the artifacts in "
              f"<code>{esc(art.run_dir.resolve())}</code>. Self-contained: plotly.js is embedded; "
              f"no network access is needed.")
    return page("Mega-Trading run report", _subtitle(art), sections, plotly_js(), footer)


def build_report(run_dir: str | Path, data_dir: str | Path | None = None,
                 out_path: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """Render RUN's artifacts to one HTML file (default RUN/report.html), written atomically.

    `data_dir` defaults to the data directory recorded in RUN/config.json. Returns the path.
    """

    art = load_artifacts(run_dir, data_dir)
    text = render_report(art)
    for name, why in art.problems.items():
        if log is not None:
            log(f"warning: {name}: {why}")
    out = Path(out_path) if out_path is not None else Path(run_dir) / REPORT_NAME
    write_text_atomic(out, text)
    os.chmod(out, 0o644)  # a report is for sharing; the atomic temp file starts owner-only
    return out
