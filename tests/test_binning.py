"""In-bin draws: all entries at once (`binning.draw_in_bins`) give, bit for bit, what a pass
per bin through np.interp gave (the implementation before issue 18's short requests), and
decoding draws a step's moves in one pass with each tick class's table."""

from __future__ import annotations

import numpy as np
import pytest

from mega_trading.data import binning
from mega_trading.data.binning import BinTail, draw_in_bins


def draw_per_bin(bin_index, quantiles, rng, tails=None, log_tail=False, uniforms=None):
    """The former draw_in_bins: one np.interp pass per distinct bin (the reference)."""
    bin_index = np.asarray(bin_index, dtype=np.int64)
    u, v = uniforms if uniforms is not None else (rng.random(bin_index.shape),
                                                  rng.random(bin_index.shape))
    out = np.empty(bin_index.shape, dtype=np.float64)
    for b in np.unique(bin_index):
        rows = bin_index == b
        table = np.asarray(quantiles[b], dtype=np.float64)
        if table.size == 1:
            out[rows] = table[0]
            continue
        levels = np.linspace(0.0, 1.0, table.size)
        values = np.clip(np.interp(u[rows], levels, table), table[0], table[-1])
        tail, upper = (tails or {}).get(int(b), (None, True))
        if tail is not None:
            in_tail = u[rows] > levels[-2] if upper else u[rows] < levels[1]
            drawn = binning._tail_draw(tail, upper, v[rows][in_tail], log_tail)
            extreme = table[-1] if upper else table[0]
            if log_tail:
                limit = np.abs(extreme) * binning.TAIL_CAP
                drawn = np.sign(drawn) * np.minimum(np.abs(drawn), limit)
            else:
                drawn = (np.minimum(drawn, extreme + binning.LOG_TAIL_CAP) if upper
                         else np.maximum(drawn, extreme - binning.LOG_TAIL_CAP))
            values[in_tail] = drawn
        out[rows] = values
    return out


def random_tables(rng: np.random.Generator, n_bins: int, sizes=(33,)) -> tuple:
    """Sorted tables of mixed lengths; some with repeated values (mass points, flat runs)
    and a one-entry bin."""
    tables = []
    for b in range(n_bins):
        size = 1 if b == 3 else int(rng.choice(sizes))
        values = np.sort(rng.normal(b, 1 + b, size) * rng.choice([1e-3, 1.0, 1e3]))
        if b % 4 == 1:
            values[: size // 2] = values[size // 2]  # a flat run
        if b == 5:
            values[:] = -0.0 if b % 2 else 0.0  # a mass point at (signed) zero
        tables.append(tuple(float(x) for x in values))
    return tuple(tables)


def assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.int64), b.view(np.int64))  # -0.0, NaN alike


@pytest.mark.parametrize("sizes", [(33,), (2, 5, 33), (3,)])
@pytest.mark.parametrize("log_tail", [False, True])
def test_draws_equal_a_pass_per_bin_through_np_interp(sizes, log_tail):
    rng = np.random.default_rng(sum(sizes) + log_tail)
    tables = random_tables(rng, 12, sizes)
    tails = {0: (BinTail(tables[0][1] if len(tables[0]) > 1 else -1.0, 0.4, 1.0), False),
             11: (BinTail(tables[11][-2] if len(tables[11]) > 1 else 1.0, 0.3, 1.0), True)}
    for _ in range(40):
        bins = rng.integers(0, 12, int(rng.integers(1, 200)))
        seed = int(rng.integers(1 << 30))
        expected = draw_per_bin(bins, tables, np.random.default_rng(seed), tails, log_tail)
        got = draw_in_bins(bins, tables, np.random.default_rng(seed), tails, log_tail)
        assert_bitwise_equal(got, expected)


