"""Section 7: the model card (what was trained, on what, by which code, and its limits)."""

from __future__ import annotations

import json
import math
from typing import Any

from mega_trading.report.artifacts import Artifacts
from mega_trading.report.html import (
    Section,
    duration,
    esc,
    key_values,
    note,
    num,
    short_hash,
    table,
)

HOW = """<p>A summary of what this model is and is not. The hashes tie every artifact to the
exact data and tokenizer: the lineage table flags any artifact made with other data. The
limitations are derived from this run's own numbers (data size, training length,
backtest result), so they change when the run changes.</p>"""


def _lineages(art: Artifacts) -> list[tuple[str, dict]]:
    """(artifact, its lineage record) for every artifact that records one."""
    out = []
    if art.manifest:
        out.append(("data manifest", {**art.manifest.get("provenance", {}),
                                      "tokenizer_hash": art.manifest.get("tokenizer_hash"),
                                      "manifest_hash": art.manifest.get("manifest_hash")}))
    if art.config:
        out.append(("config.json (train)", {**art.config.get("provenance", {}),
                                            "tokenizer_hash": art.config.get("tokenizer_hash"),
                                            "manifest_hash": art.config.get("manifest_hash")}))
    if art.checkpoint_state:
        state = art.checkpoint_state
        out.append((f"checkpoint step {state.get('step')}", {
            **state.get("provenance", {}), "git_commit": state.get("git_commit"),
            "tokenizer_hash": state.get("tokenizer_hash"), "manifest_hash": state.get("manifest_hash")}))
    if art.backtest:
        out.append(("backtest.json", art.backtest.get("lineage", {})))
    if art.rollouts is not None:
        out.append(("rollouts", art.rollouts_lineage))
    for name, doc in (("facts.json", art.facts), ("simulate.json", art.simulate)):
        if doc:
            out.append((name, doc.get("lineage") or doc.get("provenance") or {}))
    return out


def _commit(value: str | None) -> str:
    if not value:
        return '<span class="muted">—</span>'
    dirty = " (dirty)" if value.endswith("-dirty") else ""
    return f'<code title="{esc(value)}">{esc(value[:12])}</code>{dirty}'


def _lineage_table(art: Artifacts) -> tuple[str, list[str]]:
    entries = _lineages(art)
    reference = {}
    for _, record in entries:
        for key in ("tokenizer_hash", "manifest_hash"):
            reference.setdefault(key, record.get(key))
    mismatched, rows = [], []
    for name, record in entries:
        checks = []
        for key in ("tokenizer_hash", "manifest_hash"):
            value = record.get(key)
            if value is None:
                checks.append('<span class="muted">not recorded</span>')
            elif value == reference.get(key):
                checks.append('<span class="good" title="matches">✓</span>')
            else:
                checks.append('<span class="bad">✗ differs</span>')
                mismatched.append(name)
        rows.append([esc(name), esc(record.get("created_utc", "—")),
                     _commit(record.get("git_commit")),
                     short_hash(record.get("tokenizer_hash")) + " " + checks[0],
                     short_hash(record.get("manifest_hash")) + " " + checks[1]])
    html = table(["artifact", "created (UTC)", "git commit", "tokenizer", "data manifest"], rows,
                 numeric_from=99, caption="Lineage of each artifact read by this report.")
    return html, sorted(set(mismatched))


def _data_hours(manifest: dict | None) -> float | None:
    if not manifest:
        return None
    spans = [(i["last_time_us"] - i["first_time_us"]) / 3.6e9 for i in manifest.get("inputs", [])
             if i.get("first_time_us") and i.get("last_time_us") and "skipped" not in i]
    return sum(spans) if spans else None


def _limitations(art: Artifacts) -> list[str]:
    items = []
    manifest, cfg = art.manifest or {}, art.config or {}
    train_cfg, derived = cfg.get("train", {}), cfg.get("derived", {})
    train_stats = manifest.get("token_stats", {}).get("train", {})
    hours = _data_hours(art.manifest)
    if train_stats:
        n = train_stats.get("n_events", 0)
        size = "a tiny sample" if n < 1_000_000 else "a modest sample" if n < 100_000_000 else "a large sample"
        covered = f", covering about {duration(hours * 3600)} of trading" if hours is not None else ""
        items.append(f"Trained on {size}: {n:,} training trades from {len(manifest.get('inputs', []))} "
                     f"input file(s){covered}. It has seen few market regimes; do not expect it to "
                     f"generalize to other periods or symbols.")
    steps = train_cfg.get("steps")
    if steps is not None:
        device = train_cfg.get("device", "?")
        if art.backtest:
            device = art.backtest.get("lineage", {}).get("device", device)
        short = steps < 2000
        epochs = derived.get("epochs")
        epochs_text = f" ({epochs:.2f} epochs of the train split)" if epochs is not None else ""
        items.append(f"{'A short' if short else 'A'} training run: {steps:,} optimizer steps, "
                     f"{derived.get('total_tokens', 0):,} tokens{epochs_text}, on {esc(device)}."
                     + (" The numbers here are a smoke test of the pipeline, not a tuned result."
                        if short else ""))
    bt = art.backtest
    if bt and bt.get("model"):
        deltas = bt["model"].get("vs_baselines", {})
        best = min(bt.get("baselines", {}).items(), key=lambda kv: kv[1].get("nll_nats", math.inf),
                   default=None)
        if best:
            d = deltas.get(best[0], {})
            hi = (d.get("ci95") or [None, None])[1]
            if hi is None or hi >= 0:
                items.append(f"The model does <strong>not</strong> beat the best baseline "
                             f"({esc(best[0])}) on held-out data: its NLL is "
                             f"{bt['model']['nll_nats']:.3f} vs {best[1]['nll_nats']:.3f} nats.")
        items.append(f"The backtest scores {bt.get('n_scored', 0):,} held-out trades"
                     + (f" (only the first {bt['max_tokens']:,} tokens per symbol)" if bt.get("max_tokens") else "")
                     + "; the confidence intervals show how much that is worth.")
        zero = [s for s, v in bt.get("per_symbol", {}).items() if v.get("zero_shot")]
        if zero:
            items.append(f"Zero-shot symbols (no training data): {esc(', '.join(zero))}.")
    if art.tokenizer:
        sizes = art.tokenizer.get("stats", {}).get("field_sizes") or {
            k: v.get("n_bins") for k, v in art.tokenizer.get("fields", {}).items()}
        grid = " × ".join(f"{v} {k}" for k, v in sizes.items())
        items.append(f"Each trade is quantized to one token ({esc(grid)} bins): detail inside a bin is "
                     f"lost, and generated trades take the bin's training median.")
    block = cfg.get("model", {}).get("block_size")
    if block:
        items.append(f"The model sees at most {block} past trades; generation beyond that slides "
                     f"the window, so longer memory in order flow is out of its reach.")
    items.append("Only trades are modelled: no order book, fees, latency or market impact. "
                 "This is a research artifact, not a trading strategy or investment advice.")
    return items


