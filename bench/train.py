"""Benchmark: our training step beside transformers' LlamaForCausalLM, same config, same CPU.

Both models get the same weights, the same batches, the same loss (float32 cross entropy on
the logits) and the same optimizer (our Muon + AdamW recipe, or plain AdamW with
`--optimizer adamw`), so the difference is the model code alone. A step is forward +
backward + optimizer step. Contenders run alternately, several rounds, in one process;
the table shows the median round. Achieved FLOP/s uses `ModelConfig.flops_per_token`
(6N + causal attention) against the best of a few large fp32 matmuls on this machine.
"vs HF" compares the medians; "rounds" is the range of the same ratio within each round.

    .venv/bin/python bench/train.py --preset micro --batch 16 --seq 256 --compile
    .venv/bin/python bench/train.py --preset small --batch 8 --seq 256 --optimizer adamw

Muon's Newton-Schulz costs about 5 * (4 m n k + 2 k^3) FLOPs per m x n matrix (k = min)
per step whatever the batch: ~290 GFLOP for `small`, as much as the model's own FLOPs on
~1,900 tokens (2.2 GFLOP, ~330 tokens, for `micro`). It is not counted in the achieved FLOP/s, so small batches with
Muon show a low fraction of peak; `--optimizer adamw` isolates the model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mega_trading.model.export_hf import hf_state_dict, llama_config
from mega_trading.model.transformer import ModelConfig, Transformer
from mega_trading.train.accel import apply_accel, resolve_accel
from mega_trading.train.loss import ModelWithLoss
from mega_trading.train.optim import OptimConfig, build_optimizer


def matmul_peak_flops(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32,
                      clock=time.perf_counter) -> float:
    """Best FLOP/s of an n x n matmul: what this CPU can do at its most regular."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        start = clock()
        torch.mm(a, b)
        best = min(best, clock() - start)
    return 2 * n**3 / best


