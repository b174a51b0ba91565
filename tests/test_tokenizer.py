"""Tokenizer: train-only bins, mass points, mixed radix, round trips, the vocabulary budget."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mega_trading.core.errors import DataError
from mega_trading.data.events import compute_events
from mega_trading.data.tokenizer import Tokenizer, TokenizerConfig
from tests.test_events import make_trades


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    trades = make_trades(5000, seed=7)
    # Real order flow: most trades do not move the price.
    trades = trades.with_columns(
        pl.when(pl.col("trade_id") % 3 != 0).then(pl.col("price").shift(1)).otherwise(pl.col("price"))
        .fill_null(strategy="backward").alias("price"))
    return compute_events(trades)


@pytest.fixture(scope="module")
def tok(events) -> Tokenizer:
    return Tokenizer.fit(events)


def test_mixed_radix_layout(tok, events):
    sizes = tok.field_sizes
    assert tuple(sizes) == ("side", "move", "size", "dt")
    assert tok.n_event_tokens == sizes["side"] * sizes["move"] * sizes["size"] * sizes["dt"]
    assert (tok.pad_id, tok.seg_id, tok.vocab_size) == (tok.n_event_tokens, tok.n_event_tokens + 1,
                                                        tok.n_event_tokens + 2)
    tokens = tok.encode(events)
    idx = tok.field_indices(tokens)
    rebuilt = ((idx["side"] * sizes["move"] + idx["move"]) * sizes["size"] + idx["size"]) * sizes["dt"] + idx["dt"]
    assert (rebuilt == tokens).all()


def test_mass_points_have_their_own_bins(tok, events):
    idx = tok.field_indices(tok.encode(events))
    zero_move = events["move_bps"].to_numpy() == 0
    zero_dt = events["dt_us"].to_numpy() == 0
    assert np.unique(idx["move"][zero_move]).size == 1
    assert not np.isin(idx["move"][~zero_move], np.unique(idx["move"][zero_move])).any()
    assert (idx["dt"][zero_dt] == 0).all() and (idx["dt"][~zero_dt] > 0).all()


def test_every_vocabulary_entry_is_a_trade_event(tok, events):
    """The prototype gave half its vocabulary to an event type trades never have."""
    idx = tok.field_indices(tok.encode(events))
    for name, values in idx.items():
        assert np.unique(values).size == tok.field_sizes[name], f"field {name} has unused bins"
    decoded = tok.decode(np.arange(tok.vocab_size))
    assert decoded["is_event"].sum() == tok.vocab_size - 2
    assert tok.stats["realized_vocab"] > 0.1 * tok.n_event_tokens
    assert 1 < tok.stats["effective_vocab"] <= tok.stats["realized_vocab"]


def test_decode_then_encode_is_identity(tok):
    all_events = np.arange(tok.n_event_tokens)
    decoded = tok.decode(all_events)
    assert (tok.encode(decoded) == all_events).all()


def test_decoded_returns_are_not_a_three_valued_variable(tok):
    """Stylized facts need a rich return variable, not a 3-valued one."""
    decoded = tok.decode(np.arange(tok.n_event_tokens))
    assert decoded["move_bps"].n_unique() >= 10
    assert decoded["move_bps"].min() < 0 < decoded["move_bps"].max()


def test_representatives_are_training_medians(tok, events):
    idx = tok.field_indices(tok.encode(events))["size"]
    sizes = events["log_size"].to_numpy()
    for b in np.unique(idx):
        assert tok.size.representatives[b] == pytest.approx(np.median(sizes[idx == b]))


def test_outlier_tails_catch_unseen_extremes(tok, events):
    extreme = events.head(2).with_columns(move_bps=pl.Series([-1e6, 1e6]), log_size=pl.Series([-1e3, 1e3]),
                                          dt_us=pl.Series([1, 10**12]))
    idx = tok.field_indices(tok.encode(extreme))
    assert idx["move"].tolist() == [0, tok.field_sizes["move"] - 1]
    assert idx["size"].tolist() == [0, tok.field_sizes["size"] - 1]
    assert idx["dt"].tolist() == [1, tok.field_sizes["dt"] - 1]  # 1 us is not the zero bin


def test_save_load_roundtrip_and_hash(tok, events, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json", note="test")
    loaded = Tokenizer.load(path)
    assert loaded.hash == tok.hash
    assert (loaded.encode(events) == tok.encode(events)).all()
    refit = Tokenizer.fit(events, TokenizerConfig(size_bins=6))
    assert refit.hash != tok.hash


def test_tampered_artifact_is_refused(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    text = path.read_text().replace('"size_bins": 8', '"size_bins": 9')
    path.write_text(text)
    with pytest.raises(DataError, match="hash"):
        Tokenizer.load(path)


def test_token_outside_vocabulary_is_a_clear_error(tok):
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode(np.array([0, tok.vocab_size]))
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.field_indices(np.array([-1]))


def test_non_finite_feature_is_refused(tok, events):
    broken = events.head(5).with_columns(move_bps=pl.Series([0.0, float("nan"), 1.0, 2.0, 3.0]))
    with pytest.raises(DataError, match="row 1 .*move_bps"):
        tok.encode(broken)


def test_bin_index_follows_the_documented_intervals():
    """One searchsorted over all edges must give: negative bins [e_i, e_i+1), exactly 0
    (either sign) its own bin, positive bins [e_i, e_i+1), tails open-ended."""
    from mega_trading.data.field_bins import FieldBins

    signed = FieldBins("move", pos_edges=(1.0, 2.0), neg_edges=(-2.0, -1.0), zero_bin=True,
                       has_negative=True)
    values = [-9.0, -2.0, -1.5, -1.0, -1e-300, -0.0, 0.0, 5e-324, 0.5, 1.0, 1.5, 2.0, 9.0]
    assert signed.index(values).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert signed.n_bins == 7
    gaps = FieldBins("dt", pos_edges=(3.0,), zero_bin=True)  # no negative bins
    assert gaps.index([0.0, 1e-9, 3.0, 4.0]).tolist() == [0, 1, 2, 2]
    plain = FieldBins("size", pos_edges=(-1.0, 1.0))
    assert plain.index([-5.0, -1.0, 0.0, 1.0, 5.0]).tolist() == [0, 1, 1, 2, 2]


# --- in-bin decoding (tokenizer@2, @3) ------------------------------------------------------------

def test_in_bin_draws_stay_in_their_bin_and_re_encode(tok, events):
    tokens = tok.encode(events)
    decoded = tok.decode(tokens, seed=3)
    assert (tok.encode(decoded) == tokens).all()
    idx = tok.field_indices(tokens)
    assert (tok.move.index(decoded["move_bps"].to_numpy()) == idx["move"]).all()
    assert (tok.size.index(decoded["log_size"].to_numpy()) == idx["size"]).all()
    # draws inside a bin vary: far more distinct values than bins
    assert decoded["log_size"].n_unique() > 20 * tok.field_sizes["size"]


def test_in_bin_decoding_follows_the_training_distribution(tok, events):
    """Decoded sizes of the training events match the real sizes far better than medians."""
    from scipy import stats

    tokens = tok.encode(events)
    real = events["log_size"].to_numpy()
    in_bin = tok.decode(tokens, seed=0)["log_size"].to_numpy()
    median = tok.decode(tokens, mode="median")["log_size"].to_numpy()
    ks_in_bin = stats.ks_2samp(in_bin, real).statistic
    ks_median = stats.ks_2samp(median, real).statistic
    assert ks_in_bin < 0.03 < ks_median


def test_in_bin_decoding_is_seeded(tok):
    tokens = np.arange(tok.n_event_tokens)
    a, b = tok.decode(tokens, seed=5), tok.decode(tokens, seed=5)
    assert a.equals(b)
    assert not a.equals(tok.decode(tokens, seed=6))
    rng = np.random.default_rng(5)
    assert tok.decode(tokens, rng=rng).equals(a)


def test_median_mode_gives_the_representatives(tok):
    decoded = tok.decode(np.arange(tok.n_event_tokens), mode="median")
    idx = tok.field_indices(np.arange(tok.n_event_tokens))
    reps = np.asarray(tok.size.representatives)
    assert np.allclose(decoded["log_size"].to_numpy(), reps[idx["size"]])
    with pytest.raises(Exception, match="decode mode"):
        tok.decode(np.arange(3), mode="mean")


def test_outlier_bins_keep_a_heavy_tail(tok, events):
    """The open-ended bins extrapolate past the bin's training quantiles (a tail, not a
    wall at the largest training value), and stay finite."""
    top = tok.field_sizes["move"] - 1
    side_move = tok.field_sizes["move"] * tok.field_sizes["size"] * tok.field_sizes["dt"]
    token = side_move + top * tok.field_sizes["size"] * tok.field_sizes["dt"]  # a buy, top move
    # one stream per token: the plain table (no tick-class context, no level memory)
    moves = tok.decode(np.full(20000, token), seed=1, streams=np.arange(20000))["move_bps"].to_numpy()
    table = tok.move.quantiles[top]
    assert np.isfinite(moves).all() and moves.min() >= tok.move.pos_edges[-1]
    assert (moves > table[-2]).mean() == pytest.approx(1 / (len(table) - 1), abs=0.01)
    assert moves.max() > table[-1]  # beyond the largest training value ...
    assert moves.max() <= 1.5 * table[-1]  # ... but never far out of the market
    assert tok.move.tail_high is not None and tok.size.tail_low is not None


@pytest.mark.parametrize("old", ["tokenizer@1", "tokenizer@2", "tokenizer@3"])
def test_older_tokenizer_artifacts_are_refused_with_a_hint(tok, tmp_path, old):
    path = tok.save(tmp_path / "tokenizer.json")
    path.write_text(path.read_text().replace("mega-trading/tokenizer@4", f"mega-trading/{old}"))
    with pytest.raises(DataError, match=f"{old}.*prepare"):
        Tokenizer.load(path)


def test_quantile_tables_survive_save_load(tok, tmp_path):
    loaded = Tokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    tokens = np.arange(tok.n_event_tokens)
    assert loaded.decode(tokens, seed=2).equals(tok.decode(tokens, seed=2))


# --- context-aware move decoding (tokenizer@3, binning.MoveMemory) ---------------------------

def test_level_memory_snaps_only_to_a_recent_level_inside_the_bin():
    from mega_trading.data.binning import MoveMemory

    memory = MoveMemory(tick_window=0, n_classes=1, n_levels=4)
    one = np.zeros(1, dtype=np.int64)
    up, _ = memory.snap_to_levels(np.array([10.0]), np.array([5.0]), np.array([20.0]), one,
                                  np.array([True]))
    assert up[0] == 10.0  # nothing visited above: the draw is kept
    # back down: the start level lies 10 bps below, inside [-20, -5): snap to it exactly
    down, snapped = memory.snap_to_levels(np.array([-7.0]), np.array([-20.0]), np.array([-5.0]),
                                          one, np.array([False]))
    assert snapped[0] and down[0] == pytest.approx(np.expm1(-np.log1p(10.0 / 1e4)) * 1e4)
    assert (1 + up[0] / 1e4) * (1 + down[0] / 1e4) == pytest.approx(1.0, abs=1e-15)
    # up again, but the bin [12, 20) does not hold the +10 bps level: no snap
    far, snapped = memory.snap_to_levels(np.array([15.0]), np.array([12.0]), np.array([20.0]),
                                         one, np.array([False]))
    assert not snapped[0] and far[0] == 15.0
    # a new segment forgets the levels
    fresh, snapped = memory.snap_to_levels(np.array([-7.0]), np.array([-20.0]), np.array([-5.0]),
                                           one, np.array([True]))
    assert not snapped[0] and fresh[0] == -7.0


def test_tick_class_reads_only_the_stream_past():
    from mega_trading.data.binning import MoveMemory

    memory = MoveMemory(tick_window=3, n_classes=4, n_levels=0)
    ranks = np.array([0, 2, 0, 1, 0, 0, 0, 0, 3])
    streams = np.array([0, 0, 1, 0, 0, 0, 0, 1, 1])  # stream 1 interleaved
    reset = np.zeros(9, dtype=bool)
    classes = memory.tick_classes(ranks, streams, reset)
    # stream 0: -, r2 seen -> 2, then r1 -> 1 for 3 more events, then forgotten
    assert classes[[0, 1, 3, 4, 5, 6]].tolist() == [0, 0, 2, 1, 1, 1]
    assert classes[[2, 7, 8]].tolist() == [0, 0, 0]  # stream 1 never saw a move before
    again = memory.tick_classes(np.array([0]), np.array([0]), np.array([False]))
    assert again.tolist() == [0]  # stream 0's r1 is now 4 events back (> window)


def test_context_decoding_re_encodes_and_restores_the_bounce():
    """On real trades (bundled BTCUSDT + ETHUSDT day): in context, moves still re-encode to
    their token, and decoded prices come back to levels they left (the bid-ask bounce) about
    as often as real prices do; iid in-bin draws less often."""
    from tests.test_facts import _sample_events

    btc, eth = _sample_events()
    train = pl.concat([btc.head(int(btc.height * 0.7)), eth.head(int(eth.height * 0.7))])
    test = btc.tail(btc.height - int(btc.height * 0.7))
    context = Tokenizer.fit(train)
    plain = Tokenizer.fit(train, TokenizerConfig(tick_window=0, level_memory=0))
    assert context.move.context_quantiles and not plain.move.context_quantiles
    tokens = context.encode(test)
    assert (plain.encode(test) == tokens).all()  # same bins either way

    def returns_to_level(moves: np.ndarray) -> float:
        """Share of non-zero moves that bring the price back to where it was two moves ago."""
        log_price = np.cumsum(np.log1p(moves / 1e4))
        nonzero = np.flatnonzero(moves != 0)
        back = np.abs(log_price[nonzero[2:]] - log_price[nonzero[:-2]]) < 1e-9
        return float(back.mean())

    def decoded(tok) -> np.ndarray:
        frame = tok.decode(tokens, seed=4)
        assert (tok.encode(frame) == tokens).all()
        return frame["move_bps"].to_numpy()

    real = returns_to_level(test["move_bps"].to_numpy())
    # real: 19 % of BTC moves return to the level of two moves before; context 20 %; iid
    # draws 15 % (only where a bin is a single tick, so the draws cancel by chance)
    assert real > 0.1
    assert abs(returns_to_level(decoded(context)) - real) < 0.1 * real
    assert abs(returns_to_level(decoded(plain)) - real) > 0.2 * real


def test_context_tables_come_from_training_moves(events):
    train = events.head(int(events.height * 0.7))
    tok = Tokenizer.fit(train)
    moves = train["move_bps"].to_numpy()
    bins = tok.move.index(moves)
    for tables in tok.move.context_quantiles:
        for b, table in enumerate(tables):
            if table:
                inside = moves[bins == b]
                assert inside.min() <= table[0] <= table[-1] <= inside.max()


def test_move_memory_copies_one_stream_and_leaves_the_rest():
    from mega_trading.data.binning import MoveMemory

    a, b = MoveMemory(8, 4, 4), MoveMemory(8, 4, 4)
    streams, reset = np.array([0, 1, 0, 1]), np.zeros(4, dtype=bool)
    a.tick_classes(np.array([1, 2, 0, 0]), streams, reset)
    a.snap_to_levels(np.array([5.0, -5.0, 0.0, 0.0]), np.full(4, -np.inf), np.full(4, np.inf),
                     streams, reset)
    b.copy_stream(a, 1)
    assert b.tick_classes(np.array([0]), np.array([1]), np.array([False])).tolist() == [2]
    assert b.tick_classes(np.array([0]), np.array([0]), np.array([False])).tolist() == [0]
    b.copy_stream(MoveMemory(8, 4, 4), 1)  # a stream the other never saw: forgotten
    assert b.tick_classes(np.array([0]), np.array([1]), np.array([False])).tolist() == [0]
