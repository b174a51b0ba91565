"""Benchmark: the CUDA training step, plain eager bf16 beside torch.compile, Liger-Kernel
and both, for the `base` and `small` presets, in one run on one GPU.

A step is what `train.py` does per optimizer step on one device: pinned non-blocking batch
copy, bf16 autocast forward, loss (`train.compute_loss`; with Liger, the fused linear
cross-entropy from `accel.py`), backward, gradient clipping, Muon + fused AdamW step. Every
toggle of a preset starts from the same weights and sees the same batches, so the loss after
the last step is comparable across toggles. Warmup steps (which include torch.compile's
compilation) are timed separately and excluded from tokens/s.

    .venv/bin/python bench/gpu.py                          # base + small, 4 toggles each
    .venv/bin/python bench/gpu.py --presets base --steps 30
    .venv/bin/python bench/gpu.py --data DATA_DIR          # windows of a prepared data dir
    .venv/bin/python bench/gpu.py --dry-run                # CPU: 2 steps of a tiny model

On a machine without the package installed, run it from the repository root with
`PYTHONPATH=src python3 bench/gpu.py ...`: it needs only torch, numpy and pyyaml (plus
liger-kernel for the liger toggles, and polars for `--data`). The defaults (base + small,
4 toggles, 5 warmup + 20 timed steps of 32 x 512 tokens) are sized for one H100 in about
5 minutes, most of it torch.compile; `--budget-s` stops starting new toggles after that.

MFU = model FLOPs per token (`ModelConfig.flops_per_token`: 6N + causal attention) x tokens/s
over the device's dense bf16 peak (table `train.CUDA_PEAK_FLOPS`, keyed by device name;
`--peak-tflops` overrides). Muon's Newton-Schulz work is not counted in the numerator.
Peak memory is `torch.cuda.max_memory_allocated` over the whole run of one toggle (model,
optimizer state, activations, compilation). Without CUDA the script refuses, except with
`--dry-run`, which runs the same code on CPU (float32, PyTorch reference kernels standing in
for Liger's, no compile) to prove the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = {  # name -> (torch.compile, liger)
    "eager": (False, False),
    "compile": (True, False),
    "liger": (False, True),
    "compile+liger": (True, True),
}
DRY_RUN_MODEL = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "ffn_hidden": 128}
NEEDS_CUDA = ("bench/gpu.py needs a CUDA device (torch sees none); "
              "use --dry-run to check the script on CPU")


@dataclass
class Result:
    preset: str
    mode: str
    status: str = "ok"  # ok | skipped: why | failed: why
    kernels: str = "-"
    tok_per_s: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    loss: float | None = None
    warmup_s: float | None = None
    timed_s: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="base,small", help="comma-separated presets")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated toggles out of {','.join(MODES)} (default: all; "
                             f"--dry-run: eager,liger)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per toggle")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
    parser.add_argument("--batch", type=int, default=32, help="windows per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per window "
                        "(default: the preset's block_size)")
    parser.add_argument("--vocab", type=int, default=1800, help="random-token vocab size")
    parser.add_argument("--data", type=Path, default=None,
                        help="prepared data dir: train-split windows instead of random tokens")
    parser.add_argument("--optimizer", choices=("muon", "adamw"), default="muon",
                        help="muon: the training recipe (Muon + fused AdamW); adamw: fused "
                             "AdamW on everything")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="checkpoint every block in every toggle")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="override the device's dense bf16 peak (TFLOP/s) for MFU")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no new toggle after this many seconds (the rest are "
                             "reported as skipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, 2 steps: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.steps, args.warmup, args.batch, args.seq = 2, 1, 2, 32
        args.presets = "micro"
        torch.set_num_threads(1)  # a check, not a measurement: never fight for shared cores
    args.explicit_modes = args.modes is not None
    args.modes = args.modes or ",".join(MODES)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps >= 1, --warmup >= 0 and --batch >= 1 are required")
    return args


def model_config(preset: str, vocab: int, seq: int | None, dry_run: bool):
    from mega_trading.model.transformer import PRESETS, ModelConfig

    overrides = dict(DRY_RUN_MODEL) if dry_run else {}
    block = seq or PRESETS[preset]["block_size"]
    return ModelConfig.from_preset(preset, vocab_size=vocab, block_size=block, **overrides)


def make_batches(args, vocab: int, seq: int, shards=None) -> list[tuple[torch.Tensor, ...]]:
    """warmup + steps host batches (x, y), identical for every toggle."""
    count = args.warmup + args.steps
    if shards is not None:
        from mega_trading.data.windows import WindowSampler

        sampler = WindowSampler(shards, "train", seq, args.batch, seed=args.seed)
        return [sampler.next_batch()[:2] for _ in range(count)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (args.batch, seq + 1), generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def make_optimizer(model, kind: str):
    from mega_trading.train.config import TrainConfig
    from mega_trading.train.optim import OptimConfig, build_optimizer

    defaults = TrainConfig()
    if kind == "muon":
        return build_optimizer(model, OptimConfig(muon_lr=defaults.muon_lr, adamw_lr=defaults.lr))
    fused = True if next(model.parameters()).is_cuda else None
    return torch.optim.AdamW(model.parameters(), lr=defaults.lr, betas=(0.9, 0.95), fused=fused)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_toggle(preset: str, model_cfg, mode: str, args, batches, device, amp_dtype, kernels,
               peak) -> Result:
    """Build a fresh model (same seed), apply the toggle, train warmup + steps, measure."""
    from mega_trading.model.transformer import Transformer
    from mega_trading.train.accel import apply_liger, enable_activation_checkpointing, to_device
    from mega_trading.train.loss import autocast_for, compute_loss

    use_compile, use_liger = MODES[mode]
    result = Result(preset=preset, mode=mode,
                    kernels=kernels.name if use_liger else "-")
    torch.manual_seed(args.seed)
    model = Transformer(model_cfg).to(device)
    lm_head = None
    if use_liger:
        apply_liger(model, kernels)
        lm_head = model.output.weight  # fused head + loss
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    forward = torch.compile(model) if use_compile else model
    optimizer = make_optimizer(model, args.optimizer)
    pin = device.type == "cuda"

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = to_device(x, device, pin), to_device(y, device, pin)
        with autocast_for(device, amp_dtype):
            loss = compute_loss(forward, x, y, lm_head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no .item(): the timed loop never waits on the GPU

    began = time.perf_counter()
    for x, y in batches[:args.warmup]:
        step(x, y)
    synchronize(device)
    timed_from = time.perf_counter()
    losses = [step(x, y) for x, y in batches[args.warmup:]]
    synchronize(device)
    ended = time.perf_counter()
    tokens = args.batch * model_cfg.block_size * args.steps
    result.warmup_s, result.timed_s = timed_from - began, ended - timed_from
    result.tok_per_s = tokens / result.timed_s
    result.loss = float(losses[-1])
    if peak:
        result.mfu = model_cfg.flops_per_token(model_cfg.block_size) * result.tok_per_s / peak
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def release(device: torch.device, compiled: bool) -> None:
    """Free one toggle's model, optimizer and compiled graphs before the next one."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_order(presets: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """Uncompiled toggles of every preset first: if compilation eats the time budget, the
    cheap rows are already measured."""
    fast = [(p, m) for m in modes if not MODES[m][0] for p in presets]
    slow = [(p, m) for m in modes if MODES[m][0] for p in presets]
    return fast + slow


def skip_reason(mode: str, args, kernels, liger_error: str | None) -> str | None:
    use_compile, use_liger = MODES[mode]
    if use_compile and args.dry_run and not args.explicit_modes:
        return "skipped: --dry-run does not compile (slow on CPU; name it in --modes to force)"
    if use_liger and kernels is None:
        return f"skipped: liger-kernel not importable ({liger_error})"
    return None


def sdpa_backends(model_cfg, device: torch.device) -> str:
    """Which fused SDPA backends accept this model's attention (bf16, causal, GQA)."""
    if device.type != "cuda":
        return "n/a on CPU"
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    T = min(model_cfg.block_size, 256)
    q = torch.randn(1, model_cfg.n_head, T, model_cfg.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, model_cfg.n_kv_head, T, model_cfg.head_dim, device=device,
                     dtype=torch.bfloat16)
    verdicts = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
            verdicts.append(f"{name} ok")
        except RuntimeError:
            verdicts.append(f"{name} unusable")
    return ", ".join(verdicts)


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown_table(results: list[Result], steps_total: int) -> str:
    eager = {r.preset: r.tok_per_s for r in results if r.mode == "eager" and r.tok_per_s}
    lines = [f"| preset | toggle | kernels | tokens/s | vs eager | MFU | peak mem GiB | "
             f"loss @ step {steps_total} | warmup s | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ratio = (f"{r.tok_per_s / eager[r.preset]:.2f}x"
                 if r.tok_per_s and eager.get(r.preset) else "-")
        lines.append(f"| {r.preset} | {r.mode} | {r.kernels} | {fmt(r.tok_per_s, ',.0f')} | "
                     f"{ratio} | {fmt(r.mfu, '.1%')} | {fmt(r.peak_mem_gib, '.2f')} | "
                     f"{fmt(r.loss, '.4f')} | {fmt(r.warmup_s, '.1f')} | {r.status} |")
    return "\n".join(lines)