def _params(art: Artifacts) -> str:
    derived = (art.config or {}).get("derived", {})
    if derived.get("n_params") is not None:
        hidden = derived.get("n_params_hidden")
        sub = (f" ({num(hidden, ',d', 'config:derived/n_params_hidden')} without embeddings)"
               if hidden is not None else "")
        return num(derived["n_params"], ",d", "config:derived/n_params") + sub
    if art.checkpoint_params is not None:
        return f"{art.checkpoint_params:,} (counted in the checkpoint)"
    return "—"


def model_card_section(art: Artifacts) -> Section:
    cfg = art.config or {}
    model, train = cfg.get("model", {}), cfg.get("train", {})
    body = []
    if not cfg:
        body.append(note(f"<code>{esc(art.run_dir / 'config.json')}</code> does not exist: the "
                         "training configuration is unknown.", "missing"))
    arch = (f"Llama-style decoder: {model.get('n_layer', '?')} layers, d_model {model.get('d_model', '?')}, "
            f"{model.get('n_head', '?')} query / {model.get('n_kv_head', '?')} key-value heads, "
            f"SwiGLU {model.get('ffn_hidden', '?')}, RoPE θ={model.get('rope_theta', '?')}, "
            f"{'tied' if model.get('tie_embeddings') else 'untied'} embeddings") if model else "—"
    last = next((r for r in reversed(art.metrics) if "train_time_s" in r), {})
    manifest = art.manifest or {}
    symbols = sorted({i.get("symbol") for i in manifest.get("inputs", []) if i.get("symbol")})
    body.append(key_values([
        ("model", esc(arch) + (f" (preset <code>{esc(train.get('preset'))}</code>)" if train.get("preset") else "")),
        ("parameters", _params(art)),
        ("context / vocabulary", f"{esc(model.get('block_size', '—'))} tokens / {esc(model.get('vocab_size', '—'))} token ids"),
        ("training", (f"{esc(train.get('steps', '—'))} steps × batch {esc(train.get('batch_size', '—'))} × "
                     f"accumulation {esc(train.get('grad_accum', '—'))}; Muon lr {esc(train.get('muon_lr', '—'))}, "
                     f"AdamW lr {esc(train.get('lr', '—'))}, warmup {esc(train.get('warmup_steps', '—'))}, "
                     f"seed {esc(train.get('seed', '—'))}")),
        ("compute", (f"device setting {esc(train.get('device', '—'))}, {esc(cfg.get('world_size', '—'))} process(es), "
                    f"{esc(duration(last.get('train_time_s')))} of optimizer steps")),
        ("data", (f"{esc(', '.join(symbols) or '—')} {esc(manifest.get('kind', ''))}; "
                 f"<code>{esc(cfg.get('data_dir') or art.data_dir)}</code>")),
        ("tokenizer hash", short_hash(cfg.get("tokenizer_hash") or manifest.get("tokenizer_hash"), 64)),
        ("data manifest hash", short_hash(cfg.get("manifest_hash") or manifest.get("manifest_hash"), 64)),
        ("code", (f"git commit <code>{esc(cfg.get('provenance', {}).get('git_commit', '—'))}</code>, "
                 f"mega-trading {esc(cfg.get('provenance', {}).get('package_version', '—'))}")),
        ("intended use", ("Research on generative models of order flow: held-out likelihood, "
                         "synthetic trade sequences, stylized-fact checks.")),
    ]))
    lineage_html, mismatched = _lineage_table(art)
    if mismatched:
        body.append(note(f"Artifacts made with a different tokenizer or data set: "
                         f"<strong>{esc(', '.join(mismatched))}</strong>. Their numbers do not "
                         f"describe this model on this data.", "bad"))
    body.append(lineage_html)
    body.append("<h3>Limitations</h3><ul class='limits'>"
                + "".join(f"<li>{item}</li>" for item in _limitations(art)) + "</ul>")
    if cfg:
        shown: dict[str, Any] = {k: v for k, v in cfg.items() if k != "provenance"}
        body.append("<h3>Full configuration (RUN/config.json)</h3><pre>"
                    + esc(json.dumps(shown, indent=2, sort_keys=True)) + "</pre>")
    return Section("model-card", "Model card", "".join(body), HOW)
