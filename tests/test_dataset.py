"""Splits, shards and windows: the split contract, leakage guards, sampler coverage, resume."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mega_trading.core.errors import DataError
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import SPLITS, ShardSet
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.data.windows import WindowSampler, sequential_windows, window_starts

CFG = PrepareConfig(block_size=64, stride=32, workers=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_trade_zips) -> ShardSet:
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(sample_trade_zips, out, CFG)
    return ShardSet.open(out)


def test_manifest_records_lineage(prepared, sample_trade_zips):
    m = prepared.manifest
    assert m["tokenizer_hash"] == prepared.tokenizer.hash
    assert {Path(i["path"]).name for i in m["inputs"]} == {p.name for p in sample_trade_zips}
    assert all(len(i["sha256"]) == 64 for i in m["inputs"])
    assert m["config"]["block_size"] == 64 and "git_commit" in m["provenance"]
    assert set(m["boundaries"]) == {"BTCUSDT", "ETHUSDT"}
    assert m["token_stats"]["train"]["realized_vocab"] <= m["vocab_size"]


def test_splits_are_chronological_with_gaps(prepared):
    for symbol, b in prepared.manifest["boundaries"].items():
        assert b["train_end_us"] < b["validation_start_us"] <= b["validation_end_us"] < b["backtest_start_us"]
        train = prepared.events("train", symbol)
        val = prepared.events("validation", symbol)
        test = prepared.events("backtest", symbol)
        assert train["time_us"].max() <= val["time_us"].min() <= test["time_us"].min()
        # At least one block of events lies between splits (the gap), by trade id.
        assert val["trade_id"].min() - train["trade_id"].max() > CFG.block_size
        assert test["trade_id"].min() - val["trade_id"].max() > CFG.block_size


def test_no_training_window_reaches_held_out_time(prepared):
    for symbol in prepared.symbols("train"):
        events = prepared.events("train", symbol)
        tokens = prepared.tokens("train", symbol)
        time_at = np.full(len(tokens), -1, dtype=np.int64)
        time_at[events["token_pos"].to_numpy()] = events["time_us"].to_numpy()
        validation_start = prepared.manifest["boundaries"][symbol]["validation_start_us"]
        for start in window_starts(len(tokens), CFG.block_size, CFG.stride):
            assert time_at[start:start + CFG.block_size + 1].max() < validation_start


def test_shards_hold_event_tokens_with_segment_starts(prepared):
    tok = prepared.tokenizer
    for split in SPLITS:
        for symbol in prepared.symbols(split):
            tokens = np.asarray(prepared.tokens(split, symbol))
            events = prepared.events(split, symbol)
            assert tokens[0] == tok.seg_id
            assert (tokens[events["token_pos"].to_numpy()] == events["token"].to_numpy()).all()
            assert (tokens == tok.seg_id).sum() + events.height == len(tokens)
            assert not (tokens == tok.pad_id).any()


def test_events_are_stored_once_and_tail_reads_match(prepared):
    """Events live once per input file whatever their split; a shard's tail read (the
    report's) equals the end of its full read, token positions included."""
    files = sorted(p.name for p in (prepared.root / "events").rglob("*.parquet"))
    assert files and all(name.startswith("part-") for name in files)
    assert not (prepared.root / "_work").exists()
    for split in SPLITS:
        for symbol in prepared.symbols(split):
            events = prepared.events(split, symbol)
            assert events.height == prepared.manifest["shards"][split][symbol]["n_events"]
            assert prepared.events(split, symbol, tail=37).equals(events.tail(37))
            assert prepared.events(split, symbol, tail=0).equals(events.head(0))
            assert events["token_pos"][-1] == prepared.n_tokens(split, symbol) - 1


def test_data_prepared_by_another_version_is_refused_with_a_hint(tmp_path, prepared):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(prepared.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = "mega-trading/shards@1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shards@1.*prepare` again"):
        ShardSet.open(copy)


def test_tokenizer_is_fitted_on_train_only(tmp_path, sample_trade_zips, prepared):
    """Rewriting every held-out trade must not change the tokenizer (no look-ahead)."""
    tampered = []
    boundaries = prepared.manifest["boundaries"]
    for zip_path in sample_trade_zips:
        symbol = zip_path.name.split("-")[0]
        cutoff_ms = boundaries[symbol]["train_end_us"] // 1000
        with zipfile.ZipFile(zip_path) as zf:
            name = zf.namelist()[0]
            lines = zf.read(name).decode().splitlines()
        rows = []
        for line in lines:
            cols = line.split(",")
            stamp = int(cols[4])
            stamp_ms = stamp // 1000 if stamp > 10**14 else stamp
            if stamp_ms > cutoff_ms + 1:
                cols[1] = f"{float(cols[1]) * 1.01:.8f}"  # held-out prices and sizes change
                cols[2] = f"{float(cols[2]) * 7:.8f}"
                cols[3] = f"{float(cols[1]) * float(cols[2]):.8f}"
            rows.append(",".join(cols))
        out = tmp_path / "raw" / zip_path.name
        out.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr(name, "\n".join(rows) + "\n")
        tampered.append(out)
    prepare(tampered, tmp_path / "tampered", CFG)
    again = ShardSet.open(tmp_path / "tampered")
    assert again.tokenizer.hash == prepared.tokenizer.hash
    # the hash covers the move's per-tick-class tables (fitted on train events in order)
    assert any(any(t) for t in prepared.tokenizer.move.context_quantiles)
    assert again.tokenizer.move.context_quantiles == prepared.tokenizer.move.context_quantiles
    assert again.manifest["boundaries"] == prepared.manifest["boundaries"]
    assert again.manifest["manifest_hash"] != prepared.manifest["manifest_hash"]


