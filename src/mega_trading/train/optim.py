"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon ("MomentUm Orthogonalized by Newton-Schulz") keeps a Nesterov momentum of each 2-D
gradient and replaces it by the nearest semi-orthogonal matrix before stepping, so every
direction of a weight matrix moves at a similar rate. The orthogonalization is a quintic
Newton-Schulz iteration whose coefficients pull singular values into a band around 1
quickly rather than exactly (about 0.7..1.2 after 5 steps), which is all an update needs.
Embeddings, the output head and norm gains are not hidden matrices and use AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from torch import nn

# Quintic iteration X <- a X + (b A + c A^2) X with A = X X^T. These coefficients maximize
# the slope at 0 (fast growth of small singular values) while staying bounded near 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Matrices up to this size are orthogonalized stacked by shape: their iterations are short
# enough that per-op overhead dominates. Larger ones are iterated one by one, which was as
# fast or faster on CPU (BENCHMARKS.md) and needs no stacked copy.
STACK_MAX_NUMEL = 1 << 16


@dataclass(frozen=True)
class OptimConfig:
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_weight_decay: float = 0.0
    adamw_lr: float = 3e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW on embeddings; norm gains never decay
    # Newton-Schulz precision; auto = bfloat16 where the hardware multiplies it natively
    muon_ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@cache
