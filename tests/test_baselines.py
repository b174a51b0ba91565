"""Baselines: known-entropy sequences, proper distributions, Kneser-Ney vs a brute-force
reference, segment-respecting contexts, no counting across shards, sampling."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from mega_trading.eval.baselines import (
    NONE,
    CopyPreviousBaseline,
    MarkovModel,
    UnigramBaseline,
    context_matrix,
    fit_baselines,
    tail_contexts,
)
from mega_trading.eval.scoring import FieldSpec, score_baseline, summarize

SPEC = FieldSpec(vocab_size=26, n_event_tokens=24, field_names=("side", "move", "size", "dt"),
                 field_sizes=(2, 3, 2, 2), seg_id=25, pad_id=24)
V, SEG, PAD, NE = SPEC.vocab_size, SPEC.seg_id, SPEC.pad_id, SPEC.n_event_tokens


def fit(shards, **kw):
    return fit_baselines(shards, V, SEG, PAD, NE, **kw)


def nll(baseline, tokens) -> float:
    return summarize(score_baseline(baseline, tokens, SPEC))["nll_nats"]


def cycle(n: int, period: int = 7) -> np.ndarray:
    tokens = np.arange(n, dtype=np.int64) % period + 3
    tokens[0] = SEG
    return tokens


def iid(n: int, seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, NE, size=n)
    tokens[0] = SEG
    return tokens


def random_markov(n: int, seed: int, n_segments: int = 20) -> np.ndarray:
    """A peaked first-order chain over event tokens, with segment starts sprinkled in."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(NE, 0.3), size=NE)
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = rng.integers(NE)
    for i in range(1, n):
        tokens[i] = rng.choice(NE, p=trans[tokens[i - 1]])
    tokens[rng.choice(np.arange(1, n), size=n_segments, replace=False)] = SEG
    tokens[0] = SEG
    return tokens


def test_deterministic_cycle_markov_is_near_certain_unigram_is_log_period():
    models = fit([cycle(20_000)])
    test = cycle(3_000)
    assert nll(models["markov1"], test) < 0.01
    assert nll(models["markov3"], test) < 0.01
    assert nll(models["unigram"], test) == pytest.approx(math.log(7), abs=0.01)
    assert nll(models["uniform"], test) == pytest.approx(math.log(V), abs=1e-5)
    # Copying never works on a cycle: eps ~ 1, yet the cross-entropy stays finite.
    copy_nll = nll(models["copy_previous"], test)
    assert math.isfinite(copy_nll) and copy_nll == pytest.approx(math.log(V - 1), abs=0.01)


def test_iid_uniform_events_every_baseline_near_log_of_event_count():
    models = fit([iid(100_000, seed=1)])
    test = iid(20_000, seed=2)
    floor = math.log(NE)
    for name, model in models.items():
        value = nll(model, test)
        # ~7 training samples per 3-token context: the 4-gram model pays some variance.
        slack = 0.3 if name == "markov3" else 0.12
        assert floor - 0.02 < value < math.log(V) + slack, (name, value)
    # Learning nothing beyond frequencies: unigram and markov1 sit right at the entropy.
    assert nll(models["unigram"], test) == pytest.approx(floor, abs=0.01)
    assert nll(models["markov1"], test) == pytest.approx(floor, abs=0.02)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_kneser_ney_rows_are_proper_distributions(order):
    model = MarkovModel.fit([random_markov(5_000, seed=order)], V, SEG, PAD, order)
    rng = np.random.default_rng(0)
    contexts = rng.integers(-1, V, size=(500, order))  # seen, unseen, NONE and specials
    seen = context_matrix(random_markov(300, seed=9), np.arange(1, 300), order, SEG)
    p = model.probs(np.concatenate([contexts, seen]))
    assert p.shape == (799, V)
    assert (p > 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-10)


def _kneser_ney_reference(shards, order, vocab, seg):
    """Interpolated Kneser-Ney from its textbook definition, with dicts and recursion."""
    n = order + 1
    grams = defaultdict(int)
    for shard in shards:
        for t in range(1, len(shard)):
            if shard[t] == PAD:
                continue
            ctx = [int(c) for c in context_matrix(shard, np.array([t]), order, seg)[0]]
            grams[tuple(ctx) + (int(shard[t]),)] += 1
    counts = {n: dict(grams)}
    for j in range(n - 1, 0, -1):
        cont = defaultdict(int)
        for gram in counts[j + 1]:
            cont[gram[1:]] += 1
        counts[j] = dict(cont)

    def discount(c):
        n1 = sum(v == 1 for v in c.values())
        n2 = sum(v == 2 for v in c.values())
        return min(max(n1 / (n1 + 2 * n2) if n1 + n2 else 0.5, 0.05), 0.95)

    def prob(w, h):
        j = len(h) + 1
        c, d = counts[j], discount(counts[j])
        total = sum(v for g, v in c.items() if g[:-1] == h)
        types = sum(1 for g in c if g[:-1] == h)
        lower = prob(w, h[1:]) if h else 1.0 / vocab
        if total == 0:
            return lower
        return max(c.get(h + (w,), 0) - d, 0) / total + d * types / total * lower

    return prob


@pytest.mark.parametrize("order", [1, 2])
def test_kneser_ney_matches_brute_force_reference(order):
    shards = [random_markov(400, seed=3, n_segments=5), random_markov(150, seed=4, n_segments=2)]
    model = MarkovModel.fit(shards, V, SEG, PAD, order)
    reference = _kneser_ney_reference(shards, order, V, SEG)
    contexts = np.concatenate([
        context_matrix(shards[0], np.arange(1, 40), order, SEG),
        np.random.default_rng(1).integers(-1, V, size=(10, order)),
    ])
    p = model.probs(contexts)
    for row, ctx in enumerate(contexts):
        expected = [reference(w, tuple(int(c) for c in ctx)) for w in range(V)]
        np.testing.assert_allclose(p[row], expected, rtol=1e-9, atol=1e-12)


