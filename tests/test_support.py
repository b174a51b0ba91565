"""Tick-consistent sampling (generation/support.py): the tokenizer counts each move and gap
bin per tick class on TRAINING events, the engine tracks each row's tick class exactly as
the decoder's MoveMemory does, and a sampling config with tick_support never draws a token
whose bins the row's class never showed."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from mega_trading.data.binning import MoveMemory
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.generation.generate import generate, generate_nocache
from mega_trading.generation.sampling import SamplingConfig
from mega_trading.generation.support import TickSupport
from mega_trading.model.transformer import ModelConfig, Transformer


def two_markets(n: int = 4000, seed: int = 0) -> pl.DataFrame:
    """A fine-tick busy market (moves of a few hundredths of a bps, ms gaps) and a
    coarse-tick thin one (8 and 16 bps moves, gaps of seconds), one after the other."""
    rng = np.random.default_rng(seed)

    def market(symbol: str, ticks: list[float], dt_scale_us: float) -> pl.DataFrame:
        move = rng.choice([0.0, 0.0, 0.0, *ticks, *(-t for t in ticks)], size=n)
        return pl.DataFrame({"symbol": [symbol] * n, "side": rng.choice([-1, 1], size=n),
                             "move_bps": move, "log_size": rng.normal(0, 1, n),
                             "dt_us": rng.exponential(dt_scale_us, n).astype(np.int64),
                             "segment_start": [True] + [False] * (n - 1)})

    return pl.concat([market("FINE", [0.01, 0.02, 0.04], 2_000),
                      market("COARSE", [8.0, 16.0], 5_000_000)])


def test_tokenizer_counts_bins_per_tick_class_on_training_events(tmp_path):
    events = two_markets()
    tok = Tokenizer.fit(events)
    allowed = tok.tick_support()
    assert allowed.shape == (tok.config["tick_classes"] + 1, tok.n_event_tokens)
    assert allowed[0].all()  # no tick seen yet: no restriction
    idx = {name: tok.field_indices_from_events(events.filter(pl.col("symbol") == name))
           for name in ("FINE", "COARSE")}
    memory = tok.decode_memory()
    from mega_trading.data.binning import move_ranks
    fine_class = int(np.min(move_ranks(idx["FINE"]["move"], tok.move.n_neg, memory.n_classes)[
        idx["FINE"]["move"] != tok.move.n_neg]))
    coarse_bins = set(idx["COARSE"]["move"].tolist()) - set(idx["FINE"]["move"].tolist())
    assert coarse_bins, "the coarse market's moves need bins of their own for this test"
    token_move = tok.field_indices(np.arange(tok.n_event_tokens))["move"]
    # at the fine market's class, its own moves are allowed and the coarse-only moves never
    assert not allowed[fine_class, np.isin(token_move, list(coarse_bins))].any()
    fine_tokens = np.unique(tok.encode(events.filter(pl.col("symbol") == "FINE")))
    assert allowed[fine_class, fine_tokens].mean() > 0.95
    # the counts are part of the artifact: they survive save / load and enter the hash
    again = Tokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    assert again.move.context_counts == tok.move.context_counts
    assert (again.tick_support() == allowed).all() and again.hash == tok.hash


def test_engine_state_gives_the_decoders_tick_class():
    """TickSupport's per-row class after every prefix == MoveMemory.tick_classes on the
    token stream (SEG resets, every token is a step) at every event, for random streams."""
    rng = np.random.default_rng(3)
    vocab, seg, window, n_classes = 30, 29, 5, 3
    ranks = rng.integers(0, n_classes + 1, size=vocab)
    ranks[seg] = 0
    support = TickSupport(np.ones((n_classes + 1, vocab), dtype=bool), ranks, seg, window)
    for _ in range(20):
        stream = rng.integers(0, vocab, size=60)
        stream[rng.random(60) < 0.05] = seg
        expected = MoveMemory(window, n_classes, 0).tick_classes(
            ranks[stream], np.zeros(60, dtype=np.int64), stream == seg)
        cut = int(rng.integers(1, 30))
        recent = support.start(torch.from_numpy(stream[None, :cut]))
        got = [int(support.classes(recent)[0])]
        for token in stream[cut:-1]:
            recent = support.push(recent, torch.tensor([int(token)]))
            got.append(int(support.classes(recent)[0]))
        # at a SEG itself MoveMemory restarts first (class 0); the sampler cannot know the
        # next token is a SEG, and SEG is allowed in every class, so only events compare
        events = stream[cut:] != seg
        assert np.array_equal(np.array(got)[events], expected[cut:][events])


VOCAB, BLOCK, SEG = 24, 12, 23


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro", vocab_size=VOCAB, n_layer=1, d_model=32, n_head=4,
                                  n_kv_head=2, ffn_hidden=32, block_size=BLOCK, init_std=0.5)
    return Transformer(cfg).eval()


def test_tick_support_sampling_never_draws_outside_the_rows_support(tiny_model):
    rng = np.random.default_rng(1)
    ranks = rng.integers(0, 3, size=VOCAB)
    ranks[[VOCAB - 2, SEG]] = 0
    allowed = rng.random((3, VOCAB)) < 0.5
    allowed[0] = True
    allowed[:, [VOCAB - 2, SEG]] = True
    support = TickSupport(allowed, ranks, SEG, window=4)
    prompt = torch.from_numpy(rng.integers(0, VOCAB - 2, size=(6, 5)))
    on = SamplingConfig(tick_support=True, forbid_seg=True)
    out = generate(tiny_model, prompt, 30, on, torch.Generator().manual_seed(2),
                   specials=(VOCAB - 2, SEG), support=support)  # 5 + 30 > 12: the window slides
    for row in out.numpy():
        classes = MoveMemory(4, 2, 0).tick_classes(ranks[row], np.zeros(len(row), dtype=np.int64),
                                                   row == SEG)
        assert all(allowed[c, t] for c, t in zip(classes[5:], row[5:]))
    # the uncached reference draws the same tokens; without tick_support the mask is unused
    ref = generate_nocache(tiny_model, prompt, 30, on, torch.Generator().manual_seed(2),
                           specials=(VOCAB - 2, SEG), support=support)
    assert torch.equal(out, ref)
    off = SamplingConfig(forbid_seg=True)
    plain = generate(tiny_model, prompt, 30, off, torch.Generator().manual_seed(2),
                     specials=(VOCAB - 2, SEG))
    assert torch.equal(plain, generate(tiny_model, prompt, 30, off,
                                       torch.Generator().manual_seed(2),
                                       specials=(VOCAB - 2, SEG), support=support))
    assert not torch.equal(plain, out)
