"""The CPU causal-attention kernel: the values and gradients of SDPA in float64 to within
float32 rounding (tests/numerics.py), for every instruction set this CPU runs (AVX2 and
AVX-512 builds on an AVX-512 machine), deterministic, safe under torch.compile, and a clean
fallback where it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mega_trading.core.config import from_dict
from mega_trading.core.errors import ConfigError
from mega_trading.model import kernels
from mega_trading.model.transformer import Attention, ModelConfig, Transformer
from mega_trading.train.accel import CPUKernelAttention, apply_cpu_attention, resolve_accel
from mega_trading.train.config import TrainConfig
from tests.numerics import assert_float32_close, float64_twin, model_reduction_len

CPU = torch.device("cpu")
BUILDS = kernels._compiler() is not None
needs_compiler = pytest.mark.skipif(not BUILDS, reason="no C compiler on this machine")
ISAS = kernels.supported_isas()  # ("avx2", "avx512") on an AVX-512 x86 CPU


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    """Run the test with the kernels built for one instruction set."""
    monkeypatch.setenv(kernels.ISA_ENV, request.param)
    return request.param


def qkv(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, layout: str,
        seed: int = 0) -> list[torch.Tensor]:
    """q, k, v as the model makes them ('model': [B, T, H, D] memory viewed as [B, H, T, D])
    or contiguous [B, H, T, D]."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for n in (heads, kv_heads, kv_heads):
        if layout == "model":
            x = torch.randn(batch, length, n, head_dim, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(batch, n, length, head_dim, generator=gen)
        tensors.append(x.requires_grad_())
    return tensors


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 4, 2, 256, 32), (3, 4, 1, 100, 64), (2, 2, 2, 64, 16),
                                   (1, 6, 3, 130, 32), (2, 4, 2, 5, 32)],
                         ids=["micro", "mqa-padded", "mha", "groups-of-2-padded", "short"])
@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_kernel_matches_sdpa_values_and_gradients(shape, layout, isa):
    assert kernels.attention_kernel_error(shape[-1]) is None
    q, k, v = qkv(*shape, layout)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]  # the float64 reference
    expected = sdpa(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    out = kernels.causal_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    reduction_len = shape[3] + shape[4]  # over positions (softmax, P·V) and head dim (q·k)
    assert_float32_close(out, expected.detach(), reduction_len)
    for name, got, want in zip("qkv", grads, expected_grads):
        assert_float32_close(got, want, reduction_len, msg=f"d{name}")
    assert out.stride() == q.stride()  # laid out like q: the model's reshape stays a view


@needs_compiler
def test_each_instruction_set_builds_its_own_vector_width_and_agrees_with_the_others(
        monkeypatch):
    """One CI run on an AVX-512 machine covers the AVX2 code path too."""
    widths = {"avx2": 256, "avx512": 512}
    libraries = {isa: kernels._library(32, isa) for isa in ISAS}
    for isa, library in libraries.items():
        assert kernels.vector_bits(library) == widths.get(isa, kernels.vector_bits(library))
    assert len({lib._name for lib in libraries.values()}) == len(ISAS)  # cached apart
    q, k, v = qkv(2, 4, 2, 96, 32, "model")
    exact = sdpa(*(x.detach().double() for x in (q, k, v)))
    outputs = {}
    for isa in ISAS:
        monkeypatch.setenv(kernels.ISA_ENV, isa)
        outputs[isa] = kernels.causal_attention(q, k, v).detach()
        assert_float32_close(outputs[isa], exact, 96 + 32, msg=isa)


def test_an_unknown_or_unsupported_instruction_set_is_refused_with_a_reason(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "sse9")
    assert "sse9 is not one of native, avx2, avx512" in kernels.attention_kernel_error(32)
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv(kernels.ISA_ENV, "avx512")
    kernels._attention_kernel_error.cache_clear()
    kernels._library.cache_clear()
    try:
        assert kernels.supported_isas() == ("avx2",)
        assert "lacks avx512f" in kernels.attention_kernel_error(32)
    finally:
        kernels._attention_kernel_error.cache_clear()
        kernels._library.cache_clear()


@needs_compiler
def test_kernel_is_deterministic_and_passes_the_custom_op_checks(isa):
    q, k, v = qkv(2, 4, 2, 128, 32, "model")
    grad = torch.randn(q.shape)
    first = torch.autograd.grad(kernels.causal_attention(q, k, v), (q, k, v), grad)
    second = torch.autograd.grad(kernels.causal_attention(q, k, v), (q, k, v), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # one pass per head, fixed order: bit for bit
    torch.library.opcheck(torch.ops.mega_trading.causal_attention_cpu.default, (q, k, v))


@needs_compiler
def test_a_compiled_model_on_the_kernel_trains_like_the_sdpa_model():
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                      ffn_hidden=128, block_size=64)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fast = Transformer(cfg)
    fast.load_state_dict(plain.state_dict())
    assert apply_cpu_attention(fast) == 2
    assert all(type(m) is CPUKernelAttention for m in fast.modules() if isinstance(m, Attention))
    assert fast.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 64, (3, 65), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    want_loss, want_grads = loss_and_grads(float64_twin(plain))  # the float64 reference
    compiled = torch.compile(fast)
    got_loss, got_grads = loss_and_grads(compiled)
    # Weight gradients also sum over the batch's 3 x 64 positions.
    reduction_len = 2 * model_reduction_len(cfg, 64) + 3 * 64
    assert_float32_close(got_loss, want_loss, reduction_len)
    for got, want in zip(got_grads, want_grads):
        assert_float32_close(got, want, reduction_len)


def test_the_swapped_attention_keeps_sdpa_under_autocast_and_with_a_kv_cache(monkeypatch):
    cfg = ModelConfig(vocab_size=64, n_layer=1, d_model=64, n_head=4, n_kv_head=2,
                      ffn_hidden=128, block_size=32)
    model = Transformer(cfg)
    apply_cpu_attention(model)
    x = torch.randint(0, 64, (2, 32))

    def refuse(*args):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(kernels, "causal_attention", refuse)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)  # bf16 q/k/v: SDPA
        model(x[:, :8], cache=model.new_cache(2, 32), start_pos=0)  # cached decoding: SDPA
        with pytest.raises(AssertionError, match="the kernel ran"):
            model(x)  # float32 whole window: the kernel


