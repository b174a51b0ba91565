"""The fused single-token decode step (the sampler's fast path) against the plain forward,
both measured against the model in float64 with the float32 rounding bound of
tests/numerics.py; the C step on every instruction set this CPU runs."""

from __future__ import annotations

import pytest
import torch

from mega_trading.model import decode, kernels
from mega_trading.model.decode import decode_step, decode_weights
from mega_trading.model.transformer import KVCache, ModelConfig, Transformer
from tests.numerics import assert_float32_close, float64_twin, model_reduction_len
from tests.test_model import VOCAB, tiny_config

ISAS = kernels.supported_isas()


def exact_logits(net, idx) -> torch.Tensor:
    """The forward pass in float64: the reference every float32 path is held to."""
    with torch.inference_mode():
        return float64_twin(net)(idx)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(1)
    return Transformer(tiny_config()).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_decode_step_matches_forward_logits_and_cache(n_kv_head):
    torch.manual_seed(2)
    net = Transformer(tiny_config(n_kv_head=n_kv_head, block_size=24)).eval()
    for param in net.parameters():  # non-trivial norm gains: they are folded into matmuls
        if param.ndim == 1:
            param.data.uniform_(0.5, 1.5)
    idx = torch.randint(0, VOCAB, (3, 24))
    fast, slow = net.new_cache(batch=3), net.new_cache(batch=3)
    exact = exact_logits(net, idx)
    exact_cache = KVCache(net.cfg, 3, 24, dtype=torch.float64)
    reduction_len = model_reduction_len(net.cfg, 24)
    with torch.inference_mode():
        float64_twin(net)(idx, cache=exact_cache, start_pos=0)
        net(idx[:, :5], cache=fast, start_pos=0)
        net(idx[:, :5], cache=slow, start_pos=0)
        for pos in range(5, 24):
            step = decode_step(net, idx[:, pos:pos + 1], fast, pos)
            plain = net(idx[:, pos:pos + 1], cache=slow, start_pos=pos)[:, -1]
            assert_float32_close(step, exact[:, pos], reduction_len)
            assert_float32_close(plain, exact[:, pos], reduction_len)
    assert exact.std() > 0.1
    assert "_fused_decode" in net.__dict__  # the fused path ran, not the plain fallback
    for cache in (fast, slow):
        assert_float32_close(cache.k, exact_cache.k, reduction_len)
        assert_float32_close(cache.v, exact_cache.v, reduction_len)


def test_decode_step_follows_weight_updates_and_stays_out_of_checkpoints(model):
    torch.manual_seed(3)
    net = Transformer(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (2, 6))

    def step_vs_forward():
        cache = net.new_cache(batch=2)
        with torch.no_grad():
            net(idx[:, :5], cache=cache, start_pos=0)
            step = decode_step(net, idx[:, 5:], cache, 5)
            return step, exact_logits(net, idx)[:, -1]

    reduction_len = model_reduction_len(net.cfg, 6)
    before, _ = step_vs_forward()
    with torch.no_grad():  # an optimizer step: in place, same storage
        net.layers[0].feed_forward.w1.weight.mul_(3.0)
        net.norm.weight.add_(0.5)
    after, reference = step_vs_forward()
    assert (after - before).abs().max() > 1e-3  # the fused weights were rebuilt
    assert_float32_close(after, reference, reduction_len)
    net.load_state_dict(model.state_dict())  # a checkpoint load
    after_load, reference = step_vs_forward()
    assert_float32_close(after_load, reference, reduction_len)
    assert set(net.state_dict()) == set(model.state_dict())  # no fused tensors saved


def test_decode_step_with_grad_or_bad_position_takes_the_checked_forward(model):
    idx = torch.randint(0, VOCAB, (1, 4))
    cache = model.new_cache(batch=1, max_len=8)
    model(idx[:, :3], cache=cache, start_pos=0)
    logits = decode_step(model, idx[:, 3:], cache, 3)  # grad enabled: the autograd forward
    assert logits.requires_grad and logits.shape == (1, VOCAB)
    with torch.no_grad(), pytest.raises(ValueError):
        decode_step(model, idx[:, 3:], cache, 8)