def _cpu_has_native_bf16() -> bool:
    try:  # oneDNN's own check (AVX512-BF16 / AMX); emulated bf16 would be slower than fp32
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def ns_dtype(device: torch.device, setting: str = "auto") -> torch.dtype:
    """The iteration tolerates bfloat16, and it is most of Muon's cost: use it where fast."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def newton_schulz(grad: torch.Tensor, steps: int = 5,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T for grad = U S V^T (singular values mapped into ~[0.7, 1.2]).

    grad is one matrix [m, n] or a stack of same-shape matrices [s, m, n], each
    orthogonalized on its own. Computes in `dtype` (default: `ns_dtype(grad.device)`),
    returns grad's dtype.
    """
    if grad.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, "
                         f"got shape {tuple(grad.shape)}")
    x = grad.to(dtype or ns_dtype(grad.device))
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    # Frobenius >= spectral norm, so all singular values <= 1
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    mul_add = torch.addmm if x.ndim == 2 else torch.baddbmm  # beta * input + alpha * a @ b
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.mT
        poly = mul_add(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = mul_add(x, poly, x, beta=a)  # a X + poly X
    if tall:
        x = x.mT
    return x.to(grad.dtype)


def newton_schulz_grouped(updates: list[torch.Tensor], steps: int,
                          dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """`newton_schulz` of every matrix in `updates`, the matrices of one shape (up to a
    transpose: the iteration runs on the wide side anyway) stacked into one batched
    iteration: a small model's dozens of tiny matrices would otherwise cost a dozen short
    ops each."""
    stacks: dict[tuple, list[int]] = {}
    for i, update in enumerate(updates):
        stacks.setdefault((tuple(sorted(update.shape)), update.dtype, update.device), []).append(i)
    out: list[torch.Tensor] = list(updates)
    for indices in stacks.values():
        tall = [updates[i].shape[0] > updates[i].shape[1] for i in indices]
        stack = torch.stack([updates[i].mT if t else updates[i] for i, t in zip(indices, tall)])
        for i, t, matrix in zip(indices, tall, newton_schulz(stack, steps, dtype).unbind(0)):
            out[i] = matrix.mT if t else matrix
    return out


def _orthogonalize_all(updates: list[torch.Tensor], steps: int,
                       setting: str) -> list[torch.Tensor]:
    """Newton-Schulz of every update: small ones stacked by shape, large ones one at a time
    (STACK_MAX_NUMEL). Under FSDP2 an update is a row-sharded DTensor: gather it
    (orthogonality couples all rows), iterate, and keep this rank's rows; a large one is
    gathered only when its turn comes, so at most one full large matrix is held."""
    if not updates:
        return []
    dtype = ns_dtype(updates[0].device, setting)
    out: list[torch.Tensor] = list(updates)
    small = []
    for i, update in enumerate(updates):
        if update.numel() <= STACK_MAX_NUMEL:
            small.append(i)
        else:
            out[i] = _reshard(newton_schulz(_gather(update), steps, dtype), update)
    grouped = newton_schulz_grouped([_gather(updates[i]) for i in small], steps, dtype)
    for i, result in zip(small, grouped):
        out[i] = _reshard(result, updates[i])
    return out


def _is_sharded(update: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(update, DTensor)


def _gather(update: torch.Tensor) -> torch.Tensor:
    return update.full_tensor() if _is_sharded(update) else update


def _reshard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """full, laid out as `like` (a DTensor) is; every rank computed the same full matrix,
    so slicing locally is enough."""
    if not _is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalization, for 2-D weights only.

    The update is scaled by sqrt(max(1, rows / cols)) so that tall matrices (more outputs
    than inputs) take per-element steps comparable to square ones.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, ns_dtype: str = "auto"):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                    "weight_decay": weight_decay, "ns_dtype": ns_dtype}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got {tuple(param.shape)}")

    def _momentum_update(self, param: nn.Parameter, momentum: float,
                         nesterov: bool) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(param.grad, 1 - momentum)  # EMA of gradients
        return param.grad.lerp(buf, momentum) if nesterov else buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = [self._momentum_update(p, momentum, group["nesterov"]) for p in params]
            orthogonal = _orthogonalize_all(updates, group["ns_steps"],
                                            group.get("ns_dtype", "auto"))
            for param, update in zip(params, orthogonal):
                scale = max(1.0, param.shape[0] / param.shape[1]) ** 0.5
                if group["weight_decay"]:
                    param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * scale)
        return loss


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class MuonAdamW:
    """Muon + AdamW stepped, zeroed, scheduled and checkpointed as one optimizer.

    Every param group carries `name` and `base_lr`; `set_lr_scale(f)` sets lr = f * base_lr
    in all groups, which is how a warmup/decay schedule drives both optimizers.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self.optimizers: list[torch.optim.Optimizer] = [muon, adamw]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_scale(self, scale: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * scale

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def _check_partition(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    grouped = [id(p) for name in ("matrix", "embedding", "norm") for p in groups[name]]
    expected = {id(p) for p in model.parameters()}
    assert len(grouped) == len(set(grouped)) and set(grouped) == expected, \
        "every parameter must be in exactly one optimizer group"


def build_optimizer(model: nn.Module, cfg: OptimConfig | None = None,
                    groups: dict[str, list[nn.Parameter]] | None = None) -> MuonAdamW:
    """Muon on `groups['matrix']`, AdamW on 'embedding' (decayed) and 'norm' (not).

    `groups` defaults to `model.param_groups()` (see `Transformer.param_groups`).
    """
    cfg = cfg or OptimConfig()
    groups = groups if groups is not None else _unwrap(model).param_groups()
    _check_partition(model, groups)
    muon = Muon(
        [{"params": groups["matrix"], "name": "matrix", "base_lr": cfg.muon_lr}],
        lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay,
        ns_dtype=cfg.muon_ns_dtype,
    )
    adamw_params = groups["embedding"] + groups["norm"]
    on_cuda = bool(adamw_params) and all(p.is_cuda for p in adamw_params)
    adamw = torch.optim.AdamW(
        [{"params": groups["embedding"], "name": "embedding", "base_lr": cfg.adamw_lr,
          "weight_decay": cfg.weight_decay},
         {"params": groups["norm"], "name": "norm", "base_lr": cfg.adamw_lr, "weight_decay": 0.0}],
        lr=cfg.adamw_lr, betas=cfg.adamw_betas, eps=cfg.adamw_eps,
        fused=True if on_cuda else None,
    )
    return MuonAdamW(muon, adamw)
