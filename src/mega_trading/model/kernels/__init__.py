"""Hand-written CPU kernels, compiled on first use, with PyTorch as the fallback.

* `causal_attention.c`: causal grouped-query attention, forward and backward, float32, for
  CPU training (the file says why PyTorch's own kernel is not enough at small head dims).
  It enters PyTorch as two custom ops (`torch.library.custom_op`), so autograd and
  `torch.compile` treat it like any other op; `accel.apply_cpu_attention` routes a model's
  attention through `causal_attention(q, k, v)`.
* `decode_step.c`: one whole decode step through every layer, for the sampler
  (`decode.decode_step` calls `decode_layers`).

Each is built by the system C compiler into a per-machine cache
(``$XDG_CACHE_HOME/mega_trading/kernels``, else ``~/.cache/...``), written atomically, keyed
by the source, the flags, the compiler, the CPU and the instruction set, and loaded with
ctypes (`mega_trading.core.native`, shared with the book's capture scanner). The instruction set
is the host CPU's (``native``) unless ``MEGA_TRADING_KERNEL_ISA`` says ``avx2`` or
``avx512``: an AVX-512 machine can then build and test the AVX2 code path too
(`supported_isas()` lists what this CPU runs). The 16-float vector types fix the
summation order in the source, so the two builds have matched bit for bit here (AMD EPYC,
GCC 12), but nothing promises it (contraction into FMAs is the compiler's choice): the tests
hold each build to the float32 bound against float64 instead.
`attention_kernel_error(head_dim)` / `decode_kernel_error()` say why a kernel cannot run
here (no compiler, no OpenMP, ...) or return None; callers then keep PyTorch's path.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from mega_trading.core import native

SOURCE = Path(__file__).with_name("causal_attention.c")
DECODE_SOURCE = Path(__file__).with_name("decode_step.c")
# Not -ffast-math: a shared object built with it sets flush-to-zero for the whole process
# when loaded (crtfastmath.o), which changes numpy's and torch's results elsewhere.
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
         "-shared")
ISA_ENV = "MEGA_TRADING_KERNEL_ISA"
# -march per instruction set. avx2 keeps the host's tuning and every extension but AVX-512
# (-mno-avx512f turns off all AVX-512 subsets, which depend on it): the code an AVX2-only
# CPU of the same generation would get. avx512 insists on the host having it.
ISA_FLAGS = {"native": ("-march=native",), "avx2": ("-march=native", "-mno-avx512f"),
             "avx512": ("-march=native",)}
ISA_CPU_FLAGS = {"avx2": "avx2", "avx512": "avx512f"}  # the /proc/cpuinfo flag each needs
TILE = 64  # the kernel's key tile: sequence lengths are padded to a multiple of it
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)  # multiples of the 16-float vector


class _Strides(ctypes.Structure):
    _fields_ = [("b", ctypes.c_long), ("h", ctypes.c_long), ("t", ctypes.c_long)]


def cache_dir() -> Path:
    return native.cache_dir()


def _cpu_flags() -> set[str]:
    return native.cpu_flags()


def supported_isas() -> tuple[str, ...]:
    """The explicit instruction sets this CPU runs (both on an AVX-512 x86), else native."""
    flags = _cpu_flags()
    return tuple(isa for isa, flag in ISA_CPU_FLAGS.items() if flag in flags) or ("native",)


def kernel_isa() -> str:
    """The instruction set to build for: $MEGA_TRADING_KERNEL_ISA, default native."""
    return os.environ.get(ISA_ENV, "").strip().lower() or "native"


def _isa_flags(isa: str) -> tuple[str, ...]:
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"{ISA_ENV}={isa} is not one of {', '.join(ISA_FLAGS)}")
    if isa != "native" and isa not in supported_isas():
        raise RuntimeError(f"{ISA_ENV}={isa}: this CPU lacks {ISA_CPU_FLAGS[isa]}")
    return ISA_FLAGS[isa]


def _compiler() -> str | None:
    return native.find_compiler()


def _build(source: Path, isa: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`source` compiled on this machine for `isa` (once: then found in the cache), loaded."""
    isa_flags = _isa_flags(isa)
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    suffix = "".join(f"_{d.split('=')[-1]}" for d in defines)
    return native.build(source, (*FLAGS, *isa_flags, *defines), tag=f"{suffix}_{isa}",
                        compiler=compiler)