def test_decode_step_after_a_last_logits_prefill(model):
    idx = torch.randint(0, VOCAB, (2, 11))
    cache = model.new_cache(batch=2)
    with torch.no_grad():
        model.last_logits(idx, cache=cache, start_pos=0)
        step = decode_step(model, idx[:, :1], cache, 11)
    full = exact_logits(model, torch.cat([idx, idx[:, :1]], 1))[:, -1]
    assert_float32_close(step, full, model_reduction_len(model.cfg, 12))


def test_other_models_take_their_plain_forward():
    """Not a Transformer (here a compiled-style wrapper): decode_step calls the model."""
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx, cache=None, start_pos=0):
            calls.append(start_pos)
            return self.inner(idx, cache=cache, start_pos=start_pos)

    torch.manual_seed(4)
    inner = Transformer(tiny_config()).eval()
    idx = torch.randint(0, VOCAB, (2, 6))
    cache = inner.new_cache(batch=2)
    with torch.no_grad():
        inner(idx[:, :5], cache=cache, start_pos=0)
        step = decode_step(Wrapper(inner), idx[:, 5:], cache, 5)
    assert_float32_close(step, exact_logits(inner, idx)[:, -1], model_reduction_len(inner.cfg, 6))
    assert calls == [5]


NATIVE = pytest.mark.skipif(kernels.decode_kernel_error() is not None,
                            reason="the C decode step cannot be built here (no compiler)")


@NATIVE
@pytest.mark.parametrize("heads, head_dim", [((4, 4), 16), ((4, 2), 32), ((4, 1), 32),
                                             ((8, 1), 16)], ids=["mha", "gqa", "mqa", "g8"])
@pytest.mark.parametrize("isa", ISAS)
def test_the_c_decode_step_matches_the_forward_and_follows_every_prefill(heads, head_dim, isa,
                                                                        monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, isa)
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=90, block_size=40, n_layer=2, n_head=heads[0],
                      n_kv_head=heads[1], d_model=heads[0] * head_dim, ffn_hidden=48)
    net = Transformer(cfg).eval()
    for param in net.parameters():
        if param.ndim == 1:
            param.data.uniform_(0.5, 1.5)
    assert decode_weights(net).native is not None
    exact_net, reduction_len = float64_twin(net), model_reduction_len(cfg, 40)
    cache = net.new_cache(batch=3)
    with torch.inference_mode():
        for trial in range(2):  # the same cache again, after a new prefill (stale key copy)
            idx = torch.randint(0, 90, (3, 40), generator=torch.Generator().manual_seed(trial))
            reference = KVCache(cfg, 3, 40, dtype=torch.float64)
            exact = exact_net(idx, cache=reference, start_pos=0)
            prefix = 5 + 11 * trial
            net(idx[:, :prefix], cache=cache, start_pos=0)
            for pos in range(prefix, 40):
                step = decode_step(net, idx[:, pos:pos + 1], cache, pos)
                assert_float32_close(step, exact[:, pos], reduction_len)
            assert_float32_close(cache.k, reference.k, reduction_len)
            assert_float32_close(cache.v, reference.v, reduction_len)


@NATIVE
def test_without_the_c_step_decoding_takes_the_pytorch_path(monkeypatch):
    cfg = ModelConfig(vocab_size=90, block_size=16, n_layer=1, n_head=2, n_kv_head=1,
                      d_model=32, ffn_hidden=32)
    net = Transformer(cfg).eval()
    idx = torch.randint(0, 90, (2, 16))
    monkeypatch.setattr(kernels, "decode_kernel_error", lambda: "no C compiler found")
    monkeypatch.setattr(kernels, "decode_layers", None)  # would fail if called
    assert decode.decode_weights(net).native is None
    cache = net.new_cache(batch=2)
    with torch.inference_mode():
        net(idx[:, :8], cache=cache, start_pos=0)
        step = decode_step(net, idx[:, 8:9], cache, 8)
    assert_float32_close(step, exact_logits(net, idx[:, :9])[:, -1], model_reduction_len(cfg, 9))
