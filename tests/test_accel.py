"""GPU training path (accel.py, bench/gpu.py): CPU fallbacks, plumbing, and Liger parity.

CPU tests always run: the plain fallbacks must equal the unfused model exactly. Tests of the
Liger/Triton kernels themselves need CUDA and skip without it; on a device they compare each
fused op, and the whole fused model, with the plain PyTorch path.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mega_trading.core.config import from_dict
from mega_trading.core.errors import ConfigError
from mega_trading.model.transformer import ModelConfig, Transformer, rope_tables
from mega_trading.train import accel
from mega_trading.train.accel import (
    AccelPlan,
    Kernels,
    apply_liger,
    enable_activation_checkpointing,
    fused_linear_cross_entropy,
    reference_kernels,
    resolve_accel,
    to_device,
)
from mega_trading.train.config import TrainConfig
from mega_trading.train.loss import compute_loss

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"
CPU = torch.device("cpu")
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs CUDA: Liger/Triton kernels")
TINY = {"n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2, "ffn_hidden": 64,
        "block_size": 16}


def tiny_model(vocab: int = 50, device: torch.device = CPU, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, **TINY)).to(device)


def batch(vocab: int = 50, size: int = 3, device: torch.device = CPU, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (size, TINY["block_size"] + 1), generator=gen)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def loss_and_grads(model, x, y, lm_head=None, amp: torch.dtype | None = None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = compute_loss(model, x, y, lm_head)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_identical(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def counting(kernels: Kernels) -> tuple[Kernels, dict[str, int]]:
    """The same kernels, counting how often the model calls each."""
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0}

    def wrap(kind, fn):
        def counted(*args):
            calls[kind] += 1
            return fn(*args)
        return counted

    return Kernels(f"counted {kernels.name}", wrap("rms_norm", kernels.rms_norm),
                   wrap("rope", kernels.rope), wrap("swiglu", kernels.swiglu),
                   kernels.linear_cross_entropy), calls


# --- imports and configuration (CPU) --------------------------------------------------------------

def test_importing_never_loads_liger_or_triton_and_works_without_them():
    # Liger and triton are made unimportable, as on a CPU-only install.
    script = textwrap.dedent("""
        import sys
        sys.modules["liger_kernel"] = None
        sys.modules["triton"] = None
        import torch
        before = set(sys.modules)
        import mega_trading.train.accel, mega_trading.train.loop, mega_trading.model.transformer
        new = set(sys.modules) - before
        gpu_only = [m for m in new if m.split(".")[0] in ("liger_kernel", "triton")]
        assert not gpu_only, gpu_only
        from mega_trading.train.accel import liger_available, resolve_accel
        assert not liger_available()
        plan = resolve_accel("auto", False, torch.device("cuda"))  # probe on 'CUDA'
        assert not plan.liger and "not importable" in plan.describe(), plan
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    # And in this process, importing them above loaded neither.
    assert "liger_kernel" not in sys.modules or torch.cuda.is_available()


def test_auto_is_off_on_cpu_and_true_refuses_without_cuda():
    plan = resolve_accel("auto", False, CPU)
    assert (plan.liger, plan.fused_cross_entropy, plan.pin_memory) == (False, False, False)
    assert "no CUDA device" in plan.describe()
    assert resolve_accel("false", True, CPU).activation_checkpointing
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_accel("true", False, CPU)
    with pytest.raises(ConfigError, match="liger must be auto, true or false"):
        resolve_accel("maybe", False, CPU)
    # The training config accepts the same spellings as compile/fsdp and rejects others.
    assert from_dict(TrainConfig, {"liger": "true"}).liger == "true"
    assert from_dict(TrainConfig, {"liger": False, "activation_checkpointing": True}).liger is False
    assert TrainConfig().liger == "auto" and TrainConfig().activation_checkpointing is False
    with pytest.raises(ConfigError, match="liger"):
        TrainConfig(liger="sometimes")


def test_resolution_on_cuda_follows_the_probe_and_fsdp():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    plan = resolve_accel("auto", False, cuda, available=lambda: True)
    assert (plan.liger, plan.fused_cross_entropy, plan.pin_memory) == (True, True, True)
    sharded = resolve_accel("auto", True, cuda, fsdp=True, available=lambda: True)
    assert sharded.liger and not sharded.fused_cross_entropy
    assert "FSDP2" in sharded.describe() and sharded.activation_checkpointing
    missing = resolve_accel("auto", False, cuda, available=lambda: False)
    assert not missing.liger and missing.pin_memory
    assert not resolve_accel(False, False, cuda, available=lambda: True).liger
    with pytest.raises(ConfigError, match="liger-kernel"):
        resolve_accel("true", False, cuda, available=lambda: False)


