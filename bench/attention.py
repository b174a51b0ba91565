"""Benchmark: causal attention of one layer, our CPU kernel beside PyTorch's SDPA.

Forward and forward + backward of `kernels.causal_attention` and of
`F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on the same q, k, v, laid
out as the model makes them ([B, T, H, D] memory seen as [B, H, T, D]); the two alternate,
several rounds, median shown. Default shape: the micro preset's training step (batch 16,
4 heads, 2 key/value heads, T 256, head dim 32).

    .venv/bin/python bench/attention.py
    .venv/bin/python bench/attention.py --heads 16 --kv-heads 4 --head-dim 64 --seq 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mega_trading.model import kernels


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timed(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    error = kernels.attention_kernel_error(args.head_dim)
    if error:
        raise SystemExit(f"the CPU attention kernel cannot run here: {error}")
    gen = torch.Generator().manual_seed(0)
    B, T, D = args.batch, args.seq, args.head_dim
    q, k, v = (torch.randn(B, T, n, D, generator=gen).transpose(1, 2).requires_grad_()
               for n in (args.heads, args.kv_heads, args.kv_heads))
    grad = torch.randn(q.shape, generator=gen)

    def forward(fn):
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward(fn):
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    torch.testing.assert_close(kernels.causal_attention(q, k, v), sdpa(q, k, v), rtol=0,
                               atol=1e-5)
    cases = {(name, part): (lambda fn=fn, part=part: part(fn))
             for name, fn in (("SDPA", sdpa), ("ours", kernels.causal_attention))
             for part in (forward, forward_backward)}
    for case in cases.values():
        timed(case, 2)  # warm-up
    seconds: dict = {key: [] for key in cases}
    for r in range(args.rounds):
        for key in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            seconds[key].append(timed(cases[key], args.reps))
    # Causal FLOPs: half of the T x T scores; backward ~2.5x the forward's matmuls.
    pairs = B * args.heads * T * (T + 1) / 2
    flops = {forward: 4 * D * pairs, forward_backward: 14 * D * pairs}
    print(f"B {B}, heads {args.heads}/{args.kv_heads}, T {T}, head dim {D}, "
          f"{args.threads} threads, median of {args.rounds} rounds x {args.reps} calls")
    print("| attention, one layer | SDPA ms | ours ms | ours vs SDPA | ours GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for part, label in ((forward, "forward"), (forward_backward, "forward + backward")):
        theirs = statistics.median(seconds[("SDPA", part)])
        ours = statistics.median(seconds[("ours", part)])
        print(f"| {label} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | {theirs / ours:.2f}x "
              f"| {flops[part] / ours / 1e9:.0f} |")


if __name__ == "__main__":
    main()
