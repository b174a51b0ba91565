"""Market simulator: exact fills on a hand-built tape, policies, determinism, closed loop."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from mega_trading.core.config import from_dict, to_dict
from mega_trading.core.errors import ConfigError
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import ShardSet
from mega_trading.model.transformer import ModelConfig, Transformer
from mega_trading.simulate import (
    Episode,
    ImpactConfig,
    ModelSourceFactory,
    PolicyConfig,
    ReplaySource,
    SimConfig,
    load_scenario,
    parse_duration,
    pick_starts,
    run_batch,
    simulate_episodes,
)
from mega_trading.simulate.policies import make_policy
from mega_trading.simulate.sources import _candidates, _tapes

# --- a hand-built tape: 4 events of history at 100, then 6 known trades, one per second ----

PRICES = [100.0, 100.0, 100.0, 100.0, 99.5, 99.0, 98.9, 99.2, 99.4, 99.6]
START = 3  # the episode starts right after row 3 (t = 3 s, price 100)


def hand_tape(prices=PRICES, touch_qty: float = 0.4) -> pl.DataFrame:
    quote = [10_000.0] * len(prices)
    quote[5] = 99.0 * touch_qty  # the trade at exactly 99 prints touch_qty base units
    return pl.DataFrame({"symbol": ["TEST"] * len(prices), "price": prices,
                         "time_us": [i * 1_000_000 for i in range(len(prices))],
                         "quote_qty": quote})


def hand_cfg(**kw) -> SimConfig:
    # recent notional V = the 4 history events = 40,000; 20 bps when an order's notional is V
    impact = kw.pop("impact", ImpactConfig(model="sqrt", coef_bps=20.0, window_events=4))
    return SimConfig(source="replay", episodes=1, batch_size=1, impact_lags=3,
                     bootstrap_samples=50, impact=impact, **kw)


def run_hand(policy: PolicyConfig, cfg: SimConfig | None = None, frame: pl.DataFrame | None = None):
    frame = hand_tape() if frame is None else frame
    cfg = cfg or hand_cfg()

    def factory(ids, seed):
        n = len(ids)
        return ReplaySource.from_frames([frame] * n, [START] * n, cfg.impact.window_events)

    return simulate_episodes(factory, policy, cfg, seed=0).episodes[0]


def test_parse_duration():
    assert parse_duration("300s") == 300.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("42") == 42.0
    for bad in ("five minutes", "-3s", "3d"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_immediate_buy_fills_at_sqrt_impact_price_with_exact_shortfall():
    row = run_hand(PolicyConfig(kind="immediate", side="buy", qty=1.0, horizon_s=0.0))
    # Q = 1 x 100 = 100 vs V = 40,000: 20 * sqrt(1/400) = 1 bps -> 100 * 1.0001
    assert row["fills"] == [{"t_s": 0.0, "qty": 1.0, "price": pytest.approx(100.01, abs=1e-12),
                             "kind": "market", "market_volume": 0.0}]
    assert row["avg_fill_price"] == pytest.approx(100.01, abs=1e-12)
    assert row["shortfall_bps"] == pytest.approx(1.0, abs=1e-9)
    assert row["fill_ratio"] == 1.0 and row["time_to_complete_s"] == 0.0
    # the tape after completion (open loop: the fill does not move it): 100, 99.5, 99, 98.9
    assert row["impact_bps"] == pytest.approx([0.0, -50.0, -100.0, -110.0], abs=1e-9)


def test_sell_side_shortfall_and_impact_are_sign_adjusted():
    row = run_hand(PolicyConfig(kind="immediate", side="sell", qty=1.0, horizon_s=0.0))
    assert row["avg_fill_price"] == pytest.approx(99.99, abs=1e-12)
    assert row["shortfall_bps"] == pytest.approx(1.0, abs=1e-9)  # a cost is positive for sells too
    assert row["impact_bps"] == pytest.approx([0.0, 50.0, 100.0, 110.0], abs=1e-9)


def test_linear_impact_rule():
    cfg = hand_cfg(impact=ImpactConfig(model="linear", coef_bps=20.0, window_events=4))
    row = run_hand(PolicyConfig(kind="immediate", qty=4.0, horizon_s=0.0), cfg)
    # Q = 400 vs V = 40,000: 20 * 0.01 = 0.2 bps
    assert row["avg_fill_price"] == pytest.approx(100.0 * (1 + 0.2e-4), abs=1e-12)
    assert row["shortfall_bps"] == pytest.approx(0.2, abs=1e-9)


def limit_at_99(**kw) -> PolicyConfig:
    # one slice resting 100 bps under the arrival price 100: a buy limit at 99
    return PolicyConfig(kind="twap_limit", qty=1.0, horizon_s=4.5, slices=1,
                        limit_offset_bps=100.0, **kw)


def test_limit_buy_fills_only_when_a_trade_prints_below_it():
    row = run_hand(limit_at_99())
    # 99.5 (t=1 s) and exactly 99.0 (t=2 s) do not fill; 98.9 (t=3 s) trades through
    seen = 10_000 / 99.5 + 0.4 + 10_000 / 98.9  # base units the market traded until then
    assert row["fills"] == [{"t_s": 3.0, "qty": 1.0, "price": pytest.approx(99.0, abs=1e-12),
                             "kind": "limit", "market_volume": pytest.approx(seen)}]
    assert row["shortfall_bps"] == pytest.approx(-100.0, abs=1e-9)  # bought 1 % below arrival
    assert row["time_to_complete_s"] == 3.0
    assert row["impact_bps"] == pytest.approx([-110.0, -80.0, -60.0, -40.0], abs=1e-9)


def test_limit_buy_fills_at_touch_up_to_the_printed_quantity():
    row = run_hand(limit_at_99(), hand_cfg(queue="touch"))
    fills = [(f["t_s"], f["qty"], f["price"]) for f in row["fills"]]
    # the print at exactly 99 fills its 0.4 units, the trade through 99 the rest
    assert fills == [(2.0, pytest.approx(0.4), pytest.approx(99.0)),
                     (3.0, pytest.approx(0.6), pytest.approx(99.0))]
    assert row["filled_qty"] == pytest.approx(1.0)


def test_unfilled_limit_without_finish_leaves_opportunity_cost():
    row = run_hand(limit_at_99(finish=False), frame=hand_tape([100.0] * 4 + [99.5] * 6))
    assert row["fills"] == [] and row["fill_ratio"] == 0.0
    assert row["time_to_complete_s"] is None and row["ended_after_s"] == 4.5
    # nothing bought; the price fell 50 bps meanwhile: a negative cost (a gain) of 50 bps
    assert row["shortfall_bps"] == pytest.approx(-50.0, abs=1e-9)


def test_twap_slices_run_on_schedule_and_sum_to_the_target():
    row = run_hand(PolicyConfig(kind="twap", qty=1.0, horizon_s=3.0, slices=3))
    fills = row["fills"]
    # slices at 0, 1, 2 s; a slice due at the same instant as a trade runs before it
    assert [f["t_s"] for f in fills] == [0.0, 1.0, 2.0]
    assert [f["qty"] for f in fills] == pytest.approx([1 / 3] * 3)
    assert sum(f["qty"] for f in fills) == pytest.approx(1.0, rel=1e-12)
    cost = 1 + 20.0 * np.sqrt(100.0 / 3 / 40_000) / 1e4
    assert [f["price"] for f in fills] == pytest.approx([100.0 * cost, 100.0 * cost, 99.5 * cost])


# --- a tiny random model on real prepared data ---------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    from mega_trading.data.bundled import sample_files

    out = tmp_path_factory.mktemp("sim") / "data"
    prepare(sample_files("trades"), out, PrepareConfig(block_size=64, stride=32, workers=1))
    return ShardSet.open(out)


@pytest.fixture(scope="module")
def model(shards) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro", vocab_size=shards.vocab_size, n_layer=1, d_model=32,
                                  n_head=4, n_kv_head=2, block_size=64)
    return Transformer(cfg).eval()


def model_cfg(**kw) -> SimConfig:
    base = {"prompt_length": 32, "episodes": 4, "batch_size": 4, "impact_lags": 4,
            "symbol": "ETHUSDT", "bootstrap_samples": 100}
    return SimConfig(**{**base, **kw})


def run_model_batch(shards, model, policy: PolicyConfig, cfg: SimConfig, seed: int = 0):
    """One batch by hand, keeping the source and the episodes for inspection."""
    tapes, starts = pick_starts(shards, cfg, policy.horizon_s, seed)
    source = ModelSourceFactory(model, shards, tapes, starts, cfg)(range(cfg.episodes), seed)
    episodes = [Episode(s, policy.sign, policy.qty, policy.horizon_us, cfg.impact, cfg.queue,
                        cfg.impact_lags, shards.size_window,
                        source.encode if cfg.closed_loop else None) for s in source.starts]
    run_batch(source, episodes, [make_policy(policy) for _ in episodes], cfg.max_events)
    return source, episodes


def simulate_model(shards, model, policy: PolicyConfig, cfg: SimConfig, seed: int = 0):
    tapes, starts = pick_starts(shards, cfg, policy.horizon_s, seed)
    factory = ModelSourceFactory(model, shards, tapes, starts, cfg)
    return simulate_episodes(factory, policy, cfg, seed, shards.size_window)


TWAP = PolicyConfig(kind="twap", qty=2.0, horizon_s=2.0, slices=4)


def test_same_seed_gives_identical_results_and_another_seed_does_not(shards, model):
    def doc(seed: int) -> str:
        result = simulate_model(shards, model, TWAP, model_cfg(), seed=seed)
        return json.dumps(result.to_dict(), sort_keys=True)

    first, again, other = doc(0), doc(0), doc(1)
    assert first == again
    assert first != other


def test_batches_of_a_run_share_one_engine_and_match_new_engines(shards, model):
    """A factory's sources decode on its one engine, batch after batch (the cache zeroed
    and reused when the batch size repeats): the episodes a new engine per batch gives."""
    from mega_trading.generation.engine import DecodeEngine

    cfg = model_cfg(episodes=10, batch_size=4, closed_loop=True, decode="in_bin")  # 4, 4, 2
    tapes, starts = pick_starts(shards, cfg, TWAP.horizon_s, 0)
    shared = ModelSourceFactory(model, shards, tapes, starts, cfg)
    engines = []

    def counted(ids, seed):
        source = ModelSourceFactory.__call__(shared, ids, seed)
        engines.append(source.engine)
        return source

    fresh = ModelSourceFactory(model, shards, tapes, starts, cfg)

    def renewed(ids, seed):
        fresh.engine = DecodeEngine(model, keep=cfg.keep, specials=(shards.tokenizer.pad_id,
                                                                    shards.tokenizer.seg_id))
        return ModelSourceFactory.__call__(fresh, ids, seed)

    def doc(factory) -> str:
        result = simulate_episodes(factory, TWAP, cfg, 3, shards.size_window)
        return json.dumps(result.to_dict(), sort_keys=True)

    assert doc(counted) == doc(renewed)
    assert len(engines) == 3 and all(e is shared.engine for e in engines)


def test_closed_and_open_loop_contexts_agree_until_the_first_inserted_fill(shards, model):
    closed_src, closed_eps = run_model_batch(shards, model, TWAP, model_cfg(closed_loop=True))
    open_src, open_eps = run_model_batch(shards, model, TWAP, model_cfg(closed_loop=False))
    np.testing.assert_array_equal(closed_src.prompts, open_src.prompts)
    closed_tok, closed_forced = closed_src.history()
    open_tok, open_forced = open_src.history()
    assert not open_forced.any() and all(not ep.prints for ep in open_eps)
    for b, ep in enumerate(closed_eps):
        inserted = np.flatnonzero(closed_forced[b])
        assert len(inserted) == len(ep.prints) == len(ep.fills) > 0
        first = inserted[0]
        np.testing.assert_array_equal(closed_tok[b, :first], open_tok[b, :first])
        # the inserted token is the tokenizer's encoding of the agent's first fill
        p = ep.prints[0]
        assert closed_tok[b, first] == closed_src.encode(p.side, p.move_bps, p.log_size, p.dt_us)
        assert p.side == 1 and p.move_bps > 0  # an aggressive buy lifts the tape
    # ... and at the inserted steps the two contexts do differ (on the steps both ran:
    # after the first fill the two timelines differ, so one may reach the horizon sooner)
    steps = min(closed_tok.shape[1], open_tok.shape[1])
    forced = closed_forced[:, :steps]
    assert forced.any()
    assert (closed_tok[:, :steps][forced] != open_tok[:, :steps][forced]).any()


def test_a_policy_that_never_fills_sees_identical_contexts_in_both_loops(shards, model):
    # one limit slice 50 % away, no market order at the horizon: nothing ever trades
    never = PolicyConfig(kind="twap_limit", qty=1.0, horizon_s=2.0, slices=1,
                         limit_offset_bps=5000.0, finish=False)
    closed_src, closed_eps = run_model_batch(shards, model, never, model_cfg(closed_loop=True))
    open_src, _ = run_model_batch(shards, model, never, model_cfg(closed_loop=False))
    closed_tok, closed_forced = closed_src.history()
    open_tok, _ = open_src.history()
    assert not closed_forced.any() and all(not ep.fills for ep in closed_eps)
    np.testing.assert_array_equal(closed_tok, open_tok)


def test_closed_loop_buying_pushes_the_tape_up_and_open_loop_does_not_see_it(shards, model):
    big = PolicyConfig(kind="immediate", qty=50.0, horizon_s=0.0)
    closed = simulate_model(shards, model, big, model_cfg(closed_loop=True, impact_lags=2))
    opened = simulate_model(shards, model, big, model_cfg(closed_loop=False, impact_lags=2))
    for c, o in zip(closed.episodes, opened.episodes):
        assert c["avg_fill_price"] == o["avg_fill_price"]  # same start, same impact rule
        assert c["impact_bps"][0] == pytest.approx(c["shortfall_bps"])  # the tape is at the fill
        assert o["impact_bps"][0] == 0.0  # the market never saw it
    assert closed.closed_loop and not opened.closed_loop


def test_twap_slices_sum_to_the_target_on_model_flow(shards, model):
    policy = PolicyConfig(kind="twap", qty=3.0, horizon_s=2.0, slices=7)
    for row in simulate_model(shards, model, policy, model_cfg()).episodes:
        qty = [f["qty"] for f in row["fills"]]
        assert len(qty) == 7 and qty == pytest.approx([3.0 / 7] * 7)
        assert sum(qty) == pytest.approx(3.0, rel=1e-12)
        times = [f["t_s"] for f in row["fills"]]
        assert times == pytest.approx([k * 2.0 / 7 for k in range(7)], abs=1e-6)
        assert row["fill_ratio"] == pytest.approx(1.0)


def test_participation_stays_within_its_rate_and_child_cap(shards, model):
    policy = PolicyConfig(kind="participation", qty=20.0, horizon_s=2.0, rate=0.2,
                          max_child_fraction=0.01, min_child_fraction=0.005)
    cap = 0.01 * 20.0
    capped = 0
    for closed in (True, False):
        rows = simulate_model(shards, model, policy, model_cfg(closed_loop=closed)).episodes
        for row in rows:
            *children, last = row["fills"]
            done = 0.0
            for fill in children:
                assert fill["t_s"] < 2.0 and fill["qty"] <= cap * (1 + 1e-12)
                done += fill["qty"]
                assert done <= 0.2 * fill["market_volume"] * (1 + 1e-9)
                capped += fill["qty"] == pytest.approx(cap)
            assert last["t_s"] == 2.0 and last["kind"] == "market"  # finished at the horizon
            assert row["fill_ratio"] == pytest.approx(1.0)
    assert capped > 0  # the cap did bind, so the check above could have failed


def test_replay_flow_ignores_fills_even_when_asked_for_closed_loop(shards):
    policy = PolicyConfig(kind="twap", qty=5.0, horizon_s=1.0, slices=3)
    docs = []
    for closed in (True, False):
        cfg = model_cfg(source="replay", closed_loop=closed)
        tapes, starts = pick_starts(shards, cfg, policy.horizon_s, 0)
        from mega_trading.simulate import ReplaySourceFactory

        result = simulate_episodes(ReplaySourceFactory(tapes, starts), policy, cfg, 0)
        assert result.closed_loop is False and result.source == "replay"
        docs.append(json.dumps(result.to_dict(), sort_keys=True))
    assert docs[0] == docs[1]


def test_scenarios_load_and_reject_unknown_keys(tmp_path):
    calm, stressed, hot = (load_scenario(n) for n in ("calm", "stressed", "hot"))
    assert (calm.selection, stressed.selection) == ("random", "high_vol")
    # calm / stressed take the run's measured sampling; hot sets its own, hotter one
    assert calm.sampling is None and stressed.sampling is None
    assert hot.sampling.temperature > 1
    assert from_dict(SimConfig, to_dict(stressed)) == stressed
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvolatility: high\n")
    with pytest.raises(ConfigError, match="volatility"):
        load_scenario(str(bad))
    with pytest.raises(ConfigError, match="unknown scenario"):
        load_scenario("no-such-scenario")


def test_high_vol_selection_draws_only_the_most_volatile_windows(shards):
    cfg = model_cfg(selection="high_vol", vol_top_fraction=0.2, episodes=40, symbol=None)
    _, starts = pick_starts(shards, cfg, 2.0, seed=0)
    tapes = _tapes(shards, "backtest", None, cfg)
    vols = np.concatenate([_candidates(t, cfg, 2_000_000)[1] for t in tapes])
    threshold = np.quantile(vols, 0.8, method="higher")
    assert all(s.vol_bps >= threshold for s in starts)
    _, calm = pick_starts(shards, dataclasses.replace(cfg, selection="random"), 2.0, seed=0)
    assert np.mean([s.vol_bps for s in calm]) < np.mean([s.vol_bps for s in starts])


def test_a_tape_over_the_cap_is_a_sample_of_real_windows(shards):
    """Above max_tape_events the tape is windows read alone: each window's rows, tokens and
    token positions equal the whole tape's at the same rows, and starts still come out."""
    whole = {t.symbol: t for t in _tapes(shards, "backtest", None, model_cfg(symbol=None))}
    cfg = model_cfg(symbol=None, max_tape_events=600, tape_window_events=150)
    windows = _tapes(shards, "backtest", None, cfg)
    assert len(windows) >= 4 and sum(len(t) for t in windows) <= 600 + 150 * len(whole)
    for tape in windows:
        full = whole[tape.symbol]
        first = int(np.searchsorted(full.token_pos, tape.token_pos[0]))
        rows = slice(first, first + len(tape))
        assert np.array_equal(tape.token_pos, full.token_pos[rows])
        assert np.array_equal(tape.token, full.token[rows])
        assert np.array_equal(tape.time_us, full.time_us[rows])
        assert np.array_equal(tape.price, full.price[rows])
    _, starts = pick_starts(shards, dataclasses.replace(cfg, episodes=8), 2.0, seed=0)
    assert len(starts) == 8