def test_liger_kernels_refuse_with_an_install_hint_when_liger_is_missing(monkeypatch):
    monkeypatch.setattr(accel, "_liger_import_error", lambda: "ImportError: blocked")
    accel.liger_kernels.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"mega-trading\[gpu\]"):
            apply_liger(tiny_model())
    finally:
        accel.liger_kernels.cache_clear()


# --- plain fallbacks equal the unfused model (CPU) -------------------------------------------------

def test_return_hidden_stops_before_the_head_and_gives_the_same_loss():
    model = tiny_model()
    x, y = batch()
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (3, TINY["block_size"], TINY["d_model"])
    logits = model(x)
    assert torch.equal(model.output(hidden).float(), logits)
    plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert torch.equal(compute_loss(model, x, y), plain)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_fallback_fused_cross_entropy_equals_the_logits_path_exactly(amp):
    model = tiny_model()
    x, y = batch()
    plain = loss_and_grads(model, x, y, amp=amp)
    fused = loss_and_grads(model, x, y, lm_head=model.output.weight, amp=amp)
    assert_identical(plain, fused)
    assert plain[1]["tok_embeddings.weight"].abs().sum() > 0  # the tied head got gradients


def test_fallback_fused_cross_entropy_is_the_plain_head_and_loss():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    fused = fused_linear_cross_entropy(hidden, weight, targets)  # auto on CPU: plain torch
    fused.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 11), targets.reshape(-1))
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="impl"):
        fused_linear_cross_entropy(hidden, weight, targets, impl="fast")


def test_swapped_modules_route_through_the_kernels_and_keep_every_name():
    plain = tiny_model()
    fused = copy.deepcopy(plain)
    kernels, calls = counting(reference_kernels())
    counts = apply_liger(fused, kernels)
    n_layer = TINY["n_layer"]
    assert counts == {"rms_norm": 2 * n_layer + 1, "swiglu": n_layer, "rope": n_layer}
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x, y = batch()
    assert_identical(loss_and_grads(plain, x, y),
                     loss_and_grads(fused, x, y, lm_head=fused.output.weight))
    # every norm, feed-forward and attention of the forward went through the kernels
    assert calls == {"rms_norm": 2 * n_layer + 1, "rope": n_layer, "swiglu": n_layer}
    # a copy of a swapped model routes through the kernels too, and loads plain weights
    twin = copy.deepcopy(fused)
    twin.load_state_dict(plain.state_dict())
    twin(x)
    assert calls["swiglu"] == 2 * n_layer
    assert apply_liger(fused, kernels) == counts  # idempotent


def test_activation_checkpointing_gives_identical_loss_and_grads_with_fewer_saved_tensors():
    plain = tiny_model()
    checkpointed = copy.deepcopy(plain)
    assert enable_activation_checkpointing(checkpointed) == TINY["n_layer"]
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    x, y = batch()
    assert_identical(loss_and_grads(plain, x, y), loss_and_grads(checkpointed, x, y))

    def saved_bytes(model) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            compute_loss(model, x, y)
        return total

    assert saved_bytes(checkpointed) < 0.6 * saved_bytes(plain)
    # decoding with a KV cache and no-grad evaluation bypass the checkpoint
    with torch.no_grad():
        cache = checkpointed.new_cache(1)
        assert torch.equal(checkpointed(x[:1], cache=cache), plain(x[:1]))


def test_to_device_keeps_a_cpu_batch_as_is():
    x, _ = batch()
    assert to_device(x, CPU) is x
    assert AccelPlan().describe().startswith("liger off")


TRAIN_BASE = {"model": {k: v for k, v in TINY.items() if k != "block_size"}, "block_size": 16,
              "batch_size": 4, "steps": 3, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
              "eval_batches": 1, "ckpt_every": 0, "tracking": "none"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, sample_trade_zips) -> Path:
    from mega_trading.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("accel_data") / "data"
    prepare(sample_trade_zips[:1], out, PrepareConfig(block_size=16, stride=16, workers=1))
    return out


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_data) -> Path:
    from mega_trading.train.loop import train

    run = tmp_path_factory.mktemp("accel_plain") / "run"
    train(tiny_data, run, from_dict(TrainConfig, TRAIN_BASE), log=lambda _: None)
    return run


def test_training_with_activation_checkpointing_matches_a_plain_run(tmp_path, tiny_data,
                                                                    plain_run):
    from mega_trading.train.loop import train

    lines: list[str] = []
    cfg = from_dict(TrainConfig, {**TRAIN_BASE, "activation_checkpointing": True})
    train(tiny_data, tmp_path / "run", cfg, log=lines.append)
    accel_line = next(line for line in lines if line.startswith("accelerators:"))
    assert "activation checkpointing on" in accel_line and "liger off" in accel_line
    assert len(train_losses(plain_run)) == 3
    assert train_losses(tmp_path / "run") == train_losses(plain_run)


