"""Training accelerators: Liger-Kernel fused ops, fused linear cross-entropy, activation
checkpointing, pinned host memory (GPU), and our causal-attention kernel (CPU). Every piece
has a plain PyTorch path: nothing here imports `liger_kernel` or `triton` until a CUDA run
asks for them, and the CPU kernel falls back to SDPA where it cannot be built.

What each does for `train.py`:

* `resolve_accel(...)` turns the config (`liger: auto|true|false`, `activation_checkpointing`)
  and the device into an `AccelPlan`; `auto` means Liger on CUDA when `liger_kernel` imports.
* `apply_accel(model, plan)` swaps, in place and before DDP/FSDP2 wrapping, the RMSNorm,
  SwiGLU and RoPE of the model for fused kernels and/or wraps every block in activation
  checkpointing. Swaps change the modules' classes only: parameter names, state dicts and
  checkpoints stay exactly as they were.
* `fused_linear_cross_entropy(hidden, weight, targets)` is head + loss in one op (Liger's
  chunked kernel never holds the [B*T, V] logits); without Liger it is the plain head + loss.
* `apply_cpu_attention(model)` routes the training forward's causal attention through
  `kernels.causal_attention` (float32 CPU tensors; anything else stays on SDPA).
* `to_device(tensor, device, pin_memory)` copies a host batch through pinned memory so the
  copy does not block the CPU.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mega_trading.core.errors import ConfigError
from mega_trading.model import kernels
from mega_trading.model.transformer import Attention, Block, FeedForward, RMSNorm, apply_rope

INSTALL_HINT = "pip install 'mega-trading[gpu]' (liger-kernel, which brings triton)"


# --- kernels -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernels:
    """One implementation of each fusable op, with the semantics of the model's own code.

    rms_norm(x, weight, eps): normalize in float32, cast back, then scale (HF Llama casting).
    rope(q, k, cos, sin): q [B, H, T, Dh], k [B, K, T, Dh], cos/sin [T, Dh] -> (q, k).
    swiglu(gate, up): silu(gate) * up.
    linear_cross_entropy(hidden [N, D], weight [V, D], targets [N]): mean cross-entropy of
    hidden @ weight.T.
    """

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    linear_cross_entropy: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


def _torch_rope(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _torch_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _torch_linear_cross_entropy(hidden, weight, targets) -> torch.Tensor:
    # The very ops of `Transformer.forward` + `train.compute_loss`, so the two paths agree
    # bit for bit (under autocast too: F.linear autocasts exactly like nn.Linear).
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def reference_kernels() -> Kernels:
    """Plain PyTorch kernels: what the unfused model computes, usable on any device."""
    return Kernels("torch", _torch_rms_norm, _torch_rope, _torch_swiglu,
                   _torch_linear_cross_entropy)


@functools.cache
def _liger_import_error() -> str | None:
    """None when Liger's modules import (they need triton), else why not."""
    try:
        import liger_kernel.transformers  # noqa: F401
        from liger_kernel.transformers.functional import (  # noqa: F401
            liger_rms_norm,
            liger_rope,
            liger_swiglu,
        )
    except Exception as exc:  # ImportError, or a triton that fails to initialize
        return f"{type(exc).__name__}: {exc}"
    return None


def liger_available() -> bool:
    """Whether liger_kernel (and so triton) imports. Imports it: call only when wanted."""
    return _liger_import_error() is None


@functools.cache
def liger_kernels() -> Kernels:
    """Liger-Kernel's Triton kernels behind the `Kernels` interface (CUDA tensors only)."""
    error = _liger_import_error()
    if error is not None:
        raise ConfigError(f"liger-kernel cannot be imported ({error}); {INSTALL_HINT}")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.functional import liger_rms_norm, liger_rope, liger_swiglu

    loss_fn = LigerFusedLinearCrossEntropyLoss()  # mean over targets, ignore_index -100

    def rms_norm(x, weight, eps):
        return liger_rms_norm(x, weight, eps)  # casting_mode "llama": same as RMSNorm

    def rope(q, k, cos, sin):
        # Liger takes cos/sin [1, T, Dh] (HF layout, halves repeated, like rope_tables), and
        # some versions also return cos and sin.
        out = liger_rope(q, k, cos.unsqueeze(0), sin.unsqueeze(0))
        return out[0], out[1]

    def linear_cross_entropy(hidden, weight, targets):
        # Outside autocast, in the weight's dtype (float32 in training): Liger's chunked
        # grad-weight accumulation mixes dtypes under AMP (Liger issues #305/#501) and a
        # bf16 accumulator drifts (#512). The head is ~1% of the FLOPs at a 2k vocab.
        with torch.autocast(hidden.device.type, enabled=False):
            loss = loss_fn(weight, hidden.to(weight.dtype), targets)
        return loss[0] if isinstance(loss, tuple) else loss

    return Kernels("liger", rms_norm, rope, liger_swiglu, linear_cross_entropy)