# --- command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(shards, model, tmp_path_factory):
    from mega_trading.model.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("sim") / "run"
    save_checkpoint(run, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), sampler_state={},
                    config={"model": to_dict(model.cfg)}, tokenizer_hash=shards.tokenizer_hash,
                    manifest_hash=shards.manifest_hash)
    return run


def test_cli_simulate_writes_metrics_curve_and_lineage(shards, run, tmp_path):
    from mega_trading.cli import main

    out = tmp_path / "sim.json"
    args = ["simulate", "--run", str(run), "--data", str(shards.root), "--policy",
            "immediate,twap,participation", "--side", "sell", "--qty", "0.5", "--horizon", "2s",
            "--episodes", "4", "--scenario", "calm", "--symbol", "ETHUSDT", "--seed", "3",
            "--device", "cpu", "--set", "prompt_length=32", "--set", "impact_lags=4",
            "--out", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "mega-trading/simulate@1" and doc["scenario"] == "calm"
    assert doc["source"] == "model" and doc["closed_loop"] is True and doc["seed"] == 3
    assert doc["policy_order"] == ["immediate", "twap", "participation"] == sorted(
        doc["policies"], key=doc["policy_order"].index)
    for res in doc["policies"].values():
        assert res["policy"]["side"] == "sell" and res["policy"]["horizon_s"] == 2.0
        assert len(res["episodes"]) == 4 and res["summary"]["episodes"] == 4
        lo, hi = res["summary"]["shortfall_bps"]["ci95"]
        assert lo <= res["summary"]["shortfall_bps"]["mean"] <= hi
        assert res["impact_curve"]["lags"] == [0, 1, 2, 3, 4]
        assert len(res["impact_curve"]["mean_bps"]) == 5
    assert set(doc["paired_shortfall"]) == {"baseline", "twap", "participation"}
    assert doc["lineage"]["tokenizer_hash"] == shards.tokenizer_hash
    assert doc["lineage"]["checkpoint_step"] == 1 and doc["lineage"]["run_dir"] == str(run)
    assert doc["lineage"]["scenario_file"].endswith("calm.yaml")
    assert doc["config"]["prompt_length"] == 32
    # the same command without the model: the real continuations of the same starts
    replay = tmp_path / "replay.json"
    replay_args = [a if a != str(out) else str(replay) for a in args]
    assert main([*replay_args, "--source", "replay", "--open-loop"]) == 0
    rdoc = json.loads(replay.read_text())
    assert rdoc["source"] == "replay" and rdoc["closed_loop"] is False
    starts = [(r["symbol"], r["start_row"]) for r in doc["policies"]["twap"]["episodes"]]
    assert starts == [(r["symbol"], r["start_row"]) for r in rdoc["policies"]["twap"]["episodes"]]


def test_cli_simulate_user_errors_are_one_line(shards, tmp_path):
    from mega_trading.cli import main

    base = ["simulate", "--data", str(shards.root), "--qty", "1", "--out", str(tmp_path / "x.json")]
    assert main(base) == 2  # the model source needs --run
    assert main([*base, "--source", "replay", "--policy", "vwap"]) == 2
    assert main([*base, "--source", "replay", "--horizon", "soon"]) == 2
    assert not (tmp_path / "x.json").exists()


def test_model_source_starts_anywhere_when_no_real_continuation_spans_the_horizon(shards, run):
    from mega_trading.core.errors import DataError
    from mega_trading.simulate import run_simulation

    # ETHUSDT's backtest tape spans about 22 s: no start has 60 s of real continuation
    policies = {"twap": PolicyConfig(kind="twap", qty=1.0, horizon_s=60.0, slices=2)}
    cfg = model_cfg(episodes=2, batch_size=2, max_events=40)
    doc = run_simulation(shards.root, policies, cfg, run_dir=run)
    assert doc["config"]["replayable_starts"] is False
    assert doc["policies"]["twap"]["summary"]["truncated"] == 2  # 40 events < 60 s here
    reasons = [ep["truncated"] for ep in doc["policies"]["twap"]["episodes"]]
    assert all(r.startswith("max_events=40 reached ") and "s into the episode" in r for r in reasons)
    assert doc["sampling"]["source"] in ("default", "measured", "explicit")
    with pytest.raises(DataError, match="replayable_starts"):
        run_simulation(shards.root, policies, dataclasses.replace(cfg, source="replay"))
