"""End-to-end backtest on a tiny prepared sample: report contents, zero-shot symbols,
mismatched data refused, baselines blind to held-out tokens, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mega_trading.cli import main
from mega_trading.core.config import from_dict, to_dict
from mega_trading.core.errors import ArtifactMismatchError
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import ShardSet
from mega_trading.data.tokenizer import TokenizerConfig
from mega_trading.data.windows import WindowSampler
from mega_trading.eval.backtest import BacktestConfig, fit_train_baselines, run_backtest

BLOCK = 32
# ETHUSDT trades only after 23:54 on 2024-08-08, so it lands wholly in validation and
# backtest: a symbol the baselines and the model never trained on.
SPLIT_TIMES = ("2024-08-08T23:50:00", "2024-08-08T23:57:00")
BASELINES = ("uniform", "unigram", "copy_previous", "markov1", "markov3")
QUICK = from_dict(BacktestConfig, {"batch_size": 8, "summary": {"bootstrap_samples": 200}})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_trade_zips) -> Path:
    out = tmp_path_factory.mktemp("bt") / "data"
    prepare(sample_trade_zips, out, PrepareConfig(block_size=BLOCK, stride=16, workers=1,
                                                  split_times=SPLIT_TIMES))
    return out


def _train_tiny(shards: ShardSet, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from mega_trading.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=shards.vocab_size, block_size=BLOCK, n_layer=1, d_model=32,
                      n_head=2, n_kv_head=1, ffn_hidden=64)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = WindowSampler(shards, "train", BLOCK, batch_size=16, seed=0)
    for _ in range(steps):
        x, y, _ = sampler.next_batch()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    from mega_trading.model.checkpoint import save_checkpoint

    shards = ShardSet.open(data_dir)
    model, opt = _train_tiny(shards, steps=60)
    run = tmp_path_factory.mktemp("bt") / "run"
    save_checkpoint(run, 60, model, opt, sampler_state={}, config={"model": to_dict(model.cfg)},
                    tokenizer_hash=shards.tokenizer_hash, manifest_hash=shards.manifest_hash)
    return run


@pytest.fixture(scope="module")
def report(run_dir, data_dir) -> dict:
    return run_backtest(run_dir, data_dir, max_tokens=1500, cfg=QUICK)


def test_report_has_every_figure_for_model_and_baselines(report, run_dir, data_dir):
    def no_nan_or_inf(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    on_disk = json.loads((run_dir / "backtest.json").read_text(), parse_constant=no_nan_or_inf)
    assert on_disk["n_scored"] == report["n_scored"] and on_disk["split"] == "backtest"
    assert set(report["baselines"]) == set(BASELINES)
    for s in [report["model"], *report["baselines"].values()]:
        for key in ("nll_nats", "bits_per_event", "perplexity", "top1", "top5", "nll_nats_ci95"):
            assert np.isfinite(s[key]).all(), key
        assert set(s["per_field"]) == {"side", "move", "size", "dt"}
    model = report["model"]
    lo, hi = model["nll_nats_ci95"]
    assert lo < model["nll_nats"] < hi
    assert len(model["reliability"]) == 15 and 0 <= model["ece"] <= 1
    assert set(model["vs_baselines"]) == set(BASELINES)
    shards = ShardSet.open(data_dir)
    lineage = report["lineage"]
    assert lineage["tokenizer_hash"] == shards.tokenizer_hash
    assert lineage["manifest_hash"] == shards.manifest_hash
    assert lineage["checkpoint_step"] == 60 and "git_commit" in lineage
    assert 1 <= report["effective_vocab"] <= report["n_distinct_labels"] <= shards.vocab_size


def test_every_held_out_event_scored_once_per_symbol(report, data_dir):
    shards = ShardSet.open(data_dir)
    expected = 0
    for symbol in shards.symbols("backtest"):
        tokens = np.asarray(shards.tokens("backtest", symbol))[:1500]
        n = int((tokens[1:] < shards.tokenizer.n_event_tokens).sum())
        assert report["per_symbol"][symbol]["n_scored"] == n
        assert report["per_symbol"][symbol]["model"]["n_scored"] == n
        expected += n
    assert report["n_scored"] == expected
    assert all(b["n_scored"] == expected for b in report["baselines"].values())


def test_zero_shot_symbol_is_scored_and_labelled(report):
    assert report["per_symbol"]["ETHUSDT"]["zero_shot"] is True
    assert report["per_symbol"]["BTCUSDT"]["zero_shot"] is False
    assert report["per_symbol"]["ETHUSDT"]["n_scored"] > 0


def test_trained_model_and_fitted_baselines_beat_uniform(report):
    uniform = report["baselines"]["uniform"]["nll_nats"]
    assert report["model"]["nll_nats"] < uniform
    assert report["model"]["vs_baselines"]["uniform"]["ci95"][1] < 0
    for name in ("unigram", "markov1", "markov3"):
        assert report["baselines"][name]["nll_nats"] < uniform, name


def test_checkpoint_from_other_data_is_refused(run_dir, tmp_path, sample_trade_zips):
    other = tmp_path / "other"
    prepare(sample_trade_zips, other, PrepareConfig(
        block_size=BLOCK, stride=16, workers=1, split_times=SPLIT_TIMES,
        tokenizer=TokenizerConfig(size_bins=6)))
    with pytest.raises(ArtifactMismatchError):
        run_backtest(run_dir, other, max_tokens=200, cfg=QUICK, out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_baselines_never_read_held_out_tokens(data_dir, tmp_path):
    """Rewriting every validation/backtest shard leaves every fitted baseline unchanged."""
    before = fit_train_baselines(ShardSet.open(data_dir))
    tampered = tmp_path / "tampered"
    shutil.copytree(data_dir, tampered)
    shards = ShardSet.open(tampered)
    rng = np.random.default_rng(0)
    for split in ("validation", "backtest"):
        for symbol in shards.symbols(split):
            path = tampered / shards.manifest["shards"][split][symbol]["tokens"]
            n = shards.n_tokens(split, symbol)
            rng.integers(0, shards.tokenizer.n_event_tokens, n).astype(np.uint16).tofile(path)
    after = fit_train_baselines(ShardSet.open(tampered))
    changed = np.asarray(ShardSet.open(tampered).tokens("backtest", "BTCUSDT"))
    original = np.asarray(ShardSet.open(data_dir).tokens("backtest", "BTCUSDT"))
    assert not np.array_equal(changed, original)
    for name in before:
        a, b = before[name].state(), after[name].state()
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_cli_prints_table_and_writes_json(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "bt.json"
    code = main(["backtest", "--run", str(run_dir), "--data", str(data_dir), "--max-tokens", "300",
                 "--out", str(out), "--set", "summary.bootstrap_samples=100"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["max_tokens"] == 300
    assert all(s["n_tokens"] <= 300 for s in doc["per_symbol"].values())
    printed = capsys.readouterr().out
    assert "markov3" in printed and "model" in printed and "zero-shot" in printed
    assert main(["backtest", "--run", str(tmp_path / "nope"), "--data", str(data_dir)]) != 0


def test_streamed_backtest_equals_the_per_position_computation(report, run_dir, data_dir):
    """backtest keeps only running sums (score_sums); recompute every headline figure from
    the full per-position arrays with plain numpy and compare: means to 1e-9, the block
    bootstrap CIs (same blocks, same seed) to 1e-9, so the bounded path loses nothing."""
    from mega_trading.eval.scoring import (
        FieldSpec,
        PositionScores,
        block_bootstrap_ci,
        block_ids,
        score_baseline,
        score_model,
    )
    from mega_trading.model.checkpoint import load_model

    shards = ShardSet.open(data_dir)
    model, _ = load_model(run_dir)
    spec = FieldSpec.from_tokenizer(shards.tokenizer)
    baseline = fit_train_baselines(shards)["markov1"]
    symbols = [s for s in shards.symbols("backtest") if shards.n_tokens("backtest", s) > 0]
    model_parts, markov_parts = [], []
    for shard_id, symbol in enumerate(symbols):
        tokens = np.asarray(shards.tokens("backtest", symbol))[:1500].astype(np.int64)
        model_parts.append(score_model(model, tokens, spec, batch_size=8).with_shard(shard_id))
        # A chunk of 7 token positions: a context often starts in the previous chunk.
        markov_parts.append(score_baseline(baseline, tokens, spec, 7).with_shard(shard_id))
    full = PositionScores.concat(model_parts, spec.field_names)
    markov = PositionScores.concat(markov_parts, spec.field_names)
    assert np.array_equal(full.positions, markov.positions)
    blocks = block_ids(full, QUICK.summary.bootstrap_block)
    samples = QUICK.summary.bootstrap_samples
    nll = -full.logp
    got = report["model"]
    assert got["n_scored"] == len(nll)
    assert got["nll_nats"] == pytest.approx(nll.mean(), rel=1e-9)
    assert got["nll_nats_ci95"] == pytest.approx(block_bootstrap_ci(nll, blocks, samples), rel=1e-9)
    assert got["top5"] == pytest.approx(full.top5_hit.mean(), rel=1e-9)
    for name, lp in full.field_logp.items():
        assert got["per_field"][name]["nll_nats"] == pytest.approx(-lp.mean(), rel=1e-9)
    diff = nll - (-markov.logp)
    paired = got["vs_baselines"]["markov1"]
    assert paired["delta_nll_nats"] == pytest.approx(diff.mean(), rel=1e-9)
    assert paired["ci95"] == pytest.approx(block_bootstrap_ci(diff, blocks, samples), rel=1e-9)
    assert report["baselines"]["markov1"]["nll_nats"] == pytest.approx(-markov.logp.mean(),
                                                                       rel=1e-9)
    confidence_bins = np.minimum((full.top1_prob * 15).astype(int), 14)
    ece = sum(abs(full.top1_hit[confidence_bins == b].mean() - full.top1_prob[
        confidence_bins == b].mean()) * (confidence_bins == b).mean()
        for b in range(15) if (confidence_bins == b).any())
    assert got["ece"] == pytest.approx(ece, rel=1e-9)


def test_baselines_fit_on_the_most_recent_train_tokens_above_the_cap(data_dir):
    """Above baselines.max_fit_tokens the n-gram baselines are fitted on each symbol's most
    recent train tokens, in proportion: the unigram then equals one fitted on those tails."""
    from mega_trading.eval.backtest import recent_tokens
    from mega_trading.eval.baselines import BaselineConfig, fit_baselines

    shards = ShardSet.open(data_dir)
    train = [shards.tokens("train", s) for s in shards.symbols("train")]
    total = sum(len(t) for t in train)
    capped = fit_train_baselines(shards, BaselineConfig(max_fit_tokens=total // 3))
    tails = recent_tokens(train, total // 3)
    assert sum(len(t) for t in tails) <= total // 3 and all(len(t) for t in tails)
    assert all(np.array_equal(t, s[len(s) - len(t):]) for t, s in zip(tails, train))
    tok = shards.tokenizer
    expected = fit_baselines(tails, tok.vocab_size, tok.seg_id, tok.pad_id, tok.n_event_tokens)
    assert np.array_equal(capped["unigram"].p, expected["unigram"].p)
    assert not np.array_equal(capped["unigram"].p, fit_train_baselines(shards)["unigram"].p)