def describe_setup(args, device, amp_dtype, peak, peak_source, liger_note, shards) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    data = (f"train windows of {args.data}" if shards is not None
            else f"random tokens, vocab {args.vocab:,}")
    return [
        f"### Training step on {name} (`bench/gpu.py`)",
        "",
        f"torch {torch.__version__}, {'bf16 autocast' if amp_dtype else 'float32'}, "
        f"{liger_note}, optimizer {args.optimizer}, batch {args.batch} windows, "
        f"{args.warmup} warmup + {args.steps} timed steps per toggle, {data}"
        f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
        f"MFU against {fmt(peak, '.1f', 1e-12)} TFLOP/s ({peak_source}).",
    ]


def resolve_kernels(device: torch.device):
    """(kernels for the liger toggles or None, a note for the header, import error)."""
    from mega_trading.train.accel import _liger_import_error, liger_kernels, reference_kernels

    if device.type != "cuda":
        return reference_kernels(), "PyTorch reference kernels for the liger toggles", None
    error = _liger_import_error()
    if error is not None:
        return None, "liger-kernel not installed", error
    from importlib.metadata import PackageNotFoundError, version

    try:
        liger_version = version("liger-kernel")
    except PackageNotFoundError:
        liger_version = "unknown version"
    return liger_kernels(), f"liger-kernel {liger_version}", None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(NEEDS_CUDA, file=sys.stderr)
        return 2
    from mega_trading.train.loss import amp_dtype_for
    from mega_trading.train.metrics import peak_flops

    device = torch.device("cuda") if not args.dry_run else torch.device("cpu")
    amp_dtype = amp_dtype_for("auto", device)  # bf16 on CUDA, float32 on CPU: train's default
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train.py does
    peak, peak_source = peak_flops(device, amp_dtype,
                                   args.peak_tflops * 1e12 if args.peak_tflops else None)
    kernels, liger_note, liger_error = resolve_kernels(device)
    shards = None
    vocab = args.vocab
    if args.data is not None:
        from mega_trading.data.shards import ShardSet

        shards = ShardSet.open(args.data)
        vocab = shards.vocab_size
    presets = args.presets.split(",")
    modes = args.modes.split(",")
    configs = {}
    for preset in presets:
        cfg = model_config(preset, vocab, args.seq, args.dry_run)
        if shards is not None:  # a window never crosses a shard
            longest = max(shards.n_tokens("train", s) for s in shards.symbols("train"))
            cfg = model_config(preset, vocab, min(cfg.block_size, longest - 1), args.dry_run)
        configs[preset] = cfg

    print("\n".join(describe_setup(args, device, amp_dtype, peak, peak_source, liger_note,
                                   shards)), flush=True)
    started = time.perf_counter()
    results: dict[tuple[str, str], Result] = {}
    batches_of: dict[str, list] = {}
    for preset, mode in run_order(presets, modes):
        cfg = configs[preset]
        reason = skip_reason(mode, args, kernels, liger_error)
        if reason is None and time.perf_counter() - started > args.budget_s:
            reason = f"skipped: time budget {args.budget_s:.0f} s spent"
        if reason is not None:
            results[preset, mode] = Result(preset, mode, status=reason)
            continue
        if preset not in batches_of:
            batches_of[preset] = make_batches(args, vocab, cfg.block_size, shards)
        try:
            result = run_toggle(preset, cfg, mode, args, batches_of[preset], device, amp_dtype,
                                kernels, peak)
        except torch.OutOfMemoryError:
            result = Result(preset, mode, status="failed: CUDA out of memory")
        except Exception as exc:  # one toggle failing must not hide the others
            first_line = (str(exc).strip().splitlines() or [""])[0][:160]
            result = Result(preset, mode, status=f"failed: {type(exc).__name__}: {first_line}")
        release(device, compiled=MODES[mode][0])
        results[preset, mode] = result
        print(f"{preset} {mode}: {result.status}, {fmt(result.tok_per_s, ',.0f')} tok/s, "
              f"loss {fmt(result.loss, '.4f')}, warmup {fmt(result.warmup_s, '.1f')} s "
              f"({time.perf_counter() - started:.0f} s elapsed)", file=sys.stderr, flush=True)

    ordered = [results[p, m] for p in presets for m in modes]
    print()
    for preset in presets:
        cfg = configs[preset]
        print(f"- {preset}: {cfg.n_params():,} params, {cfg.n_layer} layers, d {cfg.d_model}, "
              f"block {cfg.block_size}, {cfg.flops_per_token(cfg.block_size) / 1e9:.3g} GFLOP/"
              f"token; SDPA backends: {sdpa_backends(cfg, device)}")
    print()
    print(markdown_table(ordered, args.warmup + args.steps))
    if args.json is not None:
        from dataclasses import asdict

        from mega_trading.core.lineage import provenance, write_json_atomic

        write_json_atomic(args.json, {"setup": describe_setup(args, device, amp_dtype, peak,
                                                              peak_source, liger_note, shards),
                                      "results": [asdict(r) for r in ordered],
                                      "provenance": provenance(stage="bench-gpu")})
    return 1 if any(r.status.startswith("failed") for r in ordered) else 0


if __name__ == "__main__":
    sys.exit(main())
