"""The HTML report: built from a tiny real end-to-end run, self-contained, every section
present, every traced number equal to its JSON source, missing artifacts survived."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

SECTIONS = ("data", "training", "backtest", "generation", "facts", "simulation", "model-card")
CHARTS = ("split-timeline", "calendar", "loss", "throughput", "lr", "backtest-nll",
          "backtest-fields", "calibration", "candles", "fan", "fact-return_acf",
          "fact-abs_return_acf", "fact-sign_acf", "fact-dt_acf", "fact-response",
          "fact-aggregation", "hist-returns", "hist-log_size", "hist-log1p_dt", "qq-returns",
          "sim-shortfall")


# --- a tiny run through the real stages ---------------------------------------------------

def build_run(root: Path) -> tuple[Path, Path]:
    """prepare -> train -> backtest -> generate -> facts -> simulate, all real stage code."""
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.prepare import PrepareConfig, prepare
    from mega_trading.data.shards import ShardSet
    from mega_trading.eval.backtest import run_backtest
    from mega_trading.eval.scorecard import run_facts
    from mega_trading.eval.statistics import FactsConfig
    from mega_trading.generation.generate import GenerateConfig, generate_rollouts, rollout_lineage
    from mega_trading.generation.rollouts import write_rollouts
    from mega_trading.model.checkpoint import load_model
    from mega_trading.simulate.config import SimConfig
    from mega_trading.simulate.run import policy_configs, run_simulation
    from mega_trading.train.config import TrainConfig
    from mega_trading.train.loop import train

    data, run = root / "data", root / "run"
    prepare(sample_files("trades"), data, PrepareConfig(block_size=64, stride=32, workers=1))
    cfg = TrainConfig(model={"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1,
                             "ffn_hidden": 64},
                      steps=12, batch_size=4, block_size=64, warmup_steps=2, eval_every=6,
                      eval_batches=2, log_every=3, tracking="none", device="cpu")
    train(data, run, cfg, log=lambda _msg: None)
    run_backtest(run, data, max_tokens=400)

    shards = ShardSet.open(data)
    model, state = load_model(run)
    gen = GenerateConfig(n=6, length=80, prompt_length=32, batch_size=6, seed=1)
    events, prompts = generate_rollouts(model, shards, gen)
    write_rollouts(events, run / "rollouts.parquet",
                   rollout_lineage(gen, shards, prompts, run=str(run), step=state["step"]))

    run_facts(data, run / "rollouts.parquet", run / "facts.json",
              FactsConfig(n_boot=30, on_degenerate="flag", max_lag=20), seed=0)

    sim = SimConfig(source="replay", episodes=4, batch_size=4, prompt_length=32,
                    bootstrap_samples=50, max_events=200, impact_lags=4)
    run_simulation(data, policy_configs("immediate,twap", qty=0.01, horizon_s=2.0, slices=2),
                   sim, out=run / "simulate.json")
    return run, data


@pytest.fixture(scope="module")
def report_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    from mega_trading.report import build_report

    run, data = build_run(tmp_path_factory.mktemp("report"))
    return run, data, build_report(run)  # data dir: the one recorded in RUN/config.json


# --- reading the HTML back ------------------------------------------------------------------

class ReportParser(HTMLParser):
    """Collects traced numbers, section and chart ids, script sources and links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.traced: list[tuple[str, str, str]] = []  # (data-key, data-fmt, text)
        self.sections: list[str] = []
        self.charts: list[str] = []
        self.script_srcs: list[str] = []
        self.links: list[str] = []
        self.toc: list[str] = []
        self._open: list | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-key" in a:
            self._open = [a["data-key"], a.get("data-fmt", ""), ""]
        if tag == "section" and "data-section" in a:
            self.sections.append(a["data-section"])
        if "data-chart" in a:
            self.charts.append(a["data-chart"])
        if tag == "script" and a.get("src"):
            self.script_srcs.append(a["src"])
        if tag in ("link", "img", "iframe") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if tag == "a" and (a.get("href") or "").startswith("#"):
            self.toc.append(a["href"][1:])

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if self._open is not None and tag == "span":
            self.traced.append(tuple(self._open))
            self._open = None


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


def artifact_docs(run: Path, data: Path) -> dict[str, dict]:
    return {
        "backtest": json.loads((run / "backtest.json").read_text()),
        "facts": json.loads((run / "facts.json").read_text()),
        "simulate": json.loads((run / "simulate.json").read_text()),
        "config": json.loads((run / "config.json").read_text()),
        "train_summary": json.loads((run / "train_summary.json").read_text()),
        "manifest": json.loads((data / "manifest.json").read_text()),
        "tokenizer": json.loads((data / "tokenizer.json").read_text()),
    }