def test_sampler_sees_every_symbol_not_storage_order(prepared):
    sampler = WindowSampler(prepared, "train", block_size=64, batch_size=8, seed=0)
    x, y, _ = sampler.next_batch()
    assert x.shape == (8, 64) and (x[:, 1:] == y[:, :-1]).all()
    for _ in range(49):
        sampler.next_batch()
    windows = sampler.windows_per_symbol
    share = sampler.seen["ETHUSDT"] / sum(sampler.seen.values())
    expected = windows["ETHUSDT"] / sum(windows.values())
    assert min(sampler.seen.values()) > 0
    assert abs(share - expected) < 0.1


def test_sampler_state_resumes_exactly(prepared):
    a = WindowSampler(prepared, "train", 64, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON checkpoint
    b = WindowSampler(prepared, "train", 64, 4, seed=99)
    b.load_state_dict(state)
    for _ in range(3):
        xa, _, _ = a.next_batch()
        xb, _, _ = b.next_batch()
        assert (xa == xb).all()
    assert a.seen == b.seen


def test_ranks_split_the_global_batch(prepared):
    single = WindowSampler(prepared, "train", 64, 8, seed=5)
    ranks = [WindowSampler(prepared, "train", 64, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    x, _, _ = single.next_batch()
    parts = [r.next_batch()[0] for r in ranks]
    assert (x == np.concatenate(parts)).all()


@pytest.mark.parametrize("n,block,stride", [(2, 4, 2), (10, 4, 2), (100, 16, 5), (101, 16, 16), (17, 16, 8)])
def test_sequential_windows_score_each_target_once(n, block, stride):
    tokens = np.arange(n)
    covered = []
    for start, window, score_from in sequential_windows(tokens, block, stride):
        assert len(window) <= block + 1 and (window == tokens[start:start + len(window)]).all()
        covered.extend(range(start + score_from, start + len(window) - 1))
    assert covered == list(range(n - 1))


def test_time_based_splits(tmp_path, sample_trade_zips):
    cfg = PrepareConfig(block_size=32, stride=16, workers=1,
                        split_times=("2024-08-08T23:58:00Z", "2024-08-08T23:59:00Z"))
    manifest = prepare(sample_trade_zips, tmp_path / "d", cfg)
    b = manifest["boundaries"]["ETHUSDT"]
    assert b["train_end_us"] < 1723161480_000000 <= b["validation_start_us"]
    assert b["validation_end_us"] < 1723161540_000000 <= b["backtest_start_us"]


def test_failed_prepare_keeps_previous_output(tmp_path, sample_trade_zips):
    out = tmp_path / "data"
    prepare(sample_trade_zips[:2], out, PrepareConfig(block_size=32, stride=16, workers=1))
    before = (out / "manifest.json").read_bytes()
    bad = tmp_path / "BTCUSDT-trades-2024-09-01.csv"
    bad.write_text("1,100.0,1.0,100.0,1725148800000,True,True\n2,abc,1.0,100.0,1725148800001,True,True\n")
    with pytest.raises(DataError, match="BTCUSDT-trades-2024-09-01.csv"):
        prepare([*sample_trade_zips[:2], bad], out, PrepareConfig(block_size=32, stride=16, workers=1))
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data.")]


def test_tokenizer_artifact_matches_manifest(prepared):
    assert Tokenizer.load(prepared.root / "tokenizer.json").hash == prepared.manifest["tokenizer_hash"]


def test_parallel_workers_give_identical_output(tmp_path, sample_trade_zips, prepared):
    cfg = PrepareConfig(block_size=64, stride=32, workers=2)
    manifest = prepare(sample_trade_zips, tmp_path / "par", cfg)
    assert manifest["tokenizer_hash"] == prepared.manifest["tokenizer_hash"]
    for split in SPLITS:
        for symbol in prepared.symbols(split):
            assert (np.fromfile(tmp_path / "par" / "shards" / split / f"{symbol}.bin", dtype=np.uint16)
                    == np.asarray(prepared.tokens(split, symbol))).all()


def test_missing_input_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "nope.zip"], tmp_path / "out", CFG)


def test_splitting_a_file_in_two_changes_nothing(tmp_path, sample_trade_zips):
    """Files are processed in parallel; causal features across file edges stay exact."""
    source = next(p for p in sample_trade_zips if "BTCUSDT-trades-2024" in p.name)
    with zipfile.ZipFile(source) as zf:
        lines = zf.read(zf.namelist()[0]).decode().splitlines()
    first = tmp_path / "a" / "BTCUSDT-trades-2024-08-08.csv"
    second = tmp_path / "a" / "BTCUSDT-trades-2024-08-09.csv"
    first.parent.mkdir()
    first.write_text("\n".join(lines[:4321]) + "\n")
    second.write_text("\n".join(lines[4321:]) + "\n")
    cfg = PrepareConfig(block_size=32, stride=16, workers=1,
                        events=PrepareConfig().events.__class__(size_window=500))
    whole = prepare([source], tmp_path / "whole", cfg)
    split = prepare([first, second], tmp_path / "split", cfg)
    assert whole["tokenizer_hash"] == split["tokenizer_hash"]
    a, b = ShardSet.open(tmp_path / "whole"), ShardSet.open(tmp_path / "split")
    for s in SPLITS:
        assert (np.asarray(a.tokens(s, "BTCUSDT")) == np.asarray(b.tokens(s, "BTCUSDT"))).all()
        ea, eb = a.events(s, "BTCUSDT"), b.events(s, "BTCUSDT")
        assert ea["segment"].equals(eb["segment"]) and ea["token_pos"].equals(eb["token_pos"])
        np.testing.assert_allclose(ea["log_size"].to_numpy(), eb["log_size"].to_numpy(), atol=1e-9)
