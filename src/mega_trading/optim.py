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

    Computes in `dtype` (default: `ns_dtype(grad.device)`), returns grad's dtype.
    """
    if grad.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(grad.shape)}")
    x = grad.to(dtype or ns_dtype(grad.device))
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # Frobenius >= spectral norm, so all singular values <= 1
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = torch.addmm(x, poly, x, beta=a)  # a X + poly X
    if tall:
        x = x.T
    return x.to(grad.dtype)


def _orthogonalize(update: torch.Tensor, steps: int, dtype: str) -> torch.Tensor:
    """Newton-Schulz on the whole matrix. Under FSDP2 the update is a row-sharded DTensor:
    gather it (orthogonality couples all rows), iterate, and keep this rank's rows."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(update, DTensor):
            full = update.full_tensor()
            full = newton_schulz(full, steps, ns_dtype(full.device, dtype))
            # every rank computed the same full matrix, so slicing locally is enough
            return distribute_tensor(full, update.device_mesh, update.placements,
                                     src_data_rank=None)
    return newton_schulz(update, steps, ns_dtype(update.device, dtype))


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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)  # EMA of gradients
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = _orthogonalize(update, group["ns_steps"],
                                        group.get("ns_dtype", "auto"))
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
