"""The report's first screen: backtest NLL beside the realism score and the sampling that
produced the generated flow (copied from backtest.json, facts.json, sampling.json and
calibration.json, never recomputed)."""

from __future__ import annotations

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.html import cards, ci, esc, num


def headline_cards(art: Artifacts) -> str:
    items = []
    bt = art.backtest or {}
    if bt.get("model"):
        items.append(("backtest NLL", num(bt["model"].get("nll_nats"), ".4f", "backtest:model/nll_nats"),
                      f"nats / event on the {esc(bt.get('split'))} split; 95% CI "
                      f"{ci(bt['model'].get('nll_nats_ci95'), '.4f', 'backtest:model/nll_nats_ci95')}"))
    realism = (art.facts or {}).get("realism") or {}
    model = realism.get("sources", {}).get("model")
    if model:
        ref = realism["sources"].get(realism.get("reference"), {})
        items.append((
            "realism (geo-mean gap / noise floor)",
            num(model.get("geo_mean_ratio"), ".2f", "facts:realism/sources/model/geo_mean_ratio"),
            f"95% CI {ci(model.get('geo_ci95'), '.2f', 'facts:realism/sources/model/geo_ci95')}; "
            f"compound Hawkes {num(ref.get('geo_mean_ratio'), '.2f', 'facts:realism/sources/compound_hawkes/geo_mean_ratio')}; "
            "1 = as close as another real sample, lower is better"))
        items.append((
            "facts within 1.5x noise floor",
            f"{num(model.get('within'), 'd', 'facts:realism/sources/model/within')} / "
            f"{num(model.get('n_facts'), 'd', 'facts:realism/sources/model/n_facts')}",
            f"better than compound Hawkes on "
            f"{num(model.get('beat_reference'), 'd', 'facts:realism/sources/model/beat_reference')}"))
    sampling = (art.facts or {}).get("sampling") or art.rollouts_lineage.get("sampling")
    if sampling:
        chosen = art.sampling or {}
        sub = esc(f"source: {sampling.get('source')}")
        if chosen.get("score") is not None:
            sub += (f"; chosen on the {esc(chosen.get('split'))} split, score "
                    f"{num(chosen.get('score'), '.3f', 'sampling:score')}")
        items.append(("sampling", esc(sampling.get("label")), sub))
    cal = art.calibration or {}
    if cal.get("temperature") is not None:
        items.append(("calibrated temperature", num(cal["temperature"], ".3f", "calibration:temperature"),
                      f"{esc(cal.get('split'))} NLL {num(cal.get('before', {}).get('nll_nats'), '.4f', 'calibration:before/nll_nats')}"
                      f" → {num(cal.get('after', {}).get('nll_nats'), '.4f', 'calibration:after/nll_nats')}; ECE "
                      f"{num(cal.get('before', {}).get('ece'), '.4f', 'calibration:before/ece')} → "
                      f"{num(cal.get('after', {}).get('ece'), '.4f', 'calibration:after/ece')}"
                      + _calibrated_backtest(bt)))
    return cards(items) if items else ""


def _calibrated_backtest(bt: dict) -> str:
    cal = bt.get("calibrated") or {}
    if cal.get("nll_nats") is None:
        return ""
    return (f"; at this T the backtest NLL is {num(cal['nll_nats'], '.4f', 'backtest:calibrated/nll_nats')}"
            f" (ECE {num(cal.get('ece'), '.4f', 'backtest:calibrated/ece')} vs "
            f"{num(bt.get('model', {}).get('ece'), '.4f', 'backtest:model/ece')} at T = 1)")
