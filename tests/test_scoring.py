"""Scoring: top-k and field marginals vs brute force, calibration, bootstrap, one path for
model and baselines, every position scored once, and no peeking at the future."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mega_trading.eval.baselines import fit_baselines
from mega_trading.eval.scoring import (
    FieldSpec,
    PositionScores,
    block_bootstrap_ci,
    label_stats,
    paired_difference,
    perplexity,
    reduce_log_probs,
    reliability,
    score_baseline,
    score_model,
    summarize,
)

FAKE_TOKENIZER = SimpleNamespace(
    field_names=("side", "move", "size", "dt"),
    field_sizes={"side": 2, "move": 3, "size": 2, "dt": 2},
    n_event_tokens=24, vocab_size=26, pad_id=24, seg_id=25,
)
SPEC = FieldSpec.from_tokenizer(FAKE_TOKENIZER)
V, NE, SEG = SPEC.vocab_size, SPEC.n_event_tokens, SPEC.seg_id


def shard(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, NE, size=n)
    tokens[rng.choice(np.arange(1, n), size=max(1, n // 40), replace=False)] = SEG
    tokens[0] = SEG
    return tokens


def test_field_spec_from_tokenizer_and_mixed_radix():
    assert SPEC.field_sizes == (2, 3, 2, 2)
    token = ((1 * 3 + 2) * 2 + 0) * 2 + 1
    digits = SPEC.field_indices(np.array([token]))
    assert {k: int(v[0]) for k, v in digits.items()} == {"side": 1, "move": 2, "size": 0, "dt": 1}
    tokens = np.array([SEG, 3, SEG, 24, 5, 25, 7])
    assert SPEC.scored_positions(tokens).tolist() == [1, 4, 6]


def test_top_k_probability_and_logp_match_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, V)) * 3
    targets = rng.integers(0, NE, size=300)
    s = reduce_log_probs(torch.from_numpy(logits), targets, np.arange(300), SPEC)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-logp, axis=1)
    np.testing.assert_allclose(s.logp, logp[np.arange(300), targets], atol=1e-5)
    np.testing.assert_allclose(s.top1_prob, np.exp(logp.max(1)), atol=1e-6)
    np.testing.assert_array_equal(s.top1_hit, order[:, 0] == targets)
    np.testing.assert_array_equal(s.top5_hit, (order[:, :5] == targets[:, None]).any(1))


def test_ties_are_shared_so_uniform_gets_k_over_v():
    s = reduce_log_probs(np.zeros((10, V)), np.arange(10), np.arange(10), SPEC)
    np.testing.assert_allclose(s.top1_hit, 1 / V, rtol=1e-6)
    np.testing.assert_allclose(s.top5_hit, 5 / V, rtol=1e-6)
    two_way = np.zeros((1, V))
    two_way[0, [3, 4]] = 5.0  # target 3 tied with 4 at the top
    s = reduce_log_probs(two_way, np.array([3]), np.array([1]), SPEC)
    assert s.top1_hit[0] == pytest.approx(0.5) and s.top5_hit[0] == 1.0


def test_special_targets_are_refused():
    with pytest.raises(ValueError, match="event tokens"):
        reduce_log_probs(np.zeros((1, V)), np.array([SEG]), np.array([1]), SPEC)


def test_field_marginals_sum_to_one_and_match_brute_force():
    rng = np.random.default_rng(1)
    row = rng.normal(size=V) * 2
    targets = np.arange(NE)  # every event token, all scored under the same distribution
    s = reduce_log_probs(np.tile(row, (NE, 1)), targets, np.arange(NE), SPEC)
    p = np.exp(row[:NE] - np.log(np.exp(row[:NE]).sum())).reshape(SPEC.field_sizes)
    digits = SPEC.field_indices(targets)
    for axis, name in enumerate(SPEC.field_names):
        others = tuple(a for a in range(4) if a != axis)
        brute = p.sum(axis=others)
        np.testing.assert_allclose(np.exp(s.field_logp[name]), brute[digits[name]], rtol=1e-5)
        per_value = {int(d): math.exp(lp) for d, lp in zip(digits[name], s.field_logp[name])}
        assert sum(per_value.values()) == pytest.approx(1.0, abs=1e-5)


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(2)
    conf = rng.uniform(0, 1, size=200_000)
    calibrated = rng.uniform(size=conf.size) < conf
    ece, bins = reliability(conf, calibrated, 15)
    assert ece < 0.01
    assert len(bins) == 15 and sum(b["count"] for b in bins) == conf.size
    assert bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    overconfident = rng.uniform(size=conf.size) < 0.6 * conf
    ece_over, bins_over = reliability(conf, overconfident, 15)
    assert ece_over > 0.15
    top = bins_over[-1]
    assert top["accuracy"] < top["confidence"]


def test_block_bootstrap_ci_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(3)

    def ar1(n):  # serially dependent losses, like order flow
        x = np.empty(n)
        x[0] = 0
        noise = rng.normal(size=n)
        for i in range(1, n):
            x[i] = 0.8 * x[i - 1] + noise[i]
        return 2.0 + x

    widths = []
    for n in (2_000, 50_000):
        values = ar1(n)
        blocks = np.arange(n) // 100
        lo, hi = block_bootstrap_ci(values, blocks, samples=500, seed=0)
        assert lo < values.mean() < hi
        widths.append(hi - lo)
        assert block_bootstrap_ci(values, blocks, samples=500, seed=0) == [lo, hi]  # seeded
    assert widths[1] < widths[0] / 3


def test_summary_figures_are_consistent():
    assert perplexity(1e6) < float("inf") and perplexity(float("inf")) < float("inf")
    assert perplexity(math.log(7)) == pytest.approx(7)
    assert label_stats(np.array([1, 2, 3, 4] * 10)) == {"effective_vocab": pytest.approx(4),
                                                        "n_distinct_labels": 4}
    s = reduce_log_probs(np.random.default_rng(4).normal(size=(500, V)),
                         np.random.default_rng(5).integers(0, NE, 500), np.arange(1, 501), SPEC)
    out = summarize(s)
    assert out["n_scored"] == 500
    assert out["bits_per_event"] == pytest.approx(out["nll_nats"] / math.log(2))
    assert out["perplexity"] == pytest.approx(math.exp(out["nll_nats"]))
    lo, hi = out["nll_nats_ci95"]
    assert lo < out["nll_nats"] < hi
    assert set(out["per_field"]) == set(SPEC.field_names)


# --- the model path ---------------------------------------------------------------------------

class CausalStandIn:
    """A causal 'model': position i's logits depend on tokens 0..i of its window only."""

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(idx, V).double()
        counts = onehot.cumsum(1)
        mix = torch.linspace(-1, 1, V, dtype=torch.float64)
        return (counts * 0.7 + onehot * 2.0 + counts.roll(1, dims=2) * mix).float()