def test_exact_knots_and_ends_of_the_unit_interval():
    """u on a table's knots (np.interp gives the knot's value), at 0, just below 1; and
    uniforms outside [0, 1) or NaN (np.interp's own ends), on tables of every length."""
    rng = np.random.default_rng(1)
    tables = random_tables(rng, 8, (2, 9, 33))
    bins = np.repeat(np.arange(8), 40)
    u = np.concatenate([np.linspace(0, 1, 33)[:32], [0.0, np.nextafter(1.0, 0), 0.5,
                                                     1 / 3, 2 / 3, 0.25, 0.75, 1e-300]])
    u = np.tile(u, 8)
    v = np.random.default_rng(2).random(u.shape)
    assert_bitwise_equal(draw_in_bins(bins, tables, None, uniforms=(u, v)),
                         draw_per_bin(bins, tables, None, uniforms=(u, v)))
    odd = u.copy()
    odd[::7], odd[3::11], odd[5::13] = 1.0, -0.25, np.nan
    assert_bitwise_equal(draw_in_bins(bins, tables, None, uniforms=(odd, v)),
                         draw_per_bin(bins, tables, None, uniforms=(odd, v)))


def test_non_finite_tables_take_numpy_itself():
    tables = ((0.0, 1.0, np.inf), (-np.inf, 0.0, 2.0), (1.0, 2.0, 3.0))
    bins = np.array([0, 1, 2, 0, 1, 2, 0])
    u = np.array([0.2, 0.7, 0.5, 0.75, 0.0, 0.9, 0.5])
    v = np.zeros_like(u)
    with np.errstate(invalid="ignore"):
        expected = draw_per_bin(bins, tables, None, uniforms=(u, v))
    assert_bitwise_equal(draw_in_bins(bins, tables, None, uniforms=(u, v)), expected)


def test_tables_are_arranged_once_per_tuple():
    tables = random_tables(np.random.default_rng(3), 6)
    first = binning.quantile_arrays(tables)
    assert binning.quantile_arrays(tables) is first
    copy = tuple(tuple(t) for t in tables)  # equal, not the same object: its own arrays
    assert binning.quantile_arrays(copy) is not first
    np.testing.assert_array_equal(binning.quantile_arrays(copy).values, first.values)


def test_two_uniforms_per_entry_whatever_the_bins():
    tables = random_tables(np.random.default_rng(4), 6)
    rng = np.random.default_rng(5)
    draw_in_bins(np.array([0, 3, 5]), tables, rng)
    after = rng.random()
    rng = np.random.default_rng(5)
    rng.random(3), rng.random(3)
    assert rng.random() == after


def test_a_step_of_moves_draws_each_tick_class_table():
    """Tokenizer._decode_moves draws every move in one pass from its tick class's table
    (the plain table where the class has none): the values of a pass per class."""
    from mega_trading.data.tokenizer import Tokenizer
    from tests.test_facts import _sample_events

    btc, eth = _sample_events()
    tok = Tokenizer.fit(btc.head(8000).vstack(eth.head(8000)))
    assert any(not all(tables) for tables in tok.move.context_quantiles)  # some borrowed
    tokens = np.random.default_rng(6).integers(0, tok.n_event_tokens, 3000)
    streams = np.random.default_rng(7).integers(0, 5, 3000)
    got = tok.decode_fields(tokens, seed=8, streams=streams)["move_bps"]

    bins = tok.move
    memory = tok.decode_memory()
    rng = np.random.default_rng(8)
    move_index = tok.field_indices(tokens)["move"]
    i = np.maximum(move_index, 0)
    u, v = rng.random(i.shape), rng.random(i.shape)
    classes = memory.tick_classes(binning.move_ranks(move_index, bins.n_neg, memory.n_classes),
                                  streams, np.zeros(tokens.size, dtype=bool))
    tails = {0: (bins.tail_low, False), bins.n_bins - 1: (bins.tail_high, True)}
    move = draw_per_bin(i, bins.quantiles, None, tails, True, uniforms=(u, v))
    for c, tables in enumerate(bins.context_quantiles, start=1):
        pick = (classes == c) & np.array([bool(t) for t in tables])[i]
        if pick.any():
            move[pick] = draw_per_bin(i[pick], tables, None, uniforms=(u[pick], v[pick]))
    lower, upper = bins.bounds
    expected, _ = memory.snap_to_levels(move, lower[i], upper[i], streams,
                                        np.zeros(tokens.size, dtype=bool))
    assert_bitwise_equal(got, expected)