@functools.cache
def _library(head_dim: int, isa: str = "native") -> ctypes.CDLL:
    """The attention kernel compiled for `head_dim` and `isa` on this machine."""
    lib = _build(SOURCE, isa, (f"-DHEAD_DIM={head_dim}",))
    if lib.head_dim() != head_dim:
        raise RuntimeError(f"the attention kernel was built for head dim {lib.head_dim()}")
    pointer, strides, long_, float_ = ctypes.c_void_p, _Strides, ctypes.c_long, ctypes.c_float
    lib.attention_forward.argtypes = [pointer, strides, pointer, pointer, strides, pointer,
                                      strides, pointer, long_, long_, long_, long_, float_]
    lib.attention_backward.argtypes = [pointer, strides, pointer, strides, pointer, pointer,
                                       pointer, strides, pointer, pointer, pointer, strides,
                                       pointer, strides, pointer, strides,
                                       long_, long_, long_, long_, float_]
    return lib


@functools.cache
def _decode_library(isa: str = "native") -> ctypes.CDLL:
    lib = _build(DECODE_SOURCE, isa)
    pointer, long_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.decode_layers.argtypes = [pointer, long_, long_, long_, pointer, pointer, pointer,
                                  pointer, long_, long_, long_, long_, pointer, pointer,
                                  pointer, pointer, pointer, long_, long_, long_, float_,
                                  pointer, long_, pointer]
    lib.decode_layers.restype = ctypes.c_int
    return lib


_load_error = native.load_error


def decode_kernel_error() -> str | None:
    """Why the decode-step kernel cannot run here (for `kernel_isa()`), or None."""
    return _decode_kernel_error(kernel_isa())


@functools.cache
def _decode_kernel_error(isa: str) -> str | None:
    return _load_error(lambda: _decode_library(isa))


def vector_bits(library: ctypes.CDLL) -> int:
    """The vector width a built kernel uses: 512 (AVX-512), 256 (AVX2) or 0 (other)."""
    return library.kernel_vector_bits()


def pointer_array(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (the caller keeps the tensors alive)."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def decode_layers(x: torch.Tensor, weights: tuple, dims: tuple[int, int, int, int],
                  cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, cache_kt: torch.Tensor, pos: int, eps: float,
                  head: torch.Tensor) -> torch.Tensor:
    """One decode step on x [B, D] (updated in place) -> logits [B, vocab_padded]
    (see decode_step.c).

    weights: (wqkv, wo, w13, w2) C pointer arrays of [in, out] float32 matrices; dims:
    (H, KV, Dh, F); cache_k / cache_v [layers, B, KV, max_len, Dh] and cache_kt
    [layers, B, KV, tiles, Dh, 16], all contiguous, the new keys go into both; head
    [D, vocab_padded], the final norm gain folded in."""
    B, D = x.shape
    H, KV, Dh, F_ = dims
    logits = torch.empty(B, head.shape[1])
    status = _decode_library(kernel_isa()).decode_layers(
        _ptr(x), B, D, cache_k.shape[0], *weights, H, KV, Dh, F_, _ptr(cos), _ptr(sin),
        _ptr(cache_k), _ptr(cache_v), _ptr(cache_kt), cache_kt.shape[3] * 16, cache_k.shape[3],
        pos, eps, _ptr(head), head.shape[1], _ptr(logits))
    if status:
        raise RuntimeError(f"decode_layers failed with status {status} (unsupported shape "
                           f"or out of memory)")
    return logits


def attention_kernel_error(head_dim: int) -> str | None:
    """Why the CPU attention kernel cannot run for this head dim here (for `kernel_isa()`),
    or None."""
    return _attention_kernel_error(head_dim, kernel_isa())


@functools.cache
def _attention_kernel_error(head_dim: int, isa: str) -> str | None:
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of {HEAD_DIMS}"
    return _load_error(lambda: _library(head_dim, isa))


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
    _library(D, kernel_isa()).attention_forward(_ptr(qp), _strides(qp), _ptr(kt), _ptr(vp),
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
    _library(D, kernel_isa()).attention_backward(
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
