"""Sampling, cached decoding, sliding windows, prompts and decoded rollouts."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from mega_trading.core.errors import ConfigError, DataError
from mega_trading.data.field_bins import FieldBins
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import ShardSet
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.generation.generate import (
    GenerateConfig,
    SamplingConfig,
    decode_one,
    generate,
    generate_nocache,
    generate_rollouts,
    prefill,
    prompt_from_split,
    rollout_lineage,
    rollouts_to_events,
    seg_prompts,
)
from mega_trading.generation.rollouts import read_rollouts, write_rollouts
from mega_trading.generation.sampling import sample_next, top_p_keep
from mega_trading.model import kernels
from mega_trading.model.decode import decode_weights
from mega_trading.model.transformer import ModelConfig, Transformer
from tests.numerics import (
    assert_float32_close,
    assert_float32_paths_close,
    float64_twin,
    model_reduction_len,
)

BLOCK = 32


def hand_tokenizer() -> Tokenizer:
    """2 sides x 3 moves (-10, 0, +10 bps) x 2 sizes (-1, +1) x 3 dts (0, 100, 1000 us)."""
    return Tokenizer(
        side=FieldBins("side", pos_edges=(0.0,), representatives=(-1.0, 1.0)),
        move=FieldBins("move", pos_edges=(), neg_edges=(), zero_bin=True, has_negative=True,
                       representatives=(-10.0, 0.0, 10.0)),
        size=FieldBins("size", pos_edges=(0.0,), representatives=(-1.0, 1.0)),
        dt=FieldBins("dt", pos_edges=(5.0,), zero_bin=True,
                     representatives=(0.0, math.log(100.0), math.log(1000.0))),
    )


def event_token(side: int, move: int, size: int, dt: int) -> int:
    """Bin indices -> token id (mixed radix 2, 3, 2, 3)."""
    return ((side * 3 + move) * 2 + size) * 3 + dt


TOK = hand_tokenizer()
VOCAB = TOK.vocab_size  # 36 events + PAD + SEG


def tiny_model(vocab_size: int = VOCAB, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # init_std well above the default so logits are peaked: no float near-ties between paths
    cfg = ModelConfig.from_preset("micro", **{
        "vocab_size": vocab_size, "n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2,
        "ffn_hidden": 64, "block_size": BLOCK, "init_std": 0.3, **overrides})
    return Transformer(cfg).eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_prompt(batch: int, length: int, seed: int = 1, vocab: int = VOCAB - 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=seeded(seed))


# --- decoding steps ------------------------------------------------------------------------

def test_cached_logits_equal_full_forward_at_every_step():
    model = tiny_model()
    tokens = random_prompt(3, BLOCK, seed=5)
    cache = model.new_cache(3)
    with torch.inference_mode():
        exact = float64_twin(model)(tokens)  # [B, T, V]: the reference for both float32 paths
        full = model(tokens)
        steps = [prefill(model, cache, tokens[:, :5])]
        for pos in range(5, BLOCK - 1):
            steps.append(decode_one(model, cache, tokens[:, pos:pos + 1], pos))
    cached = torch.stack(steps, dim=1)  # logits for positions 4 .. T-2
    assert exact.std() > 0.5  # peaked logits: the comparison below is not trivially true
    # Not cached vs full (1.03e-5 apart on an AVX-512 Xeon, 0.79e-5 on an AMD EPYC): each
    # against float64, within the float32 bound (~1e-4 here).
    reduction_len = model_reduction_len(model.cfg, BLOCK)
    assert_float32_close(full, exact, reduction_len)
    assert_float32_close(cached, exact[:, 4:BLOCK - 1], reduction_len)


@pytest.mark.parametrize("cache_len, keep", [(None, None), (20, 7), (BLOCK, BLOCK)])
@pytest.mark.parametrize("heads", [(4, 2), (2, 1)], ids=["head-dim-8", "head-dim-16"])
def test_cached_and_nocache_agree_while_sliding_past_block_size(cache_len, keep, heads):
    """Head dim 16 decodes through the C step (decode_step.c) where it builds: each slide
    re-prefills through the plain forward, so its transposed key copy must follow."""
    model = tiny_model(n_head=heads[0], n_kv_head=heads[1])
    native = decode_weights(model).native is not None
    assert native == (heads[1] == 1 and kernels.decode_kernel_error() is None)
    prompt = random_prompt(4, 8)
    n_new = 3 * BLOCK
    seen = {"cached": {}, "nocache": {}}
    cfg = SamplingConfig(top_k=8, top_p=0.95, temperature=0.9)
    with_cache = generate(model, prompt, n_new, cfg, seeded(3), cache_len, keep=keep,
                          on_logits=lambda t, x: seen["cached"].__setitem__(t, x.clone()))
    without = generate_nocache(model, prompt, n_new, cfg, seeded(3), cache_len, keep=keep,
                               on_logits=lambda t, x: seen["nocache"].__setitem__(t, x.clone()))
    assert with_cache.shape == (4, 8 + n_new)
    assert torch.equal(with_cache[:, :8], prompt)
    assert sorted(seen["cached"]) == sorted(seen["nocache"]) == list(range(8, 8 + n_new))
    for t in range(8, 8 + n_new):
        # The decode step's matmuls and the full forward's SDPA sum in different orders: two
        # float32 paths of one sampling loop, each within the float32 bound of the exact
        # logits (tests/numerics.py), far below any change in the sampled tokens.
        assert_float32_paths_close(seen["cached"][t], seen["nocache"][t],
                                   model_reduction_len(model.cfg, BLOCK))
    assert torch.equal(with_cache, without)


def test_context_window_slides_to_keep_tokens():
    """The logits after a slide are those of the last `keep` tokens alone."""
    model = tiny_model()
    prompt = random_prompt(2, 4)
    logits = {}
    out = generate(model, prompt, BLOCK + 4, SamplingConfig(temperature=0), cache_len=16, keep=6,
                   on_logits=lambda t, x: logits.__setitem__(t, x.clone()))
    with torch.inference_mode():
        # the cache holds tokens 0..15; token 16 does not fit, so token 17 is drawn from 11..16
        expected = float64_twin(model)(out[:, 11:17])[:, -1]
        not_expected = model(out[:, 1:17])[:, -1]
    assert_float32_close(logits[17], expected, model_reduction_len(model.cfg, 6))
    assert (logits[17] - not_expected).abs().max() > 1e-3


def test_long_prompt_uses_its_last_block():
    model = tiny_model()
    prompt = random_prompt(2, BLOCK + 9)
    out = generate(model, prompt, 5, SamplingConfig(temperature=0))
    tail = generate(model, prompt[:, -BLOCK:], 5, SamplingConfig(temperature=0))
    assert torch.equal(out[:, -5:], tail[:, -5:])


def test_same_seed_same_rollout_different_seed_different():
    model = tiny_model()
    prompt = random_prompt(4, 6)
    cfg = SamplingConfig(temperature=1.0, top_k=16)
    first = generate(model, prompt, 40, cfg, seeded(11))
    again = generate(model, prompt, 40, cfg, seeded(11))
    other = generate(model, prompt, 40, cfg, seeded(12))
    assert torch.equal(first, again)
    assert not torch.equal(first[:, 6:], other[:, 6:])


def test_top_k_one_equals_greedy_argmax():
    model = tiny_model()
    prompt = random_prompt(3, 6)
    greedy = generate(model, prompt, 30, SamplingConfig(temperature=0))
    top1 = generate(model, prompt, 30, SamplingConfig(temperature=1.3, top_k=1), seeded(4))
    assert torch.equal(greedy, top1)
    logits = torch.randn(64, VOCAB, generator=seeded(2))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=seeded(0)), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert top_p_keep(probs, 0.35).tolist() == [[True, False, False, False]]
    assert top_p_keep(probs, 0.65).tolist() == [[True, True, False, False]]
    assert top_p_keep(probs, 0.75).tolist() == [[True, True, True, False]]
    assert top_p_keep(probs, 1.0).tolist() == [[True, True, True, True]]

    # through sample(): unsorted tokens, the nucleus {1, 3} renormalized to 4/7, 3/7
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log().expand(4000, 4)
    drawn = sample_next(logits, 1.0, top_k=0, top_p=0.65, generator=seeded(0))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1].item() / 4000 - 4 / 7) < 0.03
    # top-k then top-p: top-2 is {1, 3}; p=0.5 of the renormalized 4/7, 3/7 keeps only 1
    assert set(sample_next(logits, 1.0, top_k=2, top_p=0.5, generator=seeded(1)).tolist()) == {1}


def test_min_p_keeps_tokens_within_a_fraction_of_the_top_one():
    # p = 0.5, 0.25, 0.15, 0.1: min_p 0.4 keeps p >= 0.2, i.e. tokens 0 and 1 (2/3, 1/3)
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log().expand(6000, 4)
    drawn = sample_next(logits, 1.0, min_p=0.4, generator=seeded(3))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0].item() / 6000 - 2 / 3) < 0.03
    # min-p 0 is plain sampling: every token appears
    assert (torch.bincount(sample_next(logits, 1.0, min_p=0.0, generator=seeded(3)),
                           minlength=4) > 0).all()
    with pytest.raises(ConfigError, match="min_p"):
        SamplingConfig(min_p=1.0)


def test_resolve_sampling_prefers_explicit_then_measured_then_default(tmp_path):
    from mega_trading.core.lineage import write_json_atomic
    from mega_trading.generation.sampling import SAMPLING_FORMAT, resolve_sampling

    base = SamplingConfig(forbid_seg=True)
    settings, info = resolve_sampling(None, tmp_path, base)
    assert settings == base and info["source"] == "default"
    write_json_atomic(tmp_path / "sampling.json", {
        "format": SAMPLING_FORMAT, "split": "validation", "score": 1.1,
        "chosen": {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.05}})
    settings, info = resolve_sampling(None, tmp_path, base)
    assert (settings.temperature, settings.min_p, settings.forbid_seg) == (0.9, 0.05, True)
    assert info["source"] == "measured" and info["split"] == "validation"
    assert info["label"] == "T=0.9, min-p 0.05"
    explicit = SamplingConfig(top_k=16)
    assert resolve_sampling(explicit, tmp_path, base) == (explicit, {
        "source": "explicit", "label": "T=1, top-k 16",
        "settings": {**info["settings"], "temperature": 1.0, "top_k": 16, "min_p": 0.0,
                     "forbid_seg": False}})


def test_sampling_follows_the_softmax_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    for temperature in (1.0, 0.5):
        drawn = sample_next(logits, temperature, top_k=0, generator=seeded(7))
        freq = torch.bincount(drawn, minlength=4).double() / len(drawn)
        expected = torch.softmax(logits[0].double() / temperature, -1)
        assert (freq - expected).abs().max() < 0.015


def test_pad_never_sampled_and_seg_can_be_forbidden():
    model = tiny_model()
    prompt = random_prompt(16, 4)
    pad, seg = TOK.pad_id, TOK.seg_id
    hot = {"temperature": 3.0, "top_k": 0}  # flat distribution: every token is likely
    allowed = generate(model, prompt, 60, SamplingConfig(**hot, forbid_pad=False), seeded(0))
    assert (allowed[:, 4:] == pad).any()  # so the default ban below is what keeps PAD out
    default = generate(model, prompt, 60, SamplingConfig(**hot), seeded(0))
    assert not (default[:, 4:] == pad).any() and (default[:, 4:] == seg).any()
    no_specials = generate_nocache(model, prompt, 60, SamplingConfig(**hot, forbid_seg=True),
                                   seeded(0))
    assert not ((no_specials[:, 4:] == pad) | (no_specials[:, 4:] == seg)).any()


def test_banning_leaves_the_callers_logits_alone():
    from mega_trading.generation.generate import _sample_step

    logits = torch.zeros(500, VOCAB)
    logits[:, TOK.pad_id] = 5.0  # PAD would win nearly every draw if it were not banned
    kept = logits.clone()
    drawn = _sample_step(logits, SamplingConfig(top_k=4), (TOK.pad_id,), seeded(0))
    assert not (drawn == TOK.pad_id).any()
    assert torch.equal(logits, kept)  # on_logits callers may still hold this tensor


def test_invalid_settings_are_config_errors():
    model = tiny_model()
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError):
        generate(model, random_prompt(1, 3), 4, keep=BLOCK + 1)
    with pytest.raises(ConfigError):
        generate(model, random_prompt(1, 3), 4, cache_len=BLOCK + 1)
    with pytest.raises(ConfigError):
        GenerateConfig(prompt_from="test")


# --- tokens -> events ------------------------------------------------------------------------

def test_rollouts_to_events_integrates_prices_and_times():
    seg = TOK.seg_id
    rollout0 = [event_token(1, 2, 1, 1),  # buy, +10 bps, size +1, 100 us
                seg,                      # marker only
                event_token(0, 0, 0, 2),  # sell, -10 bps, size -1, 1000 us
                event_token(1, 1, 1, 0)]  # buy, 0 bps, size +1, 0 us
    rollout1 = [event_token(0, 0, 0, 1)] * 4  # four sells of -10 bps, 100 us apart
    frame = rollouts_to_events(np.array([rollout0, rollout1]), TOK, start_price=[100.0, 50.0],
                               start_time_us=[1_000_000, 2_000_000], symbol=["BTCUSDT", "ETHUSDT"],
                               size_level=[200.0, 10.0])
    assert frame.columns == ["rollout", "step", "symbol", "token", "is_event", "segment_start",
                             "side", "move_bps", "log_size", "dt_us", "time_us", "price",
                             "quote_qty"]
    first = frame.filter(pl.col("rollout") == 0)
    assert first["step"].to_list() == [0, 1, 2, 3]
    assert first["symbol"].to_list() == ["BTCUSDT"] * 4
    assert first["is_event"].to_list() == [True, False, True, True]
    assert first["segment_start"].to_list() == [False, True, False, False]
    assert first["side"].to_list() == [1, None, -1, 1]
    assert first["dt_us"].to_list() == [100, None, 1000, 0]
    assert first["time_us"].to_list() == [1_000_100, 1_000_100, 1_001_100, 1_001_100]
    expected = [100.0 * 1.001, 100.0 * 1.001, 100.0 * 1.001 * 0.999, 100.0 * 1.001 * 0.999]
    np.testing.assert_allclose(first["price"].to_numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(first["quote_qty"].to_numpy()[[0, 2, 3]],
                               [200 * math.e, 200 / math.e, 200 * math.e], rtol=1e-12)
    assert first["quote_qty"][1] is None

    second = frame.filter(pl.col("rollout") == 1)
    np.testing.assert_allclose(second["price"].to_numpy(), 50.0 * 0.999 ** np.arange(1, 5),
                               rtol=1e-12)
    assert second["time_us"].to_list() == [2_000_100, 2_000_200, 2_000_300, 2_000_400]
    assert second["symbol"].unique().to_list() == ["ETHUSDT"]


def test_rollouts_to_events_refuses_tokens_outside_the_vocabulary():
    with pytest.raises(DataError):
        rollouts_to_events(np.array([[0, VOCAB]]), TOK, 100.0, 0, "BTCUSDT")


# --- prompts and whole runs on the real sample -----------------------------------------------

@pytest.fixture(scope="module")
def shards(tiny_data_dir) -> ShardSet:
    return ShardSet.open(tiny_data_dir)


def test_prompt_windows_come_from_the_named_split_only(shards):
    prompts, info = prompt_from_split(shards, "validation", length=24, n=40,
                                      rng=np.random.default_rng(0))
    assert prompts.shape == (40, 24) and info.height == 40
    assert set(info["symbol"]) <= set(shards.symbols("validation"))
    assert info["split"].unique().to_list() == ["validation"]
    for row, prompt in zip(info.iter_rows(named=True), prompts):
        tokens = shards.tokens("validation", row["symbol"])
        start = row["start_pos"]
        assert start + 24 <= len(tokens)
        assert prompt.tolist() == tokens[start:start + 24].astype(np.int64).tolist()
        bounds = shards.manifest["boundaries"][row["symbol"]]
        assert bounds["validation_start_us"] <= row["last_time_us"] <= bounds["validation_end_us"]
        events = shards.events("validation", row["symbol"])
        last = events.filter(pl.col("token_pos") < start + 24).tail(1)
        assert row["last_price"] == last["price"][0]
        assert row["last_trade_id"] == last["trade_id"][0]
        assert row["size_level"] > 0
    _, eth_info = prompt_from_split(shards, "backtest", "ETHUSDT", 16, 5, np.random.default_rng(1))
    assert eth_info["symbol"].unique().to_list() == ["ETHUSDT"]
    with pytest.raises(DataError):
        prompt_from_split(shards, "backtest", "BTCUSDT", 10**7, 1)


def test_seg_prompts_anchor_to_real_segment_starts(shards):
    prompts, info = seg_prompts(shards, "backtest", n=6, rng=np.random.default_rng(0))
    assert prompts.tolist() == [[shards.tokenizer.seg_id]] * 6
    for row in info.iter_rows(named=True):
        tokens = shards.tokens("backtest", row["symbol"])
        assert tokens[row["start_pos"]] == shards.tokenizer.seg_id
        events = shards.events("backtest", row["symbol"])
        anchor = events.filter(pl.col("token_pos") == row["start_pos"] + 1)
        assert anchor["price"][0] == row["last_price"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_generate_rollouts_writes_events_with_lineage(shards, tmp_path, suffix):
    model = tiny_model(shards.vocab_size, n_layer=1)
    cfg = GenerateConfig(n=5, length=40, prompt_from="backtest", prompt_length=12, seed=3,
                         batch_size=2, sampling=SamplingConfig(top_k=16, top_p=0.9))
    events, prompts = generate_rollouts(model, shards, cfg)
    again, _ = generate_rollouts(model, shards, cfg)
    assert events.equals(again)
    assert events.height == 5 * 40 and events["rollout"].n_unique() == 5
    assert not (events["token"] == shards.tokenizer.pad_id).any()
    first = events.filter(pl.col("rollout") == 0)
    prompt0 = prompts.row(0, named=True)
    assert first["symbol"][0] == prompt0["symbol"]
    assert first["time_us"].min() >= prompt0["last_time_us"]
    growth = np.cumprod(1 + first["move_bps"].fill_null(0).to_numpy() / 1e4)
    np.testing.assert_allclose(first["price"].to_numpy(), prompt0["last_price"] * growth)

    path = write_rollouts(events, tmp_path / f"rollouts{suffix}",
                          rollout_lineage(cfg, shards, prompts, run="unit-test"))
    back, lineage = read_rollouts(path)
    assert back.height == events.height
    assert back["price"].to_list() == pytest.approx(events["price"].to_list())
    assert lineage["tokenizer_hash"] == shards.tokenizer_hash
    assert lineage["manifest_hash"] == shards.manifest_hash
    assert lineage["config"]["sampling"] == {"temperature": 1.0, "top_k": 16, "top_p": 0.9,
                                             "min_p": 0.0, "tick_support": False, "forbid_pad": True, "forbid_seg": False}
    assert lineage["seed"] == 3 and lineage["run"] == "unit-test"
    assert len(lineage["prompts"]) == 5
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_generate_rollouts_refuses_a_model_of_another_vocabulary(shards):
    with pytest.raises(DataError):
        generate_rollouts(tiny_model(VOCAB), shards, GenerateConfig(n=1, length=2))


# --- CLI end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shards):
    from mega_trading.core.config import to_dict
    from mega_trading.model.checkpoint import save_checkpoint

    model = tiny_model(shards.vocab_size, n_layer=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = tmp_path_factory.mktemp("gen_run") / "run"
    save_checkpoint(run, 7, model, optimizer, sampler_state={},
                    config={"model": to_dict(model.cfg)},
                    tokenizer_hash=shards.tokenizer_hash, manifest_hash=shards.manifest_hash)
    return run


def test_cli_generate_writes_rollouts(shards, run_dir, tmp_path, capsys):
    from mega_trading.cli import main

    out = tmp_path / "rollouts.parquet"
    argv = ["generate", "--run", str(run_dir), "--data", str(shards.root), "--n", "3",
            "--length", "20", "--prompt-length", "10", "--top-k", "8", "--top-p", "0.9",
            "--seed", "5", "--out", str(out)]
    assert main(argv) == 0
    assert "3 rollouts x 20 tokens" in capsys.readouterr().out
    events, lineage = read_rollouts(out)
    assert events.height == 60
    assert lineage["step"] == 7 and lineage["seed"] == 5
    assert lineage["config"]["sampling"]["top_k"] == 8
    assert lineage["config"]["prompt_from"] == "backtest"
    assert lineage["run"].endswith("run") and lineage["tokenizer_hash"] == shards.tokenizer_hash

    assert main(["generate", "--run", str(run_dir), "--data", str(shards.root), "--n", "2",
                 "--length", "5", "--prompt-from", "seg"]) == 0
    seg_events, seg_lineage = read_rollouts(run_dir / "rollouts.parquet")
    assert seg_events.height == 10 and seg_lineage["config"]["prompt_from"] == "seg"


def test_cli_generate_refuses_other_data(run_dir, tmp_path, sample_trade_zips, capsys):
    from mega_trading.cli import main

    other = tmp_path / "other"
    prepare(sample_trade_zips[:2], other, PrepareConfig(block_size=32, stride=16, workers=1))
    code = main(["generate", "--run", str(run_dir), "--data", str(other), "--n", "1",
                 "--length", "2", "--out", str(tmp_path / "r.parquet")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "trained with tokenizer" in err
    assert not (tmp_path / "r.parquet").exists()


def test_rollouts_per_prompt_make_a_fan(tmp_path):
    """Several rollouts continue the same real prompt, so the report can draw a fan."""
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.prepare import PrepareConfig, prepare
    from mega_trading.data.shards import ShardSet
    from mega_trading.generation.generate import GenerateConfig, make_prompts

    prepare(sample_files("trades"), tmp_path / "d", PrepareConfig(block_size=64, stride=32, workers=1))
    shards = ShardSet.open(tmp_path / "d")
    cfg = GenerateConfig(n=6, length=4, prompt_length=16, rollouts_per_prompt=3)
    prompts, info = make_prompts(shards, cfg, np.random.default_rng(0))
    assert prompts.shape == (6, 16)
    assert (prompts[0] == prompts[2]).all() and (prompts[3] == prompts[5]).all()
    assert info["prompt_id"].to_list() == [0, 0, 0, 1, 1, 1]
    if "rollout" in info.columns:
        assert info["rollout"].to_list() == list(range(6))
    assert info["last_price"][0] == info["last_price"][2]
