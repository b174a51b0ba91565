"""Hand-written CPU kernels, compiled on first use, with PyTorch as the fallback.

One kernel so far: causal grouped-query attention, forward and backward, float32, for CPU
training (`causal_attention.c` says why PyTorch's own kernel is not enough at small head
dims). It is built by the system C compiler into a per-machine cache
(``$XDG_CACHE_HOME/mega_trading/kernels``, else ``~/.cache/...``), written atomically, keyed
by the source, the flags, the compiler and the CPU, and loaded with ctypes. It enters
PyTorch as two custom ops (`torch.library.custom_op`), so autograd and `torch.compile`
treat it like any other op.

`attention_kernel_error(head_dim)` says why the kernel cannot run here (no compiler, no
OpenMP, ...) or returns None; `causal_attention(q, k, v)` runs it; the model never calls
it directly: `accel.apply_cpu_attention` routes a model's attention through it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("causal_attention.c")
# Not -ffast-math: a shared object built with it sets flush-to-zero for the whole process
# when loaded (crtfastmath.o), which changes numpy's and torch's results elsewhere.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
         "-shared")
TILE = 64  # the kernel's key tile: sequence lengths are padded to a multiple of it
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)  # multiples of the 16-float vector


class _Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_long), ("h", ctypes.c_long), ("t", ctypes.c_long)]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mega_trading" / "kernels"


def _machine_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    parts = [platform.machine()]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("model name", "flags", "Features")):
                parts.append(line)
                if line.startswith(("flags", "Features")):
                    break
    return "\n".join(parts)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.cache
def _library(head_dim: int) -> ctypes.CDLL:
    """The kernel compiled for `head_dim` on this machine, built once and then cached."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True,
                             text=True, timeout=60).stdout
    flags = [*FLAGS, f"-DHEAD_DIM={head_dim}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version,
                                    _machine_fingerprint()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"causal_attention_d{head_dim}_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                    check=False, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)  # atomic: a concurrent build just wins the race
    lib = ctypes.CDLL(str(target))
    if lib.head_dim() != head_dim:
        raise RuntimeError(f"{target} was built for head dim {lib.head_dim()}")
    pointer, strides, long_, float_ = ctypes.c_void_p, _Strides, ctypes.c_long, ctypes.c_float
    lib.attention_forward.argtypes = [pointer, strides, pointer, pointer, strides, pointer,
                                      strides, pointer, long_, long_, long_, long_, float_]
    lib.attention_backward.argtypes = [pointer, strides, pointer, strides, pointer, pointer,
                                       pointer, strides, pointer, pointer, pointer, strides,
                                       pointer, strides, pointer, strides,
                                       long_, long_, long_, long_, float_]
    return lib


@functools.cache
def attention_kernel_error(head_dim: int) -> str | None:
    """Why the CPU attention kernel cannot run for this head dim here, or None."""
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of {HEAD_DIMS}"
    try:
        _library(head_dim)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return str(error)
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `causal_attention` takes these tensors (else use SDPA)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and q.dim() == 4 and k.shape == v.shape and q.shape[1] % k.shape[1] == 0
            and attention_kernel_error(q.shape[-1]) is None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` on CPU:
    q [B, H, T, D], k and v [B, KV, T, D], float32 -> [B, H, T, D] laid out like q."""
    return torch.ops.mega_trading.causal_attention_cpu(q, k, v)[0]


# --- the ops ------------------------------------------------------------------------------------

# Every tensor whose address goes to the kernel must stay referenced until the call returns.

def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> _Strides:
    return _Strides(*x.stride()[:3])


def _ptr(x: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(x.data_ptr())


def _padded(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]), value=value)


def _transposed(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3).contiguous()  # [B, KV, D, T]: the score products stream it


@torch.library.custom_op("mega_trading::causal_attention_cpu", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    length = -(-T // TILE) * TILE
    qp, kp, vp = (_rows(_padded(x, length)) for x in (q, k, v))
    kt = _transposed(kp)  # held here: the kernel only gets its address
    out = torch.empty_like(qp)
    lse = torch.empty(B, H, length, dtype=torch.float32)
    _library(D).attention_forward(_ptr(qp), _strides(qp), _ptr(kt), _ptr(vp),
                                  _strides(vp), _ptr(out), _strides(out), _ptr(lse),
                                  B, H, k.shape[1], length, D ** -0.5)
    return _like(q, out), lse[:, :, :T].contiguous()


@_forward_op.register_fake
def _forward_fake(q, k, v):
    return torch.empty_like(q), q.new_empty(q.shape[:3])


def _like(reference: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """padded[:, :, :T] with reference's strides: what the fake implementations promise
    torch.compile."""
    if padded.shape == reference.shape and padded.stride() == reference.stride():
        return padded
    return torch.empty_like(reference).copy_(padded[:, :, :reference.shape[2]])


@torch.library.custom_op("mega_trading::causal_attention_cpu_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    length = -(-T // TILE) * TILE
    delta = (grad * out).sum(-1).contiguous()  # [B, H, T]: rowsum(dO * O)
    # Padded rows get zero gradient and an infinite-like lse, so they add nothing.
    qp, kp, vp, gp = (_rows(_padded(x, length)) for x in (q, k, v, grad))
    lse_p = _padded(lse.unsqueeze(-1), length, 1e30).squeeze(-1).contiguous()
    delta_p = _padded(delta.unsqueeze(-1), length).squeeze(-1).contiguous()
    kt, vt = _transposed(kp), _transposed(vp)  # held here: the kernel only gets addresses
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    _library(D).attention_backward(
        _ptr(qp), _strides(qp), _ptr(kp), _strides(kp), _ptr(kt),
        _ptr(vt), _ptr(gp), _strides(gp), _ptr(lse_p), _ptr(delta_p),
        _ptr(dq), _strides(dq), _ptr(dk), _strides(dk), _ptr(dv), _strides(dv),
        B, H, k.shape[1], length, D ** -0.5)
    return _like(q, dq), _like(k, dk), _like(v, dv)


@_backward_op.register_fake
def _backward_fake(grad, q, k, v, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return _backward_op(grad_out, q, k, v, out, lse)


_forward_op.register_autograd(_backward, setup_context=_setup_context)
