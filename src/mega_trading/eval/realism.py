"""Realism as one headline number per source, from the stylized-fact gaps of ``facts.py``.

For each of the 11 fact gaps (``facts.fact_gaps``: a source's facts vs the real reference
events), the NOISE FLOOR is the gap of real training events to the same reference: how
far two real samples of the market already are. Per source (model, compound Hawkes,
Markov-3, tokenized real):

* ``within``: facts whose gap is at most ``WITHIN_FACTOR`` (1.5) x the noise floor's;
* ``beat_reference``: facts where the source's gap is below compound Hawkes's;
* ``geo_mean_ratio``: the geometric mean over facts of gap / noise-floor gap (lower is
  better; 1 = as close as another real sample). A ratio below ``RATIO_FLOOR`` counts as
  ``RATIO_FLOOR``: closeness beyond a tenth of the real-vs-real gap is not measurable, and
  an exact 0 (a fact the tokenizer preserves, such as the share of zero gaps) would
  otherwise send the log to -inf;
* ``geo_ci95``: a 95 % bootstrap interval of the geometric mean over resamplings of the
  SOURCE's events in blocks (``block_events`` contiguous events inside one rollout /
  segment, resampled with replacement; a block never crosses a group boundary). The
  reference and noise floor are held fixed, so the interval is the source's own sampling
  noise: two sources whose intervals overlap are not told apart by this data.

Pure functions over facts and event frames: no model, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.eval.facts import compute_facts, fact_gaps
from mega_trading.eval.statistics import prepare_events

WITHIN_FACTOR = 1.5
RATIO_FLOOR = 0.1
REFERENCE_SOURCE = "compound_hawkes"


def gap_ratios(gaps: Mapping[str, float | None],
               floor: Mapping[str, float | None]) -> dict[str, float]:
    """gap / noise-floor gap per fact (facts where either is missing or the floor is 0
    are left out), floored at RATIO_FLOOR."""
    out = {}
    for name, gap in gaps.items():
        base = floor.get(name)
        if gap is None or base is None or not base > 0 or not math.isfinite(gap):
            continue
        out[name] = max(gap / base, RATIO_FLOOR)
    return out


def geo_mean(ratios: Mapping[str, float]) -> float | None:
    values = np.array(list(ratios.values()), dtype=np.float64)
    return float(np.exp(np.log(values).mean())) if values.size else None


def score_source(gaps: Mapping[str, float | None], floor: Mapping[str, float | None],
                 reference: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """within / beat_reference / geo_mean_ratio of one source's gaps (no CI)."""
    ratios = gap_ratios(gaps, floor)
    beat = None
    if reference is not None:
        beat = sum(1 for name, gap in gaps.items()
                   if gap is not None and reference.get(name) is not None
                   and gap < reference[name])
    return {
        "n_facts": len(ratios),
        "within": sum(1 for r in ratios.values() if r <= WITHIN_FACTOR),
        "beat_reference": beat,
        "geo_mean_ratio": geo_mean(ratios),
        "ratios": ratios,
    }


def block_groups(ev: Any, block_events: int) -> np.ndarray:
    """Block id per row of ``facts.PreparedEvents``: blocks of ``block_events``
    consecutive events inside one group."""
    first = np.r_[True, ev.group[1:] != ev.group[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(ev.n), 0))
    position = np.arange(ev.n) - start
    key = ev.group * (ev.n + 1) + position // block_events
    return np.cumsum(np.r_[True, key[1:] != key[:-1]]) - 1


def resample_blocks(events: pl.DataFrame, block_events: int,
                    rng: np.random.Generator) -> pl.DataFrame:
    """One block-bootstrap replicate of an event table: as many blocks as it has, drawn with
    replacement, each its own group (column ``rollout``), in the ``facts`` layout."""

    ev = prepare_events(events)
    blocks = block_groups(ev, block_events)
    n_blocks = int(blocks[-1]) + 1 if blocks.size else 0
    starts = np.searchsorted(blocks, np.arange(n_blocks), side="left")
    ends = np.searchsorted(blocks, np.arange(n_blocks), side="right")
    drawn = rng.integers(0, n_blocks, size=n_blocks)
    rows = np.concatenate([np.arange(starts[b], ends[b]) for b in drawn])
    group = np.repeat(np.arange(n_blocks), (ends - starts)[drawn])
    return pl.DataFrame({
        "rollout": group, "side": ev.sign[rows].astype(np.int8), "move_bps": ev.returns[rows],
        "log_size": ev.log_size[rows], "dt_us": ev.dt_us[rows].astype(np.int64),
        "time_us": ev.time_us[rows],
    })


