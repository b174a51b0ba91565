"""What a run reports while it trains: derived numbers printed at start (parameters,
tokens per step, peak FLOP/s of the device for MFU), the metrics log (metrics.jsonl), and
the progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mega_trading.core.lineage import write_text_atomic
from mega_trading.train.config import TrainConfig

# --- derived numbers ---------------------------------------------------------------------------

# Dense (no sparsity) peak FLOP/s per GPU: bf16 tensor cores, and TF32 for float32 matmuls.
CUDA_PEAK_FLOPS = {  # name fragment -> (bf16, tf32)
    "H200": (989.4e12, 494.7e12),
    "H100 PCIe": (756.0e12, 378.0e12),
    "H100": (989.4e12, 494.7e12),
    "A100": (312.0e12, 156.0e12),
}
_measured_cpu_flops: dict[str, float] = {}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bf16"}


def measure_cpu_flops(size: int = 1024, reps: int = 3,
                      dtype: torch.dtype = torch.float32) -> float:
    """Best matmul FLOP/s on this CPU in `dtype` with torch's current thread count (large,
    regular matmuls: about the most a training step could reach). Under bf16 autocast the
    step's matmuls run in bf16, which CPUs with AVX512-BF16 or AMX do 2x or more faster
    than float32, so utilization is measured against the bf16 peak there."""
    key = f"{size}:{torch.get_num_threads()}:{dtype}"
    if key not in _measured_cpu_flops:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm up
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        _measured_cpu_flops[key] = 2 * size**3 / best
    return _measured_cpu_flops[key]


def peak_flops(device: torch.device, amp_dtype: torch.dtype | None,
               override: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override:
        return override, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, tf32) in CUDA_PEAK_FLOPS.items():
            if fragment in name:
                return (bf16 if amp_dtype == torch.bfloat16 else tf32), f"{name} datasheet"
        return None, f"{name}: no peak in the table (set peak_flops)"
    # Generator is torch's: measuring must not move the global RNG a resumed run restores.
    state = torch.get_rng_state()
    try:
        dtype = amp_dtype or torch.float32
        return measure_cpu_flops(dtype=dtype), f"measured {_DTYPE_NAMES[dtype]} matmul"
    finally:
        torch.set_rng_state(state)


def derived_numbers(model_cfg, cfg: TrainConfig, train_tokens: int) -> dict[str, Any]:
    """Parameter count and the per-step / per-run token and FLOP budget."""
    info = model_cfg.describe()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size
    flops_per_token = model_cfg.flops_per_token(model_cfg.block_size)
    total_tokens = tokens_per_step * cfg.steps
    return {
        "n_params": info["n_params"],
        "n_params_hidden": info["n_params_hidden"],
        "block_size": model_cfg.block_size,
        "vocab_size": model_cfg.vocab_size,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token,
        "total_tokens": total_tokens,
        "total_flops": flops_per_token * total_tokens,
        "train_split_tokens": train_tokens,
        "epochs": total_tokens / max(train_tokens, 1),
    }



class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per logged step (rank 0 writes)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (a killed run may also have left a torn last line)."""
        if not self.enabled or not self.path.is_file():
            return

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]



def progress_bar(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("{task.fields[tok_s]:,.0f} tok/s"), TimeRemainingColumn(),
                    disable=not enabled)


def default_log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message)


