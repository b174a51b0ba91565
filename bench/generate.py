"""Benchmark: new tokens/s of our KV-cache sampler, our no-cache path and HF `generate`.

One run, one randomly initialised model (speed does not depend on the weights), the same
prompt batch and the same sampling settings (do_sample, temperature, top_k, top_p, PAD
suppressed) for the three paths:

* ``ours (KV cache)``   mega_trading.generation.generate.generate
* ``ours (no cache)``   mega_trading.generation.generate.generate_nocache, timed on the first
                        ``--nocache-steps`` new tokens only (it recomputes the whole window
                        every step, so it only gets SLOWER as the context grows: the ratio
                        printed is a lower bound of the real one)
* ``no cache, est.``   the whole no-cache run, estimated: one step timed at 5 context
                        lengths from the first step's to the last's, integrated over the run
* ``HF generate``       transformers.LlamaForCausalLM.generate on the folder written by
                        mega_trading.model.export_hf.export_hf (its own DynamicCache)

By default block_size = prompt + new tokens, so no path has to slide its window and HF
stays inside its position range.

    .venv/bin/python bench/generate.py                       # micro preset, 32 x 512 new
    .venv/bin/python bench/generate.py --preset small --new 128 --nocache-steps 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--vocab", type=int, default=1794,
                        help="the bundled sample's tokenizer has 1,794")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new", type=int, default=512, help="new tokens per rollout")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=None, help="default: prompt + new")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--nocache-steps", type=int, default=32)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each cached path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def timed(fn, device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    from mega_trading.generation.generate import (
        SamplingConfig,
        generate,
        generate_nocache,
        special_ids,
    )
    from mega_trading.model.transformer import ModelConfig, Transformer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = args.block_size or args.prompt + args.new
    model = Transformer(ModelConfig.from_preset(args.preset, vocab_size=args.vocab,
                                                block_size=block)).to(args.device).eval()
    pad, _ = special_ids(args.vocab)
    prompt = torch.randint(0, args.vocab - 2, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(1)).to(args.device)
    cfg = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    def seeded() -> torch.Generator:
        return torch.Generator(device=args.device).manual_seed(0)

    results: dict = {"args": vars(args) | {"json": str(args.json)}, "block_size": block,
                     "n_params": model.cfg.n_params(), "torch": torch.__version__}

    def ours():
        out = generate(model, prompt, args.new, cfg, seeded())
        assert out.shape == (args.batch, args.prompt + args.new)

    # the cached paths run --repeat times, interleaved, best time kept: the machine is shared
    runners = {"ours_kv_cache": ours}
    generate(model, prompt, 4, cfg, seeded())  # warm-up
    if not args.no_hf:
        import transformers

        runners["hf_generate"] = hf_runner(model, prompt, args, pad)
        results["transformers"] = transformers.__version__
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(args.repeat):
        for key, run in runners.items():
            times[key].append(timed(run, args.device)[0])
    for key, seconds in times.items():
        results[key] = {"seconds": min(seconds), "all_seconds": seconds,
                        "new_tokens": args.batch * args.new}

    steps = min(args.nocache_steps, args.new)
    seconds, _ = timed(lambda: generate_nocache(model, prompt, steps, cfg, seeded()), args.device)
    results["ours_no_cache"] = {"seconds": seconds, "new_tokens": args.batch * steps}
    results["ours_no_cache_full_estimate"] = nocache_full_run_estimate(model, prompt, cfg, args)

    for key in ("ours_kv_cache", "ours_no_cache", "ours_no_cache_full_estimate", "hf_generate"):
        if key in results:
            r = results[key]
            r["tokens_per_s"] = r["new_tokens"] / r["seconds"]
    ours = results["ours_kv_cache"]["tokens_per_s"]
    results["speedup_vs_no_cache"] = ours / results["ours_no_cache"]["tokens_per_s"]
    results["speedup_vs_no_cache_full_estimate"] = (
        ours / results["ours_no_cache_full_estimate"]["tokens_per_s"])
    if "hf_generate" in results:
        results["speedup_vs_hf"] = ours / results["hf_generate"]["tokens_per_s"]
    report(results, args)
    return results


def nocache_full_run_estimate(model, prompt: torch.Tensor, cfg, args: argparse.Namespace) -> dict:
    """Seconds a whole no-cache run would take: one step (forward over the whole context,
    then sampling) timed at 5 context lengths from the first to the last step, integrated
    over the run with the trapezoid rule (the cost of a step is smooth in its length)."""
    import numpy as np

    from mega_trading.generation.generate import sample

    first, last = args.prompt, args.prompt + args.new - 1
    last = min(last, args.block_size or last)  # rough once the window slides (block < run)
    lengths = np.unique(np.linspace(first, last, 5).round().astype(int))
    context = torch.randint(0, args.vocab - 2, (args.batch, int(lengths[-1])),
                            generator=torch.Generator().manual_seed(2)).to(args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    costs = []
    with torch.inference_mode():
        for length in lengths:
            def step(length: int = int(length)):
                logits = model(context[:, :length])[:, -1]
                return sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)

            costs.append(timed(step, args.device)[0])
    if len(costs) == 1:
        mean_cost = costs[0]
    else:
        mean_cost = np.trapezoid(costs, lengths) / (lengths[-1] - lengths[0])
    return {"seconds": float(mean_cost * args.new), "new_tokens": args.batch * args.new,
            "step_seconds_at_context": dict(zip(map(int, lengths), map(float, costs)))}


def hf_runner(model, prompt: torch.Tensor, args: argparse.Namespace, pad: int):
    """A function running HF generate on our exported model with our sampling settings."""
    import transformers

    from mega_trading.model.export_hf import export_hf

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(model, Path(tmp) / "hf")
        hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf = hf.to(args.device).eval()
    settings = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": args.top_p, "suppress_tokens": [pad], "pad_token_id": pad,
                "eos_token_id": None, "attention_mask": torch.ones_like(prompt)}

    def run(n_new: int = args.new):
        torch.manual_seed(0)
        with torch.inference_mode():
            out = hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, **settings)
        assert out.shape == (args.batch, args.prompt + n_new), out.shape

    run(4)  # warm-up
    return run


def report(results: dict, args: argparse.Namespace) -> None:
    print(f"model {args.preset}: {results['n_params']:,} params, vocab {args.vocab}, "
          f"block {results['block_size']}; batch {args.batch}, prompt {args.prompt}, "
          f"torch threads {args.threads}, device {args.device}")
    print(f"sampling: temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
          f"PAD suppressed")
    print(f"{'path':<18}{'new tokens':>12}{'seconds':>10}{'tokens/s':>12}")
    names = {"ours_kv_cache": "ours (KV cache)", "ours_no_cache": "ours (no cache)",
             "ours_no_cache_full_estimate": "no cache, est.", "hf_generate": "HF generate"}
    for key, name in names.items():
        if key in results:
            r = results[key]
            print(f"{name:<18}{r['new_tokens']:>12,}{r['seconds']:>10.2f}"
                  f"{r['tokens_per_s']:>12,.0f}")
    estimate = results["ours_no_cache_full_estimate"]
    print(f"KV cache vs no cache: {results['speedup_vs_no_cache']:.1f}x on its first "
          f"{min(args.nocache_steps, args.new)} steps (short contexts: a lower bound), "
          f"{results['speedup_vs_no_cache_full_estimate']:.1f}x over the whole run (estimated "
          f"from steps timed at contexts {list(estimate['step_seconds_at_context'])})")
    if "speedup_vs_hf" in results:
        print(f"KV cache vs HF generate: {results['speedup_vs_hf']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
