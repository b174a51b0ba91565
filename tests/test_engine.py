"""The one decoder engine: generate, the rollout service's batch loop and the simulator's
ModelSource decode through it, give the same tokens for the same prompts and seed, and
fetch the fused decode weights once per engine (not once per step)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mega_trading.generation import engine
from mega_trading.generation.generate import generate
from mega_trading.generation.sampling import SamplingConfig
from mega_trading.model import decode
from mega_trading.model.transformer import ModelConfig, Transformer
from mega_trading.serve.batching import Job, RolloutEngine
from mega_trading.simulate.sources import ModelSource, TokenTable

VOCAB, BLOCK, ROWS, PROMPT, NEW, SEED = 40, 16, 4, 6, 37, 5  # 6 + 37 > 16: the window slides
PAD, SEG = VOCAB - 2, VOCAB - 1
SAMPLING = SamplingConfig(temperature=1.2, top_k=20, top_p=0.95, forbid_seg=True)


def tiny_model(d_model: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("micro", vocab_size=VOCAB, n_layer=2, d_model=d_model,
                                  n_head=4, n_kv_head=2, ffn_hidden=64, block_size=BLOCK,
                                  init_std=0.3)
    return Transformer(cfg).eval()


def by_generate(model, prompt: torch.Tensor) -> np.ndarray:
    out = generate(model, prompt.repeat(ROWS, 1), NEW, SAMPLING,
                   torch.Generator().manual_seed(SEED), specials=(PAD, SEG))
    return out[:, PROMPT:].numpy()


def by_serve(model, prompt: torch.Tensor) -> np.ndarray:
    done = {}
    job = Job(prompt=prompt.numpy(), n=ROWS, length=NEW, sampling=SAMPLING, seed=SEED)
    RolloutEngine(model, PAD, SEG, batch_rows=ROWS).run_batch(
        [job], lambda j, tokens: done.setdefault("tokens", tokens))
    return done["tokens"]


def by_simulator(model, prompt: torch.Tensor) -> np.ndarray:
    tokenizer = SimpleNamespace(pad_id=PAD, seg_id=SEG)
    table = TokenTable(np.zeros(VOCAB), np.zeros(VOCAB), np.zeros(VOCAB, dtype=np.int64),
                       np.ones(VOCAB, dtype=bool))
    source = ModelSource(model, tokenizer, prompt.repeat(ROWS, 1).numpy(), [None] * ROWS,
                         SAMPLING, torch.Generator().manual_seed(SEED), table=table)
    for _ in range(NEW):  # open loop: every proposal is committed
        proposal = source.propose()
        source.commit(proposal.token, np.ones(ROWS, dtype=bool))
    return source.history()[0]


@pytest.mark.parametrize("d_model", [32, 64])  # 64: head_dim 16, the C step where it builds
def test_generate_serve_and_simulator_draw_the_same_tokens(d_model, monkeypatch):
    model = tiny_model(d_model)
    prompt = torch.randint(0, VOCAB - 2, (PROMPT,), generator=torch.Generator().manual_seed(3))
    fetches = []

    def counted(m):
        fetches.append(m)
        return real(m)

    real = decode.decode_weights
    monkeypatch.setattr(decode, "decode_weights", counted)  # a fetch inside decode_step
    monkeypatch.setattr(engine, "decode_weights", counted)  # the engine's own fetch
    outputs = {}
    for name, run in (("generate", by_generate), ("serve", by_serve),
                      ("simulate", by_simulator)):
        fetches.clear()
        outputs[name] = run(model, prompt)
        assert len(fetches) == 1, f"{name} fetched the fused weights {len(fetches)} times"
    assert outputs["generate"].shape == (ROWS, NEW)
    assert not np.isin(outputs["generate"], [PAD, SEG]).any()  # banned ids stay banned
    assert len(np.unique(outputs["generate"])) > 5  # really sampled, not one repeated token
    np.testing.assert_array_equal(outputs["serve"], outputs["generate"])
    np.testing.assert_array_equal(outputs["simulate"], outputs["generate"])


def test_feed_slides_the_window_to_the_newest_keep_tokens():
    model = tiny_model(32)
    dec = engine.DecodeEngine(model, cache_len=8, keep=3)
    dec.start(torch.arange(8)[None])
    assert dec.length == 8
    dec.feed(torch.tensor([20]))  # the cache is full: keep 6, 7 and the new 20
    assert dec.length == 3
    assert dec.context[0, :3].tolist() == [6, 7, 20]
    expected = model(torch.tensor([[6, 7, 20]]))[:, -1]
    torch.testing.assert_close(dec.logits, expected.detach())
    dec.feed(torch.tensor([21]))  # then one decode step at position 3
    assert dec.length == 4 and dec.context[0, :4].tolist() == [6, 7, 20, 21]


def test_sample_each_draws_what_sample_draws_on_each_slice():
    """The service's one pass per distinct settings gives each slice of rows the tokens
    `sample` gives it alone, from its own generator: mixed settings (greedy, top-k with
    a banned id, top-p, min-p), rows left out give PAD."""
    model = tiny_model(32)
    prompts = torch.randint(0, VOCAB - 2, (8, PROMPT), generator=torch.Generator().manual_seed(1))
    top_k = SamplingConfig(temperature=1.3, top_k=5, forbid_seg=True)
    draws = [(top_k, slice(0, 2), 11), (SamplingConfig(temperature=0), slice(2, 3), 12),
             (SamplingConfig(top_p=0.7, min_p=0.05), slice(3, 6), 13), (top_k, slice(6, 7), 14)]
    batch = engine.DecodeEngine(model, specials=(PAD, SEG))
    batch.start(prompts)
    for _ in range(5):
        each = batch.sample_each([(cfg, torch.Generator().manual_seed(seed), rows)
                                  for cfg, rows, seed in draws])
        for cfg, rows, seed in draws:
            alone = batch.sample(cfg, torch.Generator().manual_seed(seed), rows)
            assert torch.equal(each[rows], alone), (cfg.label, rows)
        assert each[7] == PAD and not (each[:2] == SEG).any()
        batch.feed(each)


@pytest.mark.parametrize("d_model", [32, 64])
def test_an_engine_started_again_draws_what_a_new_one_draws(d_model):
    """The rollout service and the simulator keep one engine for all their batches: a
    second start on the same rows zeroes and reuses the cache (the C step's transposed key
    copy too) and gives the tokens of a new engine, window slides included."""
    model = tiny_model(d_model)
    prompts = torch.randint(0, VOCAB - 2, (ROWS, PROMPT), generator=torch.Generator().manual_seed(7))

    def run(dec: engine.DecodeEngine, seed: int) -> torch.Tensor:
        dec.start(prompts)
        generator, out = torch.Generator().manual_seed(seed), []
        for _ in range(NEW):
            out.append(dec.sample(SAMPLING, generator))
            dec.feed(out[-1])
        return torch.stack(out, 1)

    reused = engine.DecodeEngine(model, specials=(PAD, SEG))
    first = run(reused, 1)
    cache = reused.cache
    assert torch.equal(run(reused, 2), run(engine.DecodeEngine(model, specials=(PAD, SEG)), 2))
    assert reused.cache is cache  # zeroed, not allocated again
    assert torch.equal(run(reused, 1), first)


def test_the_service_decodes_batch_after_batch_on_one_engine():
    model = tiny_model(64)
    service = RolloutEngine(model, PAD, SEG, batch_rows=ROWS)
    prompt = torch.randint(0, VOCAB - 2, (PROMPT,), generator=torch.Generator().manual_seed(3))
    got = []
    for seed in (SEED, SEED + 1, SEED):
        job = Job(prompt=prompt.numpy(), n=ROWS, length=NEW, sampling=SAMPLING, seed=seed)
        service.run_batch([job], lambda j, tokens: got.append(tokens))
    assert service.decoder.cache is not None
    np.testing.assert_array_equal(got[0], by_serve(model, prompt))  # a new RolloutEngine
    np.testing.assert_array_equal(got[2], got[0])
    assert not np.array_equal(got[1], got[0])