def test_fsdp2_with_activation_checkpointing_under_torchrun_matches_one_process(tmp_path,
                                                                               tiny_data,
                                                                               plain_run):
    """2 CPU ranks (gloo), every block sharded and checkpointed: the same trajectory."""
    overrides = [f"model.{k}={v}" for k, v in TRAIN_BASE["model"].items()] + [
        f"{k}={v}" for k, v in TRAIN_BASE.items() if k != "model"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "mega_trading.cli", "train", "--data",
               str(tiny_data), "--out", str(tmp_path / "run"), *overrides, "fsdp=true",
               "activation_checkpointing=true"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2 x2" in done.stderr and "activation checkpointing on" in done.stderr
    got, want = train_losses(tmp_path / "run"), train_losses(plain_run)
    assert len(got) == 3 and got == pytest.approx(want, abs=1e-4)  # rank-sum order only


# --- bench/gpu.py (CPU) ------------------------------------------------------------------------------

def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU machine, wherever this runs
    return subprocess.run([sys.executable, str(BENCH), *args], check=False, capture_output=True,
                          text=True, cwd=ROOT, env=env)


def test_bench_refuses_without_cuda_in_one_line():
    done = run_bench("--presets", "small")
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "needs a CUDA device" in done.stderr
    assert done.stdout == ""


def test_bench_dry_run_trains_every_uncompiled_toggle_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench("--dry-run", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()
            if line.startswith("| micro |")]
    table = {cells[1].strip(): [c.strip() for c in cells] for cells in rows}
    assert list(table) == ["eager", "compile", "liger", "compile+liger"]
    for mode in ("eager", "liger"):
        assert table[mode][-1] == "ok" and float(table[mode][3].replace(",", "")) > 0
    assert table["liger"][2] == "torch"  # reference kernels stand in for Liger on CPU
    # same weights and batches, kernels identical to the plain ops: the same loss
    assert table["eager"][7] == table["liger"][7] and 0 < float(table["eager"][7]) < 20
    assert all(table[m][-1].startswith("skipped: --dry-run") for m in ("compile", "compile+liger"))
    assert "CPU (dry run)" in done.stdout
    saved = json.loads(out.read_text())
    assert [r["mode"] for r in saved["results"]] == list(table)
    assert "provenance" in saved


# --- Liger kernels vs plain PyTorch (CUDA) ------------------------------------------------------------

@pytest.fixture
def exact_matmuls():
    """Full-precision float32 matmuls (training sets TF32), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def liger_or_skip() -> Kernels:
    if not accel.liger_available():
        pytest.skip("needs liger-kernel: pip install 'mega-trading[gpu]'")
    return accel.liger_kernels()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@CUDA_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_rms_norm_matches_torch(dtype, exact_matmuls):
    liger, ref = liger_or_skip(), reference_kernels()
    cuda = torch.device("cuda")
    gen = torch.Generator(device=cuda).manual_seed(0)
    base = torch.randn(4, 64, 256, device=cuda, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(256, device=cuda, generator=gen)).to(dtype)
    upstream = torch.randn(4, 64, 256, device=cuda, generator=gen).to(dtype)
    outs, grads = [], []
    for kernels in (liger, ref):
        x, w = base.clone().requires_grad_(), weight.clone().requires_grad_()
        out = kernels.rms_norm(x, w, 1e-5)
        out.backward(upstream.clone())  # Liger may write its backward into the upstream grad
        outs.append(out.detach())
        grads.append((x.grad, w.grad))
    assert outs[0].dtype == outs[1].dtype == dtype
    assert rel_err(outs[0], outs[1]) < TOLERANCE[dtype]
    for got, want in zip(grads[0], grads[1], strict=True):
        assert rel_err(got, want) < TOLERANCE[dtype] * 5


@CUDA_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_rope_matches_torch_with_grouped_query_heads(dtype):
    liger, ref = liger_or_skip(), reference_kernels()
    cuda = torch.device("cuda")
    B, T, H, K, Dh = 2, 64, 8, 2, 32
    cos, sin = (t.to(cuda) for t in rope_tables(Dh, T, 10000.0))
    gen = torch.Generator(device=cuda).manual_seed(1)
    q_base = torch.randn(B, T, H, Dh, device=cuda, generator=gen).to(dtype)
    k_base = torch.randn(B, T, K, Dh, device=cuda, generator=gen).to(dtype)
    dq, dk = (torch.randn_like(t).transpose(1, 2) for t in (q_base, k_base))
    results = []
    for kernels in (liger, ref):
        qb, kb = q_base.clone().requires_grad_(), k_base.clone().requires_grad_()
        # as in Attention.forward: a fresh [B, T, heads, Dh] tensor viewed as [B, heads, T, Dh]
        q, k = (qb * 1).transpose(1, 2), (kb * 1).transpose(1, 2)
        q_out, k_out = kernels.rope(q, k, cos, sin)
        # fresh upstream grads in the outputs' dtypes: Liger's backward works in place
        torch.autograd.backward([q_out, k_out], [dq.to(q_out.dtype, copy=True),
                                                 dk.to(k_out.dtype, copy=True)])
        results.append((q_out.detach().float(), k_out.detach().float(), qb.grad, kb.grad))
    for got, want in zip(results[0], results[1], strict=True):
        assert rel_err(got, want) < TOLERANCE[dtype]


@CUDA_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_swiglu_matches_torch(dtype):
    liger, ref = liger_or_skip(), reference_kernels()
    cuda = torch.device("cuda")
    gen = torch.Generator(device=cuda).manual_seed(2)
    gate0 = torch.randn(4, 64, 352, device=cuda, generator=gen).to(dtype)
    up0 = torch.randn(4, 64, 352, device=cuda, generator=gen).to(dtype)
    upstream = torch.randn(4, 64, 352, device=cuda, generator=gen).to(dtype)
    results = []
    for kernels in (liger, ref):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        out = kernels.swiglu(gate, up)
        out.backward(upstream.clone())  # Liger's backward may reuse its buffers
        results.append((out.detach(), gate.grad, up.grad))
    for got, want in zip(results[0], results[1], strict=True):
        assert rel_err(got, want) < TOLERANCE[dtype]


@CUDA_ONLY
@pytest.mark.gpu
def test_liger_fused_linear_cross_entropy_matches_the_plain_head_and_loss(exact_matmuls):
    liger_or_skip()
    cuda = torch.device("cuda")
    gen = torch.Generator(device=cuda).manual_seed(3)
    hidden0 = torch.randn(4 * 512, 256, device=cuda, generator=gen)
    weight0 = 0.02 * torch.randn(1800, 256, device=cuda, generator=gen)
    targets = torch.randint(0, 1800, (4 * 512,), device=cuda, generator=gen)
    results = {}
    for impl in ("liger", "torch"):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss = fused_linear_cross_entropy(hidden, weight, targets, impl=impl)
        (0.5 * loss).backward()  # a scaled loss, as under gradient accumulation
        results[impl] = (loss.detach(), hidden.grad, weight.grad)
    torch.testing.assert_close(results["liger"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results["liger"][1:], results["torch"][1:], strict=True):
        assert rel_err(got, want) < 1e-4


@CUDA_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_liger_model_matches_the_plain_model(amp, exact_matmuls):
    liger_or_skip()
    cuda = torch.device("cuda")
    plain = tiny_model(vocab=1800, device=cuda)
    fused = copy.deepcopy(plain)
    assert apply_liger(fused)["rope"] == TINY["n_layer"]
    x, y = batch(vocab=1800, size=8, device=cuda)
    want_loss, want = loss_and_grads(plain, x, y, amp=amp)
    got_loss, got = loss_and_grads(fused, x, y, lm_head=fused.output.weight, amp=amp)
    tolerance = 1e-4 if amp is None else 3e-2
    assert abs(float(got_loss) - float(want_loss)) < tolerance * float(want_loss)
    for name in want:
        assert rel_err(got[name], want[name]) < tolerance * 3, name


@CUDA_ONLY
@pytest.mark.gpu
def test_pinned_copy_reaches_the_device_intact():
    x, _ = batch()
    moved = to_device(x, torch.device("cuda"), pin_memory=True)
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), x)


@CUDA_ONLY
@pytest.mark.gpu
def test_cuda_training_with_liger_and_checkpointing_tracks_the_plain_run(tmp_path, tiny_data):
    liger_or_skip()
    from mega_trading.train.loop import train

    base = {**TRAIN_BASE, "batch_size": 8, "steps": 5, "device": "cuda", "compile": False}
    losses = {}
    for name, extra in (("plain", {"liger": False}),
                        ("fused", {"liger": True, "activation_checkpointing": True})):
        lines: list[str] = []
        train(tiny_data, tmp_path / name, from_dict(TrainConfig, {**base, **extra}),
              log=lines.append)
        losses[name] = train_losses(tmp_path / name)
        if name == "fused":
            line = next(x for x in lines if x.startswith("accelerators:"))
            assert "liger on" in line and "fused linear cross-entropy on" in line
            assert "pinned batches on" in line
    assert len(losses["fused"]) == 5
    for got, want in zip(losses["fused"], losses["plain"], strict=True):
        assert abs(got - want) < 0.05 * want  # bf16 rounding differs, the trajectory does not