def geo_mean_ci(events: pl.DataFrame, real_facts: Mapping[str, Any],
                floor: Mapping[str, float | None], facts_cfg: Any, n_boot: int,
                block_events: int, rng: np.random.Generator) -> list[float | None]:
    """95 % block-bootstrap interval of one source's geometric-mean ratio."""

    if n_boot <= 0:
        return [None, None]
    values = []
    for _ in range(n_boot):
        replicate = resample_blocks(events, block_events, rng)
        try:
            facts = compute_facts(replicate, facts_cfg)
        except DataError:  # a replicate too small for the facts: skip it
            continue
        g = geo_mean(gap_ratios(fact_gaps(facts, real_facts), floor))
        if g is not None:
            values.append(g)
    if len(values) < max(10, n_boot // 2):
        return [None, None]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def realism_block(fact_gap_section: Mapping[str, Mapping[str, Any]],
                  frames: Mapping[str, pl.DataFrame | None], real_facts: Mapping[str, Any],
                  facts_cfg: Any, n_boot: int = 50, block_events: int = 256,
                  seed: int = 0) -> dict[str, Any]:
    """The ``realism`` block of facts.json from its ``fact_gaps`` section.

    frames: the event table of each source ("model" and baseline names) for the CI.
    """
    def column(source: str) -> dict[str, float | None]:
        if source in ("noise_floor", "model"):
            return {fact: row.get(source) for fact, row in fact_gap_section.items()}
        return {fact: row.get("baselines", {}).get(source) for fact, row in fact_gap_section.items()}

    floor = column("noise_floor")
    reference = column(REFERENCE_SOURCE)
    names = ["model", *next(iter(fact_gap_section.values())).get("baselines", {})]
    rng = np.random.default_rng(seed)
    sources = {}
    for name in names:
        gaps = column(name)
        if all(v is None for v in gaps.values()):
            continue
        score = score_source(gaps, floor, None if name == REFERENCE_SOURCE else reference)
        frame = frames.get(name)
        score["geo_ci95"] = (geo_mean_ci(frame, real_facts, floor, facts_cfg, n_boot,
                                         block_events, rng) if frame is not None else [None, None])
        sources[name] = score
    return {"within_factor": WITHIN_FACTOR, "ratio_floor": RATIO_FLOOR,
            "reference": REFERENCE_SOURCE, "n_boot": n_boot, "block_events": block_events,
            "n_facts": len(fact_gap_section), "sources": sources}


def headline(block: Mapping[str, Any] | None, source: str = "model") -> str:
    """'9/11 within 1.5x floor, beats Hawkes on 8/11, geo 1.21 [1.10, 1.35] (Hawkes 1.66)'."""
    if not block or source not in block.get("sources", {}):
        return "realism: not measured"
    s = block["sources"][source]
    ref = block["sources"].get(block["reference"], {})
    ci = s.get("geo_ci95") or [None, None]
    ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""
    beat = (f", beats Hawkes on {s['beat_reference']}/{s['n_facts']}"
            if s.get("beat_reference") is not None else "")
    ref_geo = ref.get("geo_mean_ratio")
    ref_text = f" (Hawkes {ref_geo:.2f})" if ref_geo is not None else ""
    geo = s.get("geo_mean_ratio")
    geo_text = f"{geo:.2f}" if geo is not None else "n/a"
    return (f"{s['within']}/{s['n_facts']} facts within {block['within_factor']:g}x noise floor"
            f"{beat}, geo-mean gap/floor {geo_text}{ci_text}{ref_text}")