def test_contexts_stop_at_segment_start():
    tokens = np.array([SEG, 1, 2, 3, SEG, 4, 5, 6, 7])
    ctx = context_matrix(tokens, np.arange(len(tokens) + 1), 3, SEG)
    assert ctx[0].tolist() == [NONE, NONE, NONE]
    assert ctx[1].tolist() == [NONE, NONE, SEG]
    assert ctx[4].tolist() == [1, 2, 3]  # predicting the next SEG sees its own segment
    assert ctx[5].tolist() == [NONE, NONE, SEG]
    assert ctx[6].tolist() == [NONE, SEG, 4]
    assert ctx[9].tolist() == [5, 6, 7]
    # A shard that does not start with SEG: its start is a segment start too.
    assert context_matrix(np.array([9, 8]), np.array([1]), 2, SEG)[0].tolist() == [NONE, 9]
    # The batched generator's tail rule agrees with the full rule everywhere.
    for t in range(1, len(tokens) + 1):
        assert tail_contexts(tokens[None, :t], 3, SEG)[0].tolist() == ctx[t].tolist()


def test_prediction_after_a_segment_start_ignores_the_previous_segment():
    model = fit([random_markov(5_000, seed=5)])["markov3"]
    a = np.array([SEG, 1, 2, 3, SEG, 4])
    b = np.array([SEG, 7, 8, 9, SEG, 4])
    pa = model.probs(model.contexts_for(a, np.array([5, 6])))
    pb = model.probs(model.contexts_for(b, np.array([5, 6])))
    np.testing.assert_array_equal(pa, pb)


def test_no_ngram_is_counted_across_shards():
    a = np.array([SEG, 1, 2, 3, 5])
    b = np.array([9, 1, 2])  # no SEG at its start: the shard start still cuts contexts
    model = MarkovModel.fit([a, b], V, SEG, PAD, 1)
    bigrams = set(model.levels[1].gram_keys.tolist())
    assert 5 * model.base + 9 not in bigrams
    assert 3 * model.base + 5 in bigrams


def test_copy_previous_eps_is_the_training_miss_rate():
    # 10 copying pairs: events 1,1,1,1,1,2,2,2,2,2,3 -> 8 copies, 2 misses; SEG pairs ignored.
    tokens = np.array([SEG, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, SEG, 4])
    model = CopyPreviousBaseline.fit([tokens], V, SEG, PAD, NE)
    assert model.eps == pytest.approx((2 + 0.5) / (10 + 1))
    p = model.probs(np.array([[2], [SEG], [NONE]]))
    assert p[0, 2] == pytest.approx(1 - model.eps)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[1:], 1.0 / V)  # nothing to copy after a segment start


def test_unigram_is_add_k_smoothed_frequency():
    tokens = np.array([SEG, 1, 1, 2, PAD])
    model = UnigramBaseline.fit([tokens], V, SEG, PAD, add_k=0.5)
    total = 3 + 0.5 * V  # targets 1, 1, 2 (position 0 and PAD are not targets)
    assert model.p[1] == pytest.approx(2.5 / total)
    assert model.p[PAD] == pytest.approx(0.5 / total)
    assert model.p.sum() == pytest.approx(1.0)


def test_fitting_ignores_everything_but_its_input():
    train = [random_markov(2_000, seed=6), cycle(500)]
    first = fit(train)
    second = fit([s.copy() for s in train])
    for name in first:
        a, b = first[name].state(), second[name].state()
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_markov_generation_follows_the_chain_and_never_samples_pad():
    model = fit([cycle(5_000)])["markov1"]
    out = model.generate(np.array([SEG, 3]), 50, np.random.default_rng(0))
    assert len(out) == 52
    np.testing.assert_array_equal(out[1:], (np.arange(51) % 7) + 3)
    noisy = fit([random_markov(3_000, seed=7)])["markov3"]
    batch = noisy.generate_batch(np.full((16, 1), SEG), 200, np.random.default_rng(1),
                                 allow_specials=False)
    assert batch.shape == (16, 201)
    assert (batch[:, 1:] < NE).all()
    again = noisy.generate_batch(np.full((16, 1), SEG), 200, np.random.default_rng(1),
                                 allow_specials=False)
    np.testing.assert_array_equal(batch, again)
    assert 0 <= noisy.sample(np.array([SEG, 1, 2]), np.random.default_rng(2)) < V


def test_fitting_in_chunks_gives_the_same_baselines(monkeypatch):
    """Baselines are fitted chunk by chunk (bounded memory on memory-mapped shards): with
    chunks of 7 tokens, so contexts and segment starts straddle chunks, every fitted
    parameter equals the one-chunk fit."""
    import mega_trading.eval.baselines as baselines_module

    rng = np.random.default_rng(0)
    vocab, seg, pad = 12, 10, 11
    shards = []
    for n in (300, 41):
        tokens = rng.integers(0, 10, n)
        tokens[rng.random(n) < 0.05] = seg
        tokens[0] = seg
        shards.append(tokens)
    whole = fit_baselines(shards, vocab, seg, pad, 10)
    monkeypatch.setattr(baselines_module, "FIT_CHUNK_TOKENS", 7)
    chunked = fit_baselines(shards, vocab, seg, pad, 10)
    for name, model in whole.items():
        a, b = model.state(), chunked[name].state()
        assert repr(a) == repr(b), name