def resolve(doc, key_path: str):
    node = doc
    for part in key_path.split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def expected_text(value, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec)


def traced(parser: ReportParser, artifact: str) -> dict[str, tuple[str, str]]:
    return {k.split(":", 1)[1]: (fmt, text) for k, fmt, text in parser.traced
            if k.startswith(artifact + ":")}


# --- tests ------------------------------------------------------------------------------------

def test_report_is_written_atomically_beside_the_run(report_run):
    run, _, path = report_run
    assert path == run / "report.html"
    assert not list(run.glob(".report.html.*"))  # no temp file left behind
    assert path.stat().st_size > 1_000_000  # plotly.js is inside


def test_report_is_self_contained(report_run):
    _, _, path = report_run
    text = path.read_text()
    parser = parse(path)
    assert parser.script_srcs == []  # every script is inline
    assert not [link for link in parser.links if re.match(r"(https?:)?//", link)]
    from mega_trading.report.charts import plotly_js

    bundle = plotly_js()
    assert bundle in text  # the whole plotly.js bundle is embedded, once
    own_markup = text.replace(bundle, "")
    assert "Plotly.newPlot" in own_markup
    # the bundle names a CDN only as the default map-shape URL of geo charts (unused here)
    assert not re.search(r"https?://|cdn\.plot\.ly", own_markup)


def test_every_section_and_chart_is_present(report_run):
    _, _, path = report_run
    parser = parse(path)
    assert parser.sections == list(SECTIONS)
    assert set(SECTIONS) <= set(parser.toc)  # the table of contents links every section
    missing = set(CHARTS) - set(parser.charts)
    assert not missing, f"charts not rendered: {missing}"
    text = path.read_text()
    assert text.count('class="how"') >= len(SECTIONS)  # a "how to read this" per section
    assert "Not produced in this run" not in text  # every artifact exists in this run


def test_backtest_table_numbers_equal_the_json(report_run):
    run, data, path = report_run
    bt = artifact_docs(run, data)["backtest"]
    shown = traced(parse(path), "backtest")
    scorers = {"model": bt["model"], **{f"baselines/{n}": s for n, s in bt["baselines"].items()}}
    for prefix, stats in scorers.items():
        for key, spec in (("nll_nats", ".4f"), ("bits_per_event", ".4f"), ("perplexity", ",.2f"),
                          ("top1", ".4f"), ("top5", ".4f"), ("ece", ".4f")):
            assert shown[f"{prefix}/{key}"] == (spec, format(stats[key], spec)), (prefix, key)
        for i in (0, 1):
            assert shown[f"{prefix}/nll_nats_ci95/{i}"][1] == format(stats["nll_nats_ci95"][i], ".4f")
    for name, delta in bt["model"]["vs_baselines"].items():
        prefix = f"model/vs_baselines/{name}"
        assert shown[f"{prefix}/delta_nll_nats"][1] == format(delta["delta_nll_nats"], "+.4f")
        assert shown[f"{prefix}/ci95/0"][1] == format(delta["ci95"][0], "+.4f")
        assert shown[f"{prefix}/ci95/1"][1] == format(delta["ci95"][1], "+.4f")
    for symbol, info in bt["per_symbol"].items():
        assert shown[f"per_symbol/{symbol}/model/nll_nats"][1] == format(info["model"]["nll_nats"], ".4f")


def test_facts_tables_numbers_equal_the_json(report_run):
    run, data, path = report_run
    facts = artifact_docs(run, data)["facts"]
    shown = traced(parse(path), "facts")
    n_checked = 0
    for dist, section in facts["distances"].items():
        roles = {"noise_floor": section["noise_floor"], "model": section["model"],
                 **{f"baselines/{b}": d for b, d in section["baselines"].items()}}
        for role, entry in roles.items():
            for metric in ("ks", "wasserstein", "l1_bins"):
                for field in ("value", "ci_low", "ci_high"):
                    key = f"distances/{dist}/{role}/{metric}/{field}"
                    assert shown[key] == (".4f", expected_text(entry[metric][field], ".4f")), key
                    n_checked += 1
    for gap, section in facts["fact_gaps"].items():
        for role in ("noise_floor", "model"):
            assert shown[f"fact_gaps/{gap}/{role}"][1] == expected_text(section[role], ".4g")
        for name, value in section["baselines"].items():
            assert shown[f"fact_gaps/{gap}/baselines/{name}"][1] == expected_text(value, ".4g")
    real_kurtosis = facts["facts"]["real"]["returns"]["excess_kurtosis"]
    assert shown["facts/real/returns/excess_kurtosis"][1] == format(real_kurtosis, ".4g")
    assert n_checked == len(facts["distances"]) * 3 * 3 * (2 + len(facts["facts"]["baselines"]))