class LeakyStandIn(CausalStandIn):
    """Peeks at the next input token: what the leakage guard must catch."""

    def __call__(self, idx):
        ahead = torch.nn.functional.one_hot(idx.roll(-1, dims=1), V).float()
        return super().__call__(idx) + 5 * ahead


def _future_token_changes_nothing_earlier(model, block_size: int) -> bool:
    tokens = shard(120, seed=6)
    base = score_model(model, tokens, SPEC, block_size=block_size, batch_size=3)
    for t in (10, 57, 100, 119):
        changed = tokens.copy()
        changed[t] = (tokens[t] + 1) % NE  # an event either way: same scored positions
        other = score_model(model, changed, SPEC, block_size=block_size, batch_size=3)
        assert np.array_equal(base.positions, other.positions)
        before, at_t = base.positions < t, base.positions == t
        if not np.array_equal(base.logp[before], other.logp[before]):
            return False
        # The distribution predicting position t itself must not see token t either.
        if not np.array_equal(base.top1_prob[at_t], other.top1_prob[at_t]):
            return False
    return True


def test_scoring_uses_only_past_context():
    assert _future_token_changes_nothing_earlier(CausalStandIn(), block_size=16)
    assert not _future_token_changes_nothing_earlier(LeakyStandIn(), block_size=16)


