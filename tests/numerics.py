"""Tolerances for float32 results that follow from the arithmetic, not from one machine.

A float32 computation is compared with the same computation in float64 (the reference),
rather than with another float32 path: two float32 paths (PyTorch's BLAS, our AVX2 or AVX-512
kernels, a KV cache) sum in different orders, and which of them lands closer to the other
depends on the CPU. What every order shares is the bound on its distance to the exact
result.

The bound. A length-K float32 dot product is off by at most K·u·Σ|terms| (u = eps/2, the
unit roundoff; Higham, "Accuracy and Stability of Numerical Algorithms", §3.1), and, since
rounding errors behave like independent zero-mean variables, by about sqrt(K)·u·‖terms‖ in
practice (Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019).
A forward pass chains reductions (over d_model, ffn_hidden, the attention positions, layer
after layer), whose errors add like independent variables too, so K is their summed length;
max|reference| sets the scale. The constant C covers what the sqrt(K) rule leaves out:
norms, exp and softmax, a product's two factors (|x|·|w| vs |x·w|), and growth through the
layers. In units of u it is the λ of the probabilistic bound, which fails with probability
about 2·exp(-λ²/2): C = 8 (λ = 16) is certain enough. Measured worst cases in these tests
(AVX2 and AVX-512 builds of the kernels, PyTorch) reach 0.8·eps·sqrt(K)·max|ref|, a 10x
margin; a real bug (a wrong position, a stale cache row, a missing scale) is off by
O(max|ref|), ~100x above the bound at these sizes.

When no float64 run is practical (a sampling loop), two float32 paths are compared with
twice the bound: each lies within it of the exact result.
"""

from __future__ import annotations

import math

import torch

from mega_trading.model.transformer import Transformer

EPS32 = torch.finfo(torch.float32).eps  # 2**-23
C = 8.0


def float32_tolerance(reference: torch.Tensor, reduction_len: int, c: float = C) -> float:
    """The absolute error allowed a float32 result next to its float64 `reference`."""
    return c * EPS32 * math.sqrt(reduction_len) * float(reference.abs().max())


def assert_float32_close(got: torch.Tensor, reference: torch.Tensor, reduction_len: int,
                         msg: str | None = None) -> None:
    """`got` (float32) is within the float32 rounding bound of `reference` (float64)."""
    assert reference.dtype == torch.float64, "the reference must be computed in float64"
    tolerance = float32_tolerance(reference, reduction_len)
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=tolerance, msg=msg)


def assert_float32_paths_close(got: torch.Tensor, other: torch.Tensor, reduction_len: int,
                               msg: str | None = None) -> None:
    """Two float32 computations of the same values, each within the bound of the exact one."""
    tolerance = 2 * float32_tolerance(other, reduction_len)
    torch.testing.assert_close(got, other, rtol=0, atol=tolerance, msg=msg)


def model_reduction_len(cfg, length: int) -> int:
    """Summed reduction lengths of a forward pass over `length` positions: per layer the
    q/k/v and output projections (d_model, n_head·head_dim), attention (positions and
    head_dim) and the feed-forward (d_model, ffn_hidden); then the output head (d_model)."""
    head_dim = cfg.d_model // cfg.n_head
    per_layer = 3 * cfg.d_model + cfg.ffn_hidden + length + head_dim
    return cfg.n_layer * per_layer + cfg.d_model


def float64_twin(model: Transformer) -> Transformer:
    """The same model (weights, rope tables) in float64: the reference for its float32 run.
    Built afresh, not deep-copied: the model may hold the decode step's C pointers."""
    twin = Transformer(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin.double().train(model.training)