def test_every_traced_number_equals_its_artifact(report_run):
    run, data, path = report_run
    docs = artifact_docs(run, data)
    parser = parse(path)
    assert len(parser.traced) > 300
    for key, spec, text in parser.traced:
        artifact, key_path = key.split(":", 1)
        assert re.fullmatch(r"[+,]?\.?\d*[dfg]", spec), (key, spec)  # a numeric format spec
        value = resolve(docs[artifact], key_path)
        assert text == expected_text(value, spec), (key, text, value)


def test_simulation_results_are_rendered(report_run):
    run, data, path = report_run
    sim = artifact_docs(run, data)["simulate"]
    shown = traced(parse(path), "simulate")
    for name, result in sim["policies"].items():
        mean = result["summary"]["shortfall_bps"]["mean"]
        assert shown[f"policies/{name}/summary/shortfall_bps/mean"][1] == expected_text(mean, ".3f")
    paired = sim["paired_shortfall"]["twap"]["mean_bps"]
    assert shown["paired_shortfall/twap/mean_bps"][1] == format(paired, "+.3f")


def test_model_card_states_hashes_and_limitations(report_run):
    run, data, path = report_run
    docs = artifact_docs(run, data)
    text = path.read_text()
    card = text[text.index('id="model-card"'):]
    assert docs["manifest"]["manifest_hash"] in card
    assert docs["manifest"]["tokenizer_hash"] in card
    assert docs["config"]["provenance"]["git_commit"] in card
    assert "A short training run: 12 optimizer steps" in card  # derived from config.json
    assert "Trained on a tiny sample" in card
    assert "✗ differs" not in card  # every artifact comes from the same data and tokenizer


def test_missing_optional_artifacts_give_notes_not_a_crash(report_run, tmp_path):
    from mega_trading.report import build_report

    run, data, _ = report_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(run / name, bare / name)
    out = build_report(bare, data, tmp_path / "bare.html")
    text = out.read_text()
    parser = parse(out)
    assert parser.sections == list(SECTIONS)
    for section in ("backtest", "generation", "facts", "simulation"):
        body = text[text.index(f'id="{section}"'):]
        body = body[:body.index("</section>")]
        assert "Not produced in this run" in body, section
    assert "loss" in parser.charts  # what exists is still drawn


def test_missing_data_dir_and_broken_artifact_are_reported(report_run, tmp_path):
    from mega_trading.report import build_report

    run, _, _ = report_run
    broken = tmp_path / "run"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoints", "report.html"))
    (broken / "backtest.json").write_text('{"model": ')  # a torn write
    out = build_report(broken, tmp_path / "no-such-data", tmp_path / "r.html")
    text = out.read_text()
    assert "Some artifacts could not be read" in text and "backtest.json" in text
    data_section = text[text.index('id="data"'):text.index('id="training"')]
    assert "Not produced in this run" in data_section


def test_script_breaking_text_is_escaped():
    import plotly.graph_objects as go

    from mega_trading.report.charts import embed

    html = embed(go.Figure(layout_title_text="</script><script>alert(1)</script>"), "x<y",
                 title="<b>t</b>")
    assert "</script><script>alert" not in html
    assert 'id="chart-x-y"' in html and "&lt;b&gt;t&lt;/b&gt;" in html


def test_cli_report_uses_the_recorded_data_dir(report_run, tmp_path):
    from mega_trading.cli import main

    run, _, _ = report_run
    out = tmp_path / "cli.html"
    assert main(["report", "--run", str(run), "--out", str(out)]) == 0
    parser = parse(out)
    assert "manifest:token_stats/train/n_events" in {k for k, _, _ in parser.traced}
    assert main(["report", "--run", str(tmp_path / "missing")]) == 2


def test_facts_section_says_how_much_real_data_was_read():
    """facts.json's real_sample is shown: whole splits, or the stratified sample's size."""
    from mega_trading.report.facts_section import _sample_note

    whole = {"split": "backtest", "events": 1234, "events_in_split": 1234, "complete": True}
    sample = {"split": "train", "events": 199680, "events_in_split": 12_800_000, "windows": 780,
              "window_events": 256, "seed": 1, "complete": False}
    text = _sample_note({"real": whole, "noise_floor": sample})
    assert "all 1,234 events of the backtest split" in text
    assert "199,680 of 12,800,000 events, 780 windows of 256" in text
    assert _sample_note(None) == ""
