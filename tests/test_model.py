"""The decoder: shapes, causality, KV-cache equivalence, GQA, presets, tied weights."""

from __future__ import annotations

import pytest
import torch

from mega_trading.core.config import to_dict
from mega_trading.core.errors import ConfigError
from mega_trading.model.transformer import KVCache, ModelConfig, Transformer, config_from_dict
from tests.numerics import assert_float32_close, float64_twin, model_reduction_len

VOCAB = 61


def tiny_config(**overrides) -> ModelConfig:
    base = {"vocab_size": VOCAB, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
            "d_model": 32, "ffn_hidden": 48}
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


def test_forward_shapes_and_dtype(model):
    idx = torch.randint(0, VOCAB, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_changing_a_future_token_leaves_earlier_logits_alone(model):
    idx = torch.randint(0, VOCAB, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert (before[:, 12:] - after[:, 12:]).abs().max() > 1e-4


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_cached_decoding_matches_full_forward(n_kv_head):
    torch.manual_seed(1)
    net = Transformer(tiny_config(n_kv_head=n_kv_head)).eval()
    idx = torch.randint(0, VOCAB, (2, 24))
    cache = KVCache(net.cfg, batch=2, max_len=32)
    with torch.no_grad():
        exact = float64_twin(net)(idx)
        steps = [net(idx[:, :9], cache=cache, start_pos=0)]  # prefill
        for pos in range(9, 24):
            steps.append(net(idx[:, pos:pos + 1], cache=cache, start_pos=pos))
    assert_float32_close(torch.cat(steps, dim=1), exact, model_reduction_len(net.cfg, 24))


def test_prefill_in_chunks_and_cache_reset(model):
    idx = torch.randint(0, VOCAB, (1, 20))
    cache = model.new_cache(batch=1)
    with torch.no_grad():
        exact = float64_twin(model)(idx)
        first = model(idx[:, :8], cache=cache, start_pos=0)
        second = model(idx[:, 8:], cache=cache, start_pos=8)  # a masked multi-token step
        cache.reset()
        assert cache.k.abs().sum() == 0
        again = model(idx[:, :8], cache=cache, start_pos=0)
    assert_float32_close(torch.cat([first, second], 1), exact, model_reduction_len(model.cfg, 20))
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_cache_and_positions_are_bounded(model):
    cache = model.new_cache(batch=1, max_len=8)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache, start_pos=0)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError):
        KVCache(model.cfg, batch=1, max_len=64)


def test_grouped_query_attention_has_fewer_kv_weights():
    gqa = Transformer(tiny_config(n_head=4, n_kv_head=1))
    attention = gqa.layers[0].attention
    assert attention.wq.weight.shape == (32, 32)
    assert attention.wk.weight.shape == (8, 32)  # 1 kv head of dim 8
    loss = gqa(torch.randint(0, VOCAB, (2, 10))).logsumexp(-1).mean()
    loss.backward()
    assert attention.wk.weight.grad.abs().sum() > 0


def test_tied_embeddings_share_storage():
    tied = Transformer(tiny_config())
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert len({id(p) for p in tied.parameters()}) == len(list(tied.parameters()))
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * 32
    assert n_tied == tied.cfg.n_params() and n_untied == untied.cfg.n_params()


def test_rope_buffers_are_not_saved(model):
    assert not any("rope" in key for key in model.state_dict())


def test_residual_output_projections_start_smaller():
    net = Transformer(tiny_config(n_layer=8, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=256))
    wq_std = net.layers[0].attention.wq.weight.std().item()
    wo_std = net.layers[0].attention.wo.weight.std().item()
    assert wo_std == pytest.approx(wq_std / 4, rel=0.1)  # 1 / sqrt(2 * 8)


@pytest.mark.parametrize(
    "preset, expected",
    [
        # vocab 2,048: hidden params + 2,048 x d_model tied embedding
        ("micro", 738_432 + 2048 * 128),  # 1,000,576
        ("small", 23_601_664 + 2048 * 512),  # 24,650,240
        ("base", 225_485_824 + 2048 * 1024),  # 227,582,976: ~226M + embeddings
    ],
)
def test_preset_parameter_counts(preset, expected):
    cfg = ModelConfig.from_preset(preset, vocab_size=2048)
    with torch.device("meta"):  # count without allocating 900 MB for base
        net = Transformer(cfg)
    assert sum(p.numel() for p in net.parameters()) == expected == cfg.n_params()


def test_base_preset_shape():
    cfg = ModelConfig.from_preset("base", vocab_size=2048)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden,
            cfg.block_size) == (20, 1024, 16, 4, 2816, 512)
    assert cfg.n_params() == pytest.approx(226e6, rel=0.03)
    info = cfg.describe()
    assert info["head_dim"] == 64 and info["kv_groups"] == 4
    assert info["flops_per_token"] > 6 * cfg.n_params(include_embeddings=False)
    micro = ModelConfig.from_preset("micro", vocab_size=2048)
    # 6 x (738,432 hidden + 262,144 output head) + 3 x causal attention 2 x L x T x D
    assert micro.flops_per_token(256) == 6 * 1_000_576 + 3 * 2 * 4 * 256 * 128


def test_from_preset_overrides_and_errors():
    cfg = ModelConfig.from_preset("micro", vocab_size=100, n_layer=2, block_size="64")
    assert (cfg.n_layer, cfg.block_size, cfg.d_model) == (2, 64, 128)
    assert config_from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.from_preset("huge", vocab_size=100)
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_preset("micro")
    with pytest.raises(ConfigError, match="unknown config key"):
        ModelConfig.from_preset("micro", vocab_size=100, n_layers=3)
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        ModelConfig.from_preset("micro", vocab_size=100, n_kv_head=3)


def test_param_groups_cover_every_parameter_once(model):
    groups = model.param_groups()
    assert len(groups["matrix"]) == 2 * 7  # wq wk wv wo w1 w2 w3 per layer
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert groups["embedding"] == [model.tok_embeddings.weight]
    assert len(groups["norm"]) == 2 * 2 + 1
    total = sum(len(g) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_last_logits_equal_the_forward_last_position(model):
    idx = torch.randint(0, VOCAB, (2, 11))
    cache = model.new_cache(batch=2)
    with torch.no_grad():
        last = model.last_logits(idx, cache=cache, start_pos=0)
        exact = float64_twin(model)(idx)
    assert last.shape == (2, VOCAB)
    assert_float32_close(last, exact[:, -1], model_reduction_len(model.cfg, 11))