def fused_linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                               targets: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ lm_head_weight.T` against `targets`.

    hidden [..., D] (e.g. [B, T, D] from `model(x, return_hidden=True)`), targets [...].
    impl: 'liger' (Liger's fused kernel: never materializes [N, V] logits), 'torch' (the
    plain head + cross-entropy), 'auto' (Liger for CUDA tensors when it imports).
    """
    if impl not in ("auto", "liger", "torch"):
        raise ValueError(f"impl must be auto, liger or torch, got {impl!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if impl == "liger" or (impl == "auto" and hidden.is_cuda and liger_available()):
        return liger_kernels().linear_cross_entropy(hidden, lm_head_weight, targets)
    return _torch_linear_cross_entropy(hidden, lm_head_weight, targets)


# --- fused modules: same parameters and names, forward through `_kernels` -----------------------

class FusedRMSNorm(RMSNorm):
    _kernels: Kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernels.rms_norm(x, self.weight, self.eps)


class FusedFeedForward(FeedForward):
    _kernels: Kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self._kernels.swiglu(self.w1(x), self.w3(x)))


class FusedAttention(Attention):
    _kernels: Kernels

    def rotate(self, q, k, cos, sin):
        return self._kernels.rope(q, k, cos, sin)


_FUSED = {RMSNorm: ("rms_norm", FusedRMSNorm), FeedForward: ("swiglu", FusedFeedForward),
          Attention: ("rope", FusedAttention)}


def apply_liger(model: nn.Module, kernels: Kernels | None = None) -> dict[str, int]:
    """Route every RMSNorm, SwiGLU and RoPE of `model` through `kernels` (default: Liger's).

    In place, before DDP/FSDP2 wrapping and torch.compile. Only classes change, so
    parameters, their names and state dicts are untouched. Returns how many modules of
    each kind now use the kernels. Raises ConfigError when Liger is wanted but missing.
    """
    kernels = kernels or liger_kernels()
    counts: Counter[str] = Counter()
    for module in model.modules():
        for plain, (kind, fused) in _FUSED.items():
            if type(module) in (plain, fused):
                module.__class__ = fused
                module._kernels = kernels
                counts[kind] += 1
    return {kind: counts[kind] for kind, _ in _FUSED.values()}


# --- CPU attention kernel ------------------------------------------------------------------------

class CPUKernelAttention(Attention):
    """Attention whose whole-window path runs `kernels.causal_attention` on float32 CPU
    tensors (the training forward); under autocast, on CUDA and with a KV cache it is the
    plain module."""

    def attend(self, q, k, v):
        if q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32:
            return kernels.causal_attention(q, k, v)
        return super().attend(q, k, v)


def apply_cpu_attention(model: nn.Module) -> int:
    """Swap every plain Attention of `model` for CPUKernelAttention, in place (parameters and
    state dicts unchanged); returns how many. Check `kernels.attention_kernel_error` first."""
    count = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = CPUKernelAttention
            count += 1
    return count


# --- activation checkpointing ----------------------------------------------------------------------

class CheckpointedBlock(Block):
    """A Block that keeps only its input for backward and recomputes the rest (training only:
    cached decoding and no-grad evaluation run the block as is)."""

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        if cache is not None or not torch.is_grad_enabled():
            return super().forward(x, cos, sin, cache, start_pos)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(super().forward, x, cos, sin, use_reentrant=False)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block, in place (before FSDP2 / DDP wrapping); parameter
    names are unchanged. Returns the number of blocks."""
    count = 0
    for module in model.modules():
        if type(module) in (Block, CheckpointedBlock):
            module.__class__ = CheckpointedBlock
            count += 1
    return count


# --- plan ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccelPlan:
    """What one training run enables, and why anything asked for is off."""

    liger: bool = False  # fused RMSNorm / SwiGLU / RoPE
    fused_cross_entropy: bool = False  # Liger's fused head + loss (needs the whole head weight)
    activation_checkpointing: bool = False
    pin_memory: bool = False  # batches go host -> pinned -> device, non-blocking
    cpu_attention: bool = False  # kernels.causal_attention for float32 CPU training
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        def onoff(flag: bool) -> str:
            return "on" if flag else "off"

        text = (f"liger {onoff(self.liger)}, fused linear cross-entropy "
                f"{onoff(self.fused_cross_entropy)}, activation checkpointing "
                f"{onoff(self.activation_checkpointing)}, pinned batches {onoff(self.pin_memory)}, "
                f"CPU attention kernel {onoff(self.cpu_attention)}")
        return text + (f" ({'; '.join(self.notes)})" if self.notes else "")


def check_liger_setting(value: object, name: str = "liger") -> None:
    if value not in ("auto", "true", "false", True, False):
        raise ConfigError(f"{name} must be auto, true or false, got {value!r}")


def resolve_cpu_attention(setting: str | bool, device: torch.device, head_dim: int | None
                          ) -> tuple[bool, str | None]:
    """(use the CPU attention kernel, a note on why not). 'auto': on for CPU runs when the
    kernel builds for this head dim; 'true' where it cannot is a ConfigError."""
    check_liger_setting(setting, "cpu_attention")
    if setting in (False, "false") or head_dim is None:
        return False, None
    wanted = setting in (True, "true")
    if device.type != "cpu":
        if wanted:
            raise ConfigError(f"cpu_attention=true needs a CPU run, not {device.type}")
        return False, None
    error = kernels.attention_kernel_error(head_dim)
    if error is None:
        return True, None
    if wanted:
        raise ConfigError(f"cpu_attention=true but the kernel cannot be built: {error}")
    return False, f"CPU attention kernel: {error}; using SDPA"


def resolve_accel(liger: str | bool, activation_checkpointing: bool, device: torch.device,
                  fsdp: bool = False,
                  available: Callable[[], bool] = liger_available,
                  cpu_attention: str | bool = "false",
                  head_dim: int | None = None) -> AccelPlan:
    """The plan for `device`. liger 'auto': on for CUDA when liger_kernel imports (checked only
    on CUDA, so CPU runs never import it); 'true' without CUDA or Liger is a ConfigError.
    cpu_attention: see `resolve_cpu_attention` (needs the model's head_dim)."""
    check_liger_setting(liger)
    use_cpu_attention, note = resolve_cpu_attention(cpu_attention, device, head_dim)
    notes: list[str] = [note] if note else []
    wanted = liger in (True, "true")
    use_liger = False
    if liger in (False, "false"):
        pass
    elif device.type != "cuda":
        if wanted:
            raise ConfigError(f"liger=true needs a CUDA device (Liger's Triton kernels do not "
                              f"run on {device.type}); use liger=auto or false")
        notes.append(f"liger: no CUDA device ({device.type})")
    elif available():
        use_liger = True
    elif wanted:
        raise ConfigError(f"liger=true but liger-kernel cannot be imported "
                          f"({_liger_import_error() or 'not installed'}); {INSTALL_HINT}")
    else:
        notes.append("liger: liger-kernel not importable")
    fused_ce = use_liger and not fsdp
    if use_liger and fsdp:
        # Under FSDP2 the head weight is a shard outside the model's forward.
        notes.append("fused cross-entropy off under FSDP2")
    return AccelPlan(liger=use_liger, fused_cross_entropy=fused_ce,
                     activation_checkpointing=bool(activation_checkpointing),
                     pin_memory=device.type == "cuda", cpu_attention=use_cpu_attention,
                     notes=tuple(notes))


def apply_accel(model: nn.Module, plan: AccelPlan) -> None:
    """Apply a plan's module changes to the bare model (before wrapping and compiling)."""
    if plan.cpu_attention:
        apply_cpu_attention(model)
    if plan.liger:
        apply_liger(model)
    if plan.activation_checkpointing:
        enable_activation_checkpointing(model)


def to_device(tensor: torch.Tensor, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """Host batch -> device. pin_memory (CUDA): page-locked staging, so the copy is
    asynchronous and overlaps the previous step's kernels."""
    if pin_memory and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