@needs_compiler
def test_training_on_cpu_uses_the_kernel_by_default_and_can_turn_it_off():
    plan = resolve_accel("auto", False, CPU, cpu_attention=TrainConfig().cpu_attention,
                         head_dim=32)
    assert plan.cpu_attention and "CPU attention kernel on" in plan.describe()
    assert not resolve_accel("auto", False, CPU, cpu_attention="false", head_dim=32).cpu_attention
    # Unsupported head dims fall back with a note; insisting on the kernel is an error.
    odd = resolve_accel("auto", False, CPU, cpu_attention="auto", head_dim=8)
    assert not odd.cpu_attention and "head dim 8" in odd.describe()
    with pytest.raises(ConfigError, match="head dim 8"):
        resolve_accel("auto", False, CPU, cpu_attention="true", head_dim=8)
    with pytest.raises(ConfigError, match="cpu_attention must be auto, true or false"):
        from_dict(TrainConfig, {"cpu_attention": "sometimes"})


def test_without_a_compiler_auto_falls_back_to_sdpa_and_true_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels._library.cache_clear()
    kernels._attention_kernel_error.cache_clear()
    try:
        assert "no C compiler" in kernels.attention_kernel_error(32)
        plan = resolve_accel("auto", False, CPU, cpu_attention="auto", head_dim=32)
        assert not plan.cpu_attention and "using SDPA" in plan.describe()
        with pytest.raises(ConfigError, match="no C compiler"):
            resolve_accel("auto", False, CPU, cpu_attention="true", head_dim=32)
        assert not (tmp_path / "cache").exists()  # nothing half-built left behind
    finally:
        kernels._library.cache_clear()
        kernels._attention_kernel_error.cache_clear()


@needs_compiler
def test_the_build_is_cached_per_machine_and_written_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._library.cache_clear()
    try:
        kernels._library(16)
        built = list((tmp_path / "mega_trading" / "kernels").iterdir())
        assert [p.suffix for p in built] == [".so"]  # no temp files left
        kernels._library.cache_clear()
        mtime = built[0].stat().st_mtime_ns
        kernels._library(16)  # found in the cache: not rebuilt
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        kernels._library.cache_clear()


@needs_compiler
def test_loading_the_kernel_leaves_the_floating_point_environment_alone():
    """A library built with -ffast-math would switch the whole process to flush-to-zero."""
    import numpy as np

    kernels._library(32)
    assert np.float64(1e-310) * 1.0 != 0.0
    assert np.float32(1e-40) * np.float32(1.0) != 0.0
    assert torch.tensor(1e-40, dtype=torch.float32).mul(1.0).item() != 0.0
