"""Scoring a trained run on new data: a reused tokenizer (same tokens, never refitted,
outliers counted), USD-M futures beside spot (separate streams, wrong layout refused), and
zero-shot streams tagged in backtest.json."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mega_trading.cli import main
from mega_trading.core.config import from_dict
from mega_trading.core.errors import DataError
from mega_trading.data.bundled import bundled_dir
from mega_trading.data.ingest.partitions import ingest_files, read_partitions
from mega_trading.data.ingest.reader import read_trades, read_trades_with_report
from mega_trading.data.ingest.schema import stream_key
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import ShardSet
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.eval.backtest import BacktestConfig, run_backtest

BLOCK = 32
QUICK = from_dict(BacktestConfig, {"batch_size": 8, "summary": {"bootstrap_samples": 100}})


@pytest.fixture(scope="module")
def spot_btc(sample_dir) -> Path:
    return sample_dir / "BTCUSDT-trades-2024-08-08.zip"


@pytest.fixture(scope="module")
def spot_eth(sample_dir) -> Path:
    return sample_dir / "ETHUSDT-trades-2024-08-08.zip"


@pytest.fixture(scope="module")
def um_btc() -> Path:
    return bundled_dir("demo") / "um" / "BTCUSDT-trades-2024-07-19.zip"


def _cfg(**kw) -> PrepareConfig:
    return PrepareConfig(block_size=BLOCK, stride=16, workers=1, **kw)


@pytest.fixture(scope="module")
def original(tmp_path_factory, spot_btc, spot_eth) -> Path:
    out = tmp_path_factory.mktemp("reuse") / "original"
    prepare([spot_btc, spot_eth], out, _cfg())
    return out


def _all_tokens(root: Path) -> dict[tuple[str, str], np.ndarray]:
    shards = ShardSet.open(root)
    return {(split, s): np.asarray(shards.tokens(split, s))
            for split in ("train", "validation", "backtest") for s in shards.symbols(split)}


def test_reused_tokenizer_gives_exactly_the_original_tokens(original, tmp_path, spot_btc, spot_eth):
    again = tmp_path / "again"
    manifest = prepare([spot_btc, spot_eth], again, _cfg(), reuse_tokenizer=original / "tokenizer.json")
    first, second = _all_tokens(original), _all_tokens(again)
    assert first.keys() == second.keys() and len(first) == 6
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    assert manifest["tokenizer_reuse"]["hash"] == ShardSet.open(original).tokenizer_hash
    assert manifest["tokenizer_reuse"]["train_streams"] == ["BTCUSDT", "ETHUSDT"]


def test_reused_tokenizer_never_refits_and_defaults_to_backtest(original, tmp_path, sample_dir,
                                                                monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("a reused tokenizer must not be refitted")

    monkeypatch.setattr(Tokenizer, "fit", no_fit)
    new_day = sample_dir / "BTCUSDT-trades-2023-04-05.zip"
    out = tmp_path / "new"
    code = main(["prepare", str(new_day), "--out", str(out), "--tokenizer", str(original),
                 "--block-size", str(BLOCK), "--stride", "16", "--workers", "1"])
    assert code == 0
    shards = ShardSet.open(out)
    assert shards.tokenizer_hash == ShardSet.open(original).tokenizer_hash
    assert shards.tokenizer_reused and shards.model_manifest_hash is None
    assert shards.symbols("train") == [] and shards.symbols("validation") == []
    # Every event of the file is scored: no gap is dropped before a split that starts the data.
    assert shards.manifest["shards"]["backtest"]["BTCUSDT"]["n_events"] == 3144


def test_features_beyond_the_training_range_land_in_outlier_bins(original, tmp_path, spot_btc):
    lines = zipfile.ZipFile(spot_btc).read("BTCUSDT-trades-2024-08-08.csv").decode().splitlines()
    rows = [line.split(",") for line in lines[:400]]
    for row in rows[200:210]:  # a 30 % price spike and 1000x sizes: never seen in training
        row[1] = f"{float(row[1]) * 1.3:.2f}"
        row[2] = f"{float(row[2]) * 1000:.5f}"
        row[3] = f"{float(row[1]) * float(row[2]):.8f}"
    path = tmp_path / "BTCUSDT-trades-2024-08-08.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    manifest = prepare([path], tmp_path / "out", _cfg(splits=(0.0, 0.0, 1.0)), reuse_tokenizer=original)
    counts = manifest["outliers"]["backtest"]["BTCUSDT"]
    assert counts["move"] >= 2 and counts["size"] >= 10 and counts["any"] <= counts["n_events"] == 400


def test_futures_and_spot_of_one_symbol_stay_separate(tmp_path, sample_dir, um_btc):
    spot = sample_dir / "BTCUSDT-trades-2023-04-05.zip"
    manifest = prepare([spot, um_btc], tmp_path / "data", _cfg())
    shards = ShardSet.open(tmp_path / "data")
    assert shards.symbols("train") == ["BTCUSDT", "BTCUSDT.um"]
    n_events = {s: sum(shards.manifest["shards"][split][s]["n_events"] + 0 for split in ("train",))
                for s in ("BTCUSDT", "BTCUSDT.um")}
    assert n_events["BTCUSDT"] < n_events["BTCUSDT.um"]  # 3,144 spot vs 9,727 futures trades
    spot_prices = shards.events("train", "BTCUSDT")["price"]
    um_prices = shards.events("train", "BTCUSDT.um")["price"]
    assert spot_prices.max() < 29_000 < um_prices.min()  # April 2023 spot vs July 2024 futures
    markets = {i["name"]: i["market"] for i in manifest["inputs"]}
    assert markets == {spot.name: "spot", um_btc.name: "um"}
    # Ingested partitions keep them apart too.
    ingest_files([spot, um_btc], tmp_path / "parts")
    dirs = sorted(p.name for p in (tmp_path / "parts" / "kind=trades").iterdir())
    assert dirs == ["symbol=BTCUSDT", "symbol=BTCUSDT.um"]
    table = read_partitions(tmp_path / "parts")
    assert table.group_by("market").len().sort("market")["len"].to_list() == [3144, 9727]


def test_futures_layout_is_read_and_detected(um_btc):
    frame, report = read_trades_with_report(um_btc)
    assert report.market == "um" and report.has_header and frame.height == 9727
    assert frame["is_best_match"].null_count() == frame.height
    assert stream_key("BTCUSDT", report.market) == "BTCUSDT.um"


@pytest.mark.parametrize("which, market", [("um", "spot"), ("spot", "um")])
def test_a_file_read_as_the_other_market_is_a_one_line_error(which, market, um_btc, spot_btc,
                                                             tmp_path, capsys):
    path = um_btc if which == "um" else spot_btc
    with pytest.raises(DataError) as info:
        read_trades(path, market=market)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}:1:")
    code = main(["prepare", str(path), "--out", str(tmp_path / "x"), "--market", market,
                 "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and path.name in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, spot_btc, spot_eth) -> tuple[Path, Path]:
    """A tiny run on spot BTCUSDT + ETHUSDT trained by `train` (so RUN/config.json and
    RUN/tokenizer.json are the real thing); ETHUSDT is held out of training entirely."""
    from mega_trading.train.config import TrainConfig
    from mega_trading.train.loop import train

    root = tmp_path_factory.mktemp("zero_shot")
    data = root / "data"
    prepare([spot_btc, spot_eth], data, _cfg(holdout_symbols=("ETHUSDT",)))
    cfg = from_dict(TrainConfig, {
        "steps": 6, "batch_size": 4, "block_size": BLOCK, "eval_every": 3, "eval_batches": 1,
        "log_every": 3, "ckpt_every": 6, "tracking": "none", "warmup_steps": 1, "device": "cpu",
        "model": {"n_layer": 1, "d_model": 32, "n_head": 4, "n_kv_head": 2, "ffn_hidden": 64}})
    train(data, root / "run", cfg, log=lambda _msg: None)
    return root / "run", data


def test_held_out_symbol_is_scored_and_tagged_zero_shot(trained_run):
    run, data = trained_run
    shards = ShardSet.open(data)
    assert "ETHUSDT" not in shards.symbols("train") and "ETHUSDT" not in shards.symbols("validation")
    assert shards.manifest["shards"]["backtest"]["ETHUSDT"]["n_events"] == 6106
    doc = run_backtest(run, data, max_tokens=600, cfg=QUICK)
    on_disk = json.loads((run / "backtest.json").read_text())
    assert on_disk["per_symbol"]["ETHUSDT"]["zero_shot"] is True
    assert on_disk["per_symbol"]["BTCUSDT"]["zero_shot"] is False
    best = doc["per_symbol"]["BTCUSDT"]["vs_best_baseline"]
    lo, hi = best["ci95_bits"]
    assert lo <= best["delta_bits"] <= hi and best["baseline"] in doc["baselines"]


def test_new_data_with_the_runs_tokenizer_is_scored_with_zero_shot_tags(trained_run, tmp_path,
                                                                         sample_dir, um_btc):
    """`prepare --tokenizer RUN` then `backtest --run RUN --data DIR`: baselines come from the
    run's training data, a stream the run never trained on is tagged zero-shot."""
    run, data = trained_run
    new = tmp_path / "new"
    code = main(["prepare", str(sample_dir / "BTCUSDT-trades-2023-04-05.zip"), str(um_btc),
                 "--out", str(new), "--tokenizer", str(run), "--block-size", str(BLOCK),
                 "--stride", "16", "--workers", "1"])
    assert code == 0
    assert ShardSet.open(new).manifest["tokenizer_reuse"]["train_streams"] == ["BTCUSDT"]
    out = tmp_path / "bt.json"
    code = main(["backtest", "--run", str(run), "--data", str(new), "--max-tokens", "500",
                 "--out", str(out), "--set", "summary.bootstrap_samples=50"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["per_symbol"]["BTCUSDT"]["zero_shot"] is False
    assert doc["per_symbol"]["BTCUSDT.um"]["zero_shot"] is True
    assert doc["per_symbol"]["BTCUSDT.um"]["market"] == "um"
    assert doc["lineage"]["trained_on_manifest"] == ShardSet.open(data).manifest_hash
    # The baselines were fitted on the run's training data, so their unigram is the same.
    ref = run_backtest(run, data, max_tokens=500, cfg=QUICK, out=tmp_path / "ref.json")
    assert doc["baseline_details"] == ref["baseline_details"]


def test_report_shows_a_row_per_symbol_and_market_with_the_zero_shot_flag(trained_run, tmp_path):
    from mega_trading.report import build_report
    from mega_trading.report.markets_table import markets_table

    run, data = trained_run
    doc = run_backtest(run, data, max_tokens=400, cfg=QUICK)
    html = markets_table(doc)
    assert "Across markets and symbols" in html
    assert html.count("<tr>") == 1 + len(doc["per_symbol"])  # header + one row per stream
    verdicts = {s: i["vs_best_baseline"]["verdict"] for s, i in doc["per_symbol"].items()}
    for stream, verdict in verdicts.items():  # a stream where the model does not win is named
        if verdict != "model better":
            assert stream in html.split("Per (symbol, market):")[1]
    assert "(vs unigram" in html  # the zero-shot row is also compared with unigram
    page = build_report(run, data, tmp_path / "report.html").read_text()
    assert "Across markets and symbols" in page and "data-key=\"backtest:per_symbol/ETHUSDT/vs_unigram/delta_bits\"" in page


def test_demo_config_trains_on_every_bundled_market_and_holds_a_symbol_out():
    from mega_trading.pipeline import _input_files, load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    files = _input_files(cfg)
    names = {(f.parent.name, f.name) for f in files}
    assert ("um", "BTCUSDT-trades-2024-08-08.zip") in names and ("sample", "BTCUSDT-trades-2024-08-08.zip") in names
    assert ("spot", "NEXOUSDT-trades-2024-07-24.zip") in names
    assert cfg.prepare.holdout_symbols == ("ETHUSDT",)


def test_partitions_written_before_markets_read_as_spot(tmp_path, sample_dir):
    ingest_files([sample_dir / "BTCUSDT-trades-2025-01-01.zip"], tmp_path)
    (part,) = tmp_path.rglob("part-*.parquet")
    import polars as pl

    pl.read_parquet(part).drop("market").write_parquet(part)  # the pre-futures layout
    table = read_partitions(tmp_path)
    assert table.height == 210 and table["market"].unique().to_list() == ["spot"]


def test_generate_facts_and_report_accept_new_data_with_the_run(trained_run, tmp_path, sample_dir):
    from mega_trading.report import build_report

    run, _ = trained_run
    new = tmp_path / "new"
    prepare([sample_dir / "BTCUSDT-trades-2023-04-05.zip"], new, _cfg(splits=(0.0, 0.0, 1.0)),
            reuse_tokenizer=run / "tokenizer.json")
    rollouts = tmp_path / "rollouts.parquet"
    assert main(["generate", "--run", str(run), "--data", str(new), "--n", "4", "--length", "16",
                 "--prompt-length", "16", "--out", str(rollouts)]) == 0
    assert main(["facts", "--data", str(new), "--rollouts", str(rollouts), "--out",
                 str(tmp_path / "facts.json"), "--set", "n_boot=10"]) == 0
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts  # the noise floor came from the run's training data (new data has no train split)
    assert build_report(run, new, tmp_path / "report.html").is_file()