def test_tiny_transformer_scores_use_only_past_context():
    model_mod = pytest.importorskip("mega_trading.model.transformer")
    torch.manual_seed(0)
    cfg = model_mod.ModelConfig(vocab_size=V, block_size=16, n_layer=1, d_model=32, n_head=2,
                                n_kv_head=1, ffn_hidden=64)
    model = model_mod.Transformer(cfg)
    assert _future_token_changes_nothing_earlier(model, block_size=16)


@pytest.mark.parametrize("n", [5, 16, 17, 18, 100])
def test_every_event_target_scored_exactly_once(n):
    tokens = shard(n, seed=n)
    s = score_model(CausalStandIn(), tokens, SPEC, block_size=16, batch_size=4, stride=5)
    np.testing.assert_array_equal(s.positions, SPEC.scored_positions(tokens))
    np.testing.assert_array_equal(s.targets, tokens[s.positions])


class ContextLength:
    """Top-1 probability encodes how many tokens the position could see."""

    def __call__(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, V, dtype=torch.float64)
        logits[:, :, 0] = torch.log(torch.arange(1, T + 1, dtype=torch.float64))
        return logits.float()


def test_each_target_gets_at_least_block_minus_stride_of_context():
    tokens = shard(200, seed=7)
    block, stride = 32, 8
    s = score_model(ContextLength(), tokens, SPEC, block_size=block, stride=stride)
    seen = np.rint(s.top1_prob * (V - 1) / (1 - s.top1_prob))
    assert (seen >= np.minimum(s.positions, block - stride)).all()
    assert (seen <= block).all()


def test_model_and_baseline_share_one_scoring_path():
    """A baseline wrapped as a 'model' scores exactly as the baseline path scores it."""
    train = [shard(3_000, seed=8)]
    markov1 = fit_baselines(train, V, SEG, FAKE_TOKENIZER.pad_id, NE)["markov1"]

    def as_model(idx):
        ctx = idx.reshape(-1, 1).numpy()
        return torch.from_numpy(markov1.log_probs(ctx)).reshape(*idx.shape, V)

    tokens = shard(400, seed=9)
    via_model = score_model(as_model, tokens, SPEC, block_size=16, batch_size=5)
    via_baseline = score_baseline(markov1, tokens, SPEC, chunk_size=64)
    np.testing.assert_array_equal(via_model.positions, via_baseline.positions)
    for name in ("logp", "top1_prob", "top1_hit", "top5_hit"):
        np.testing.assert_allclose(getattr(via_model, name), getattr(via_baseline, name), atol=1e-6)
    for name in SPEC.field_names:
        np.testing.assert_allclose(via_model.field_logp[name], via_baseline.field_logp[name],
                                   atol=1e-6)
    same = paired_difference(via_model, via_baseline)
    assert abs(same["delta_nll_nats"]) < 1e-6


def test_paired_difference_sign_and_alignment():
    tokens = shard(600, seed=10)
    models = fit_baselines([shard(5_000, seed=11)], V, SEG, FAKE_TOKENIZER.pad_id, NE)
    uniform = score_baseline(models["uniform"], tokens, SPEC)
    unigram = score_baseline(models["unigram"], tokens, SPEC)
    diff = paired_difference(unigram, uniform)
    # Uniform wastes mass on the two special tokens; unigram does not (much).
    assert diff["delta_nll_nats"] < 0 and diff["ci95"][1] < 0
    shifted = PositionScores.concat([uniform])
    shifted.positions = shifted.positions + 1
    with pytest.raises(ValueError):
        paired_difference(unigram, shifted)