def hf_llama(model: Transformer) -> torch.nn.Module:
    """transformers' Llama with `model`'s config and a copy of its weights."""
    import transformers

    config = transformers.LlamaConfig(**llama_config(model.cfg))
    config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def hf_groups(hf: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The optimizer roles of `Transformer.param_groups`, by HF parameter names."""
    groups: dict[str, list[torch.nn.Parameter]] = {"matrix": [], "embedding": [], "norm": []}
    for name, param in hf.named_parameters():
        if "embed_tokens" in name or name.startswith("lm_head"):
            groups["embedding"].append(param)
        elif param.ndim == 2:
            groups["matrix"].append(param)
        else:
            groups["norm"].append(param)
    return groups


def make_optimizer(model, groups, kind: str):
    if kind == "muon":
        return build_optimizer(model, OptimConfig(), groups=groups)
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), foreach=True)


def make_step(loss_fn: Callable, optimizer, autocast: torch.dtype | None = None) -> Callable:
    """A training step around loss_fn(x, y) -> mean cross-entropy."""
    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
            loss = loss_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def time_steps(step: Callable, batches: list, n_steps: int, clock=time.perf_counter) -> float:
    start = clock()
    for i in range(n_steps):
        step(*batches[i % len(batches)])
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=None, help="override n_layer")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast for both models, peak measured in bf16")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--compile-hf", action="store_true",
                        help="also time torch.compile(transformers' model), loss outside")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--cpu-attention", choices=("auto", "true", "false"), default="auto",
                        help="our CPU attention kernel, as `train cpu_attention=` (auto: "
                             "where it builds)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, a contention-proof proxy on a shared "
                             "machine, meaningful with --threads 1 only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    peak_dtype = autocast or torch.float32

    overrides = {"vocab_size": args.vocab, "block_size": max(args.seq, 1)}
    if args.layers:
        overrides["n_layer"] = args.layers
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    ours = Transformer(cfg)
    contenders: dict[str, Callable] = {}
    if not args.no_hf:
        hf = hf_llama(ours)

        def hf_loss(x, y):
            return F.cross_entropy(hf(input_ids=x, use_cache=False).logits.flatten(0, 1),
                                   y.flatten())

        contenders["transformers Llama"] = make_step(
            hf_loss, make_optimizer(hf, hf_groups(hf), args.optimizer), autocast)
        if args.compile_hf:
            hf_twin = hf_llama(ours)
            compiled_hf = torch.compile(hf_twin)

            def compiled_hf_loss(x, y):
                logits = compiled_hf(input_ids=x, use_cache=False).logits
                return F.cross_entropy(logits.flatten(0, 1), y.flatten())

            contenders["transformers, compiled"] = make_step(
                compiled_hf_loss, make_optimizer(hf_twin, hf_groups(hf_twin), args.optimizer),
                autocast)
    # What `mega-trading train` runs: the same accelerator plan (on CPU: our attention
    # kernel where it builds), ModelWithLoss, compiled as one graph with --compile.
    plan = resolve_accel("false", False, torch.device("cpu"), cpu_attention=args.cpu_attention,
                         head_dim=cfg.head_dim)
    print(f"ours: {plan.describe()}")
    apply_accel(ours, plan)
    opt = make_optimizer(ours, ours.param_groups(), args.optimizer)
    contenders["ours (eager)"] = make_step(ModelWithLoss(ours), opt, autocast)
    if args.compile:
        twin = Transformer(cfg)
        twin.load_state_dict(ours.state_dict())
        apply_accel(twin, plan)
        contenders["ours (torch.compile)"] = make_step(
            torch.compile(ModelWithLoss(twin)),
            make_optimizer(twin, twin.param_groups(), args.optimizer), autocast)

    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))

    first_losses = {name: step(*batches[0]) for name, step in contenders.items()}
    print("first-step loss (same weights, same batch):",
          {k: round(v, 6) for k, v in first_losses.items()})
    for name, step in contenders.items():
        start = time.perf_counter()
        time_steps(step, batches, args.warmup)
        print(f"warmup {name}: {time.perf_counter() - start:.1f}s")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    peak_before = matmul_peak_flops(dtype=peak_dtype, clock=clock)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # no contender always goes first
        for name in order:
            seconds[name].append(time_steps(contenders[name], batches, args.steps, clock))
    peak_after = matmul_peak_flops(dtype=peak_dtype, clock=clock)
    peak = max(peak_before, peak_after)
    if min(peak_before, peak_after) < 0.8 * peak:
        print(f"WARNING: matmul peak moved from {peak_before / 1e9:.0f} to "
              f"{peak_after / 1e9:.0f} GFLOP/s during the run: the CPU is shared, rerun")

    tokens_per_step = args.batch * args.seq
    flops_per_token = cfg.flops_per_token(args.seq)
    baseline = "transformers Llama" if "transformers Llama" in seconds else names[0]
    base_tps = tokens_per_step * args.steps / statistics.median(seconds[baseline])
    rows = []
    for name in names:
        tps = tokens_per_step * args.steps / statistics.median(seconds[name])
        # Paired: each round times every contender back to back, so the ratio within a
        # round cancels the machine's slow drifts that the medians above still carry.
        paired = [b / t for b, t in zip(seconds[baseline], seconds[name])]
        rows.append((name, tps, tps / base_tps, tps * flops_per_token / 1e9,
                     tps * flops_per_token / peak, min(paired), max(paired)))

    print(f"\npreset {args.preset} ({cfg.n_params():,} params, {cfg.n_layer} layers, "
          f"d={cfg.d_model}), vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
          f"optimizer {args.optimizer}, {args.dtype}, {args.threads} threads, "
          f"{args.clock} clock, "
          f"torch {torch.__version__}")
    print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s; "
          f"{flops_per_token / 1e6:.2f} MFLOP per token")
    header = (f"{'step':<22}{'tokens/s':>10}{'vs HF':>8}{'rounds':>13}{'GFLOP/s':>10}"
              f"{'of peak':>9}")
    print(header + "\n" + "-" * len(header))
    for name, tps, ratio, gflops, frac, low, high in rows:
        print(f"{name:<22}{tps:>10.0f}{ratio:>7.2f}x{low:>7.2f}-{high:.2f}x{gflops:>10.1f}"
              f"{frac:>8.0%}")
    print("\n| train step | tokens/s | vs transformers | per round | GFLOP/s | of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tps, ratio, gflops, frac, low, high in rows:
        print(f"| {name} | {tps:,.0f} | {ratio:.2f}x | {low:.2f}-{high:.2f}x | {gflops:.1f} "
              f"| {frac:.0%} |")


if __name__ == "__main__":
    main()
