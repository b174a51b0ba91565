"""Training: seeded random windows over every symbol -> Llama-style decoder, Muon + AdamW.

`train(data_dir, out_dir, cfg)` runs alone or under `torchrun` (see distributed.py) and
writes the run folder described in docs/CONTRACTS.md: config.json, tokenizer.json,
metrics.jsonl, checkpoints/ and (unless tracking is 'none') an MLflow SQLite store.

A run resumes exactly: a checkpoint holds weights, optimizer state, the window sampler's
RNG and every global RNG, the LR schedule is a pure function of the step, and validation
uses a fixed set of windows, so a resumed run logs the same loss at every later step as a
run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from mega_trading.core.config import (
    AutoBool,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    config_dataclass,
    load_config,
    to_dict,
)
from mega_trading.core.errors import ConfigError, MegaTradingError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic
from mega_trading.train.optim import _unwrap

VALIDATION_SEED_OFFSET = 1_000_003  # validation windows never share the training RNG stream

# Settings that may change when a run is resumed: they do not alter the trajectory of the
# weights (steps extends or shortens the run; the cosine schedule follows the new total).
RESUMABLE_CHANGES = ("steps", "log_every", "eval_every", "eval_batches", "ckpt_every",
                     "keep_last", "tracking", "compile", "fsdp", "peak_flops", "liger",
                     "activation_checkpointing", "cpu_attention")


class NonFiniteLossError(MegaTradingError):
    """The loss or gradient norm became NaN/inf: training stopped before the bad update."""


@config_dataclass
class TrainConfig:
    preset: str = "micro"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides on the preset
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 32  # windows per micro-batch, over all ranks together
    grad_accum: PositiveInt = 1
    # None: the data's (prepare.block_size, recorded in the manifest). It is ONE setting
    # per run: a value here (or in model.block_size) that disagrees with the data's is an error.
    block_size: Annotated[int, Field(ge=2)] | None = None
    lr: float = 3e-3  # AdamW (embeddings, head, norm gains)
    muon_lr: float = 0.02  # Muon (hidden matrices)
    # Newton-Schulz precision; auto: bf16 on CUDA and on CPUs that multiply bf16 natively
    muon_ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    weight_decay: float = 0.0
    warmup_steps: NonNegativeInt = 50
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # cosine floor, as a fraction of the peak
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping (the norm is still logged)
    eval_every: NonNegativeInt = 100  # 0 disables periodic validation (the final one still runs)
    eval_batches: PositiveInt = 8
    log_every: PositiveInt = 10
    ckpt_every: NonNegativeInt = 500  # a checkpoint is also written at the end
    # > 0: stop after this many validations without a new best validation loss, and keep
    # the best checkpoint as `latest` (checkpoints are then written at each new best only)
    early_stop_patience: NonNegativeInt = 0
    early_stop_min_delta: NonNegativeFloat = 0.0  # an improvement smaller than this is not one
    keep_last: NonNegativeInt = 3
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA
    compile: AutoBool = "auto"  # auto: torch.compile on CUDA only
    fsdp: AutoBool = "auto"  # auto: FSDP2 for large models on several GPUs, else DDP
    liger: AutoBool = "auto"  # auto: Liger-Kernel fused ops on CUDA when installed (accel.py)
    cpu_attention: AutoBool = "auto"  # auto: our causal-attention kernel on CPU if it builds
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    tracking: Literal["mlflow", "none"] = "mlflow"
    peak_flops: float | None = None  # per device, for MFU; default: table (CUDA) / measured (CPU)

    @field_validator("model")
    @classmethod
    def _check_model_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        from mega_trading.model.transformer import ModelConfig

        names = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
        if "vocab_size" in overrides:
            raise ValueError("vocab_size comes from the data's tokenizer; do not set it")
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join('model.' + k for k in unknown)}; "
                              f"valid keys: {', '.join('model.' + n for n in sorted(names))}")
        return dict(overrides)  # a private copy: a frozen config must not change with the caller's dict


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup to 1, then a cosine
    decay to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


# --- config resolution (CLI) -------------------------------------------------------------------

def resume_base(out_dir: str | Path, resume: bool = False,
                data_dir: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """With --resume: the run's saved training config (what later layers change) and its
    data directory (unless one is given); else nothing."""
    saved_path = Path(out_dir) / "config.json"
    if not (resume and saved_path.is_file()):
        return {}, Path(data_dir) if data_dir is not None else None
    saved = read_json(saved_path)
    data_dir = data_dir or saved.get("data_dir")
    return saved["train"], Path(data_dir) if data_dir is not None else None


def resolve_config(out_dir: str | Path, resume: bool = False, config_file: str | Path | None = None,
                   flags: Mapping[str, Any] | None = None, overrides: list[str] | None = None,
                   data_dir: str | Path | None = None) -> tuple[TrainConfig, Path]:
    """Build the TrainConfig for `mega-trading train` and find the data directory.

    Layers, later wins: defaults (or, with --resume, the run's saved config) < YAML file <
    flags given on the command line < `key=value` overrides.
    """
    base, data_dir = resume_base(out_dir, resume, data_dir)
    cfg = load_config(TrainConfig, config_file, overrides or [], base=base, flags=flags)
    return cfg, require_data_dir(data_dir)


def require_data_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise ConfigError("no data directory: pass --data DIR (the output of `mega-trading prepare`)")
    return data_dir


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


# --- pieces of the loop --------------------------------------------------------------------------

def compute_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 lm_head: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a batch of windows.

    With `lm_head` (the bare model's output weight) the model stops at its final hidden
    states and head + loss run as one fused op (accel.fused_linear_cross_entropy: Liger's
    kernel on CUDA never materializes the [B, T, V] logits).
    """
    if lm_head is not None:
        from mega_trading.train.accel import fused_linear_cross_entropy

        return fused_linear_cross_entropy(model(x, return_hidden=True), lm_head, y)
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class ModelWithLoss(torch.nn.Module):
    """`compute_loss` as a module, (x, y) -> mean cross-entropy, so that `torch.compile`
    takes model, output head and loss as ONE graph: the head's log-softmax and the loss
    then fuse with the model's ops, forward and backward (on CPU the step runs ~1.15x
    faster than with the model compiled alone; bench/train.py)."""

    def __init__(self, model: torch.nn.Module, fused_head: bool = False):
        super().__init__()
        self.model, self.fused_head = model, fused_head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lm_head = _unwrap(self.model).output.weight if self.fused_head else None
        return compute_loss(self.model, x, y, lm_head)


def _loss_module(raw: torch.nn.Module, wrapped: torch.nn.Module, compiled: bool,
                 fused_head: bool) -> torch.nn.Module:
    """What a training step calls. One process: model and loss compiled together. Under
    DDP/FSDP the wrapper itself is compiled (that is what lets Dynamo split the graph at
    gradient buckets) and the loss stays outside."""
    if not compiled:
        return ModelWithLoss(wrapped, fused_head)
    if wrapped is raw:
        return torch.compile(ModelWithLoss(raw, fused_head))
    return ModelWithLoss(torch.compile(wrapped), fused_head)


def _amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "bfloat16" or (setting == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                          enabled=amp_dtype is not None)


def _want_compile(setting: str | bool, device: torch.device) -> bool:
    return setting in (True, "true") or (setting == "auto" and device.type == "cuda")


def check_block_size(name: str, value: Any, expected: int, expected_name: str) -> None:
    """block_size is one setting per run (prepare's); an explicit other value is an error."""
    if value is not None and int(value) != expected:
        raise ConfigError(f"{name}={value} disagrees with {expected_name}={expected}: "
                          f"block_size is set once, by prepare (prepare.block_size / --block-size)")


def _model_config(cfg: TrainConfig, shards, log: Callable[[str], None]):
    from mega_trading.model.transformer import PRESETS, ModelConfig

    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{cfg.preset}'; choose one of {sorted(PRESETS)}")
    wanted = shards.block_size  # the data's: prepare.block_size is the one setting
    for name, value in (("train.block_size", cfg.block_size),
                        ("train.model.block_size", cfg.model.get("block_size"))):
        check_block_size(name, value, wanted, f"the data's block_size ({shards.root})")
    longest = max((shards.n_tokens("train", s) for s in shards.symbols("train")), default=0)
    block = min(wanted, longest - 1)
    if block < 2:
        raise ConfigError(f"the train split holds at most {longest} tokens per shard: too "
                          f"little to train on; prepare more data")
    if block < wanted:
        log(f"block_size capped at {block} (the longest train shard has {longest} tokens)")
    return ModelConfig.from_preset(cfg.preset, **{**cfg.model, "block_size": block,
                                                  "vocab_size": shards.vocab_size})


def _validation_batches(shards, block: int, batch: int, cfg: TrainConfig, ctx, log) -> list:
    """A fixed, seeded set of validation windows, scored identically at every evaluation."""
    from mega_trading.core.errors import DataError
    from mega_trading.data.windows import WindowSampler

    try:
        sampler = WindowSampler(shards, "validation", block, batch,
                                seed=cfg.seed + VALIDATION_SEED_OFFSET,
                                rank=ctx.rank, world_size=ctx.world_size)
    except DataError as exc:
        log(f"validation disabled: {exc}")
        return []
    return [sampler.next_batch()[:2] for _ in range(cfg.eval_batches)]


@torch.no_grad()
def evaluate(loss_module, batches, device, amp_dtype, ctx) -> float | None:
    """Mean validation loss; `loss_module(x, y)` is a `ModelWithLoss` (maybe compiled)."""
    from mega_trading.train.distributed import mean_across_ranks

    if not batches:
        return None
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batches:
        with _autocast(device, amp_dtype):
            total += loss_module(x.to(device), y.to(device)).double()
    loss_module.train(was_training)
    return mean_across_ranks([total.item() / len(batches)], ctx)[0]


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per logged step (rank 0 writes)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (a killed run may also have left a torn last line)."""
        if not self.enabled or not self.path.is_file():
            return
        from mega_trading.core.lineage import write_text_atomic

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


def _check_finite(loss: float, grad_norm: float, step: int, cfg: TrainConfig,
                  run_dir: Path) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    from mega_trading.model.checkpoint import latest_step

    last = latest_step(run_dir)
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    scale = lr_scale(step - 1, cfg)
    raise NonFiniteLossError(
        f"training diverged at step {step}: {what} (lr {cfg.lr * scale:.3g}, muon_lr "
        f"{cfg.muon_lr * scale:.3g}); the update was not applied. Lower lr / muon_lr or raise "
        f"warmup_steps; last checkpoint: {f'step {last}' if last is not None else 'none'}")


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    current = to_dict(cfg)
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and current[k] != saved.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume with a different config ({details}); resume with the "
                          f"run's own settings or start a new --out")


def _progress(enabled: bool):
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


def _default_log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message)


# --- the loop ----------------------------------------------------------------------------------

def train(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False, *,
          show_progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on a prepared data directory; write RUN = `out_dir`; return a summary dict.

    Under torchrun every rank calls this; rank 0 writes files and logs; every rank returns
    the summary. `log` receives the human-readable lines (default: stderr).
    """
    from mega_trading.train.distributed import init_distributed, shutdown

    ctx = init_distributed(cfg.device)
    try:
        session = _Session.start(Path(data_dir), Path(out_dir), cfg, resume, ctx,
                                 log or _default_log)
        summary = session.run(show_progress)
    except BaseException:
        # No barrier on the way out: a failing peer might never reach it.
        if ctx.is_distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    shutdown(ctx)
    return summary


@dataclass
class _Session:
    """Everything one training run holds: data, model (bare / wrapped / compiled), optimizer,
    samplers, outputs. Built by `start`, driven by `run`."""

    cfg: TrainConfig
    ctx: Any  # distributed.DistContext
    run_dir: Path
    shards: Any  # dataset.ShardSet
    model_cfg: Any  # model.ModelConfig
    derived: dict[str, Any]
    raw: torch.nn.Module  # the bare (maybe FSDP2-sharded) model: optimizer and checkpoints
    wrapped: torch.nn.Module  # DDP wrapper or `raw`: owns gradient sync
    loss: torch.nn.Module  # what a step calls: (x, y) -> loss (`_loss_module`)
    optimizer: Any
    sampler: Any  # dataset.WindowSampler over the train split
    val_batches: list
    amp_dtype: torch.dtype | None
    peak: float | None
    run_config: dict[str, Any]
    metrics: MetricsLog
    log: Callable[[str], None]
    start_step: int = 0
    tracker: Any = None
    accel: Any = None  # accel.AccelPlan: Liger, fused CE, activation checkpointing, pinning

    @classmethod
    def start(cls, data_dir: Path, run_dir: Path, cfg: TrainConfig, resume: bool, ctx,
              log_any: Callable[[str], None]) -> _Session:
        from mega_trading.data.shards import ShardSet
        from mega_trading.data.windows import WindowSampler
        from mega_trading.model.checkpoint import latest_step, list_checkpoints
        from mega_trading.model.transformer import Transformer
        from mega_trading.train.accel import apply_accel, resolve_accel
        from mega_trading.train.distributed import use_fsdp, wrap_model
        from mega_trading.train.optim import OptimConfig, build_optimizer

        def log(message: str) -> None:
            if ctx.is_main:
                log_any(message)

        shards = ShardSet.open(data_dir)
        if cfg.batch_size % ctx.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the "
                              f"{ctx.world_size} ranks")
        resume_step = latest_step(run_dir) if resume else None
        if resume and resume_step is None:
            log(f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
        if not resume and list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue "
                              f"that run or choose a new --out")
        if resume_step is not None:
            _check_resumable(cfg, read_json(run_dir / "config.json")["train"])

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model_cfg = _model_config(cfg, shards, log)
        train_tokens = sum(shards.n_tokens("train", s) for s in shards.symbols("train"))
        derived = derived_numbers(model_cfg, cfg, train_tokens)
        device = ctx.device
        amp_dtype = _amp_dtype(cfg.dtype, device)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        raw = Transformer(model_cfg).to(device)
        fsdp = use_fsdp(cfg.fsdp, ctx, derived["n_params"])
        accel = resolve_accel(cfg.liger, cfg.activation_checkpointing, device, fsdp,
                              cpu_attention=cfg.cpu_attention, head_dim=model_cfg.head_dim)
        apply_accel(raw, accel)  # module swaps come before wrapping and compiling
        wrapped = wrap_model(raw, ctx, fsdp)
        compiled = _want_compile(cfg.compile, device)
        optimizer = build_optimizer(raw, OptimConfig(muon_lr=cfg.muon_lr, adamw_lr=cfg.lr,
                                                     muon_ns_dtype=cfg.muon_ns_dtype,
                                                     weight_decay=cfg.weight_decay))
        per_rank = cfg.batch_size // ctx.world_size
        block = model_cfg.block_size
        sampler = WindowSampler(shards, "train", block, per_rank, seed=cfg.seed,
                                rank=ctx.rank, world_size=ctx.world_size)
        peak, peak_source = peak_flops(device, amp_dtype, cfg.peak_flops)
        run_config = {"train": to_dict(cfg), "model": to_dict(model_cfg),
                      "data_dir": str(data_dir.resolve()), "tokenizer_hash": shards.tokenizer_hash,
                      "manifest_hash": shards.manifest_hash, "world_size": ctx.world_size,
                      "derived": derived}
        session = cls(cfg=cfg, ctx=ctx, run_dir=run_dir, shards=shards, model_cfg=model_cfg,
                      derived=derived, raw=raw, wrapped=wrapped,
                      loss=_loss_module(raw, wrapped, compiled, accel.fused_cross_entropy),
                      optimizer=optimizer, sampler=sampler,
                      val_batches=_validation_batches(shards, block, per_rank, cfg, ctx, log),
                      amp_dtype=amp_dtype, peak=peak, run_config=run_config,
                      metrics=MetricsLog(run_dir / "metrics.jsonl", ctx.is_main), log=log,
                      accel=accel)
        if resume_step is not None:
            session.restore(resume_step)
        session.open_outputs()

        session.announce("FSDP2" if fsdp else ("DDP" if ctx.is_distributed else "single process"),
                         compiled, peak_source)
        return session

    def announce(self, mode: str, compiled: bool, peak_source: str) -> None:
        """Print what is being trained, on what budget, on which hardware."""
        cfg, derived, peak = self.cfg, self.derived, self.peak
        block = self.model_cfg.block_size
        overrides = f" + {cfg.model}" if cfg.model else ""
        self.log(f"model: preset {cfg.preset}{overrides}, {derived['n_params']:,} parameters "
                 f"({derived['n_params_hidden']:,} without embeddings), block {block}, "
                 f"vocab {self.model_cfg.vocab_size}")
        self.log(f"budget: {derived['tokens_per_step']:,} tokens/step (batch {cfg.batch_size} x "
                 f"accum {cfg.grad_accum} x block {block}), {derived['flops_per_token']:,} "
                 f"FLOPs/token, {derived['total_tokens']:,} tokens in {cfg.steps} steps = "
                 f"{derived['epochs']:.2f} epochs of the train split "
                 f"({derived['train_split_tokens']:,} tokens)")
        self.log(f"hardware: {mode} x{self.ctx.world_size} on {self.ctx.device}, "
                 f"{'bf16 autocast' if self.amp_dtype else 'float32'}, "
                 f"compile {'on' if compiled else 'off'}, "
                 f"peak {f'{peak:.3g} FLOP/s' if peak else 'unknown'} ({peak_source})")
        if self.accel is not None:
            self.log(f"accelerators: {self.accel.describe()}")
        if self.start_step:
            self.log(f"resumed from checkpoint step {self.start_step}")

    def restore(self, step: int) -> None:
        from mega_trading.model.checkpoint import load_checkpoint

        state = load_checkpoint(self.run_dir, self.raw, self.optimizer, step=step,
                                expect_tokenizer_hash=self.shards.tokenizer_hash,
                                expect_manifest_hash=self.shards.manifest_hash)
        self.sampler.load_state_dict(state["sampler"])
        self.start_step = int(state["step"])

    def open_outputs(self) -> None:
        """Rank 0: config.json + tokenizer copy (new run), metrics file, tracker."""
        from mega_trading.train.tracking import Tracker, open_tracker

        self.tracker = Tracker()
        if not self.ctx.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fresh = self.start_step == 0
        if fresh:
            write_json_atomic(self.run_dir / "config.json",
                              {**self.run_config, "provenance": provenance(stage="train")})
            shutil.copyfile(self.shards.root / "tokenizer.json", self.run_dir / "tokenizer.json")
        # A resumed run replays the steps after its checkpoint: drop their old records (and
        # every record of an earlier attempt that never reached a checkpoint).
        self.metrics.truncate_after(self.start_step if not fresh else -1)
        self.tracker = open_tracker(self.cfg.tracking, self.run_dir, resume=not fresh)
        if fresh:
            self.tracker.log_params(self.run_config)
            self.tracker.log_artifact(self.run_dir / "config.json")
            self.tracker.log_artifact(self.run_dir / "tokenizer.json")

    def record(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])

    def evaluate(self) -> float | None:
        return evaluate(self.loss, self.val_batches, self.ctx.device, self.amp_dtype, self.ctx)

    def save(self, step: int) -> None:
        from mega_trading.model.checkpoint import save_checkpoint
        from mega_trading.train.distributed import barrier

        save_checkpoint(self.run_dir, step, self.raw, self.optimizer,
                        sampler_state=self.sampler.state_dict(), config=self.run_config,
                        tokenizer_hash=self.shards.tokenizer_hash,
                        manifest_hash=self.shards.manifest_hash, keep_last=self.cfg.keep_last,
                        extra={"world_size": self.ctx.world_size}, rank=self.ctx.rank)
        barrier(self.ctx)  # nobody runs ahead of (or reads) a checkpoint being written

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (all micro-batches); returns (mean loss, gradient norm)."""
        from mega_trading.train.accel import AccelPlan, to_device
        from mega_trading.train.distributed import gradient_sync, mean_across_ranks

        cfg, device = self.cfg, self.ctx.device
        accel = self.accel or AccelPlan()
        pin = accel.pin_memory
        self.optimizer.set_lr_scale(lr_scale(step - 1, cfg))
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y, _ = self.sampler.next_batch()
            x, y = to_device(x, device, pin), to_device(y, device, pin)
            with gradient_sync(self.wrapped, enabled=micro == cfg.grad_accum - 1):
                with _autocast(device, self.amp_dtype):
                    loss = self.loss(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = mean_across_ranks(
            [loss_sum.item() / cfg.grad_accum, grad_norm.item()], self.ctx)
        _check_finite(loss_value, norm_value, step, cfg, self.run_dir)  # before the update
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value

    def run(self, show_progress: bool) -> dict[str, Any]:
        status = "FAILED"
        try:
            if self.start_step == 0 and self.cfg.eval_every and self.val_batches:
                first = self.evaluate()
                self.record({"step": 0, "val_loss": first})
                self.log(f"step 0: validation loss {first:.4f}")
            last = self._loop(show_progress)
            status = "FINISHED"
        finally:
            self.tracker.finish(status)
        summary = self.summary(last)
        if self.ctx.is_main:
            write_json_atomic(self.run_dir / "train_summary.json", summary)
            self.tracker.log_artifact(self.run_dir / "train_summary.json")
            self.tracker.log_artifact(self.run_dir / "metrics.jsonl")
            seen = ", ".join(f"{s} {n:,}" for s, n in summary["windows_seen"].items())
            self.log(f"windows seen per symbol: {seen}")
        return summary

    def _loop(self, show_progress: bool) -> dict[str, Any]:
        """Optimizer steps start_step+1 .. steps; returns the last logged record."""
        cfg = self.cfg
        last: dict[str, Any] = {}
        interval_time, interval_steps, run_time = 0.0, 0, 0.0
        early = cfg.early_stop_patience > 0 and bool(self.val_batches)
        if early and not cfg.eval_every:
            raise ConfigError("early_stop_patience needs eval_every > 0 (validations to count)")
        best_val, stale = float("inf"), 0
        self.best: dict[str, Any] = {"step": None, "val_loss": None}
        self.stopped_at: int | None = None
        self.loss.train()
        with _progress(show_progress and self.ctx.is_main) as progress:
            task = progress.add_task("train", total=cfg.steps, completed=self.start_step,
                                     loss=float("nan"), tok_s=0.0)
            for step in range(self.start_step + 1, cfg.steps + 1):
                began = time.perf_counter()
                loss, grad_norm = self.optimizer_step(step)
                elapsed = time.perf_counter() - began
                interval_time, interval_steps = interval_time + elapsed, interval_steps + 1
                run_time += elapsed
                final = step == cfg.steps
                evaluate_now = bool(self.val_batches) and (
                    final or bool(cfg.eval_every and step % cfg.eval_every == 0))
                if step % cfg.log_every == 0 or final or evaluate_now:
                    tok_s = self.derived["tokens_per_step"] * interval_steps / max(interval_time, 1e-9)
                    last = self._log_step(step, loss, grad_norm, tok_s, run_time, evaluate_now)
                    interval_time, interval_steps = 0.0, 0
                    progress.update(task, loss=loss, tok_s=tok_s)
                progress.update(task, completed=step)
                if early:
                    if evaluate_now and last.get("val_loss") is not None:
                        if last["val_loss"] < best_val - cfg.early_stop_min_delta:
                            best_val, stale = last["val_loss"], 0
                            self.best = {"step": step, "val_loss": best_val}
                            self.save(step)  # `latest` always names the best so far
                        else:
                            stale += 1
                    if stale >= cfg.early_stop_patience:
                        self.stopped_at = step
                        self.log(f"early stop at step {step}: no better validation loss in "
                                 f"{stale} evaluations; keeping step {self.best['step']} "
                                 f"(val {self.best['val_loss']:.4f})")
                        break
                elif final or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                    self.save(step)
        return last

    def _log_step(self, step: int, loss: float, grad_norm: float, tok_s: float, run_time: float,
                  with_validation: bool) -> dict[str, Any]:
        scale = lr_scale(step - 1, self.cfg)
        record = {"step": step, "loss": loss, "lr": self.cfg.lr * scale,
                  "muon_lr": self.cfg.muon_lr * scale, "grad_norm": grad_norm,
                  "tokens": step * self.derived["tokens_per_step"], "tok_per_s": tok_s,
                  "train_time_s": run_time}
        if self.peak:
            # Global tokens/s over the peak of all devices together.
            record["mfu"] = self.derived["flops_per_token"] * tok_s / (self.peak * self.ctx.world_size)
        if with_validation:
            record["val_loss"] = self.evaluate()
        self.record(record)
        return record

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        from mega_trading.model.checkpoint import latest_step

        records = self.metrics.records() if self.ctx.is_main else []
        val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        timed = [r["tok_per_s"] for r in records if "tok_per_s" in r]
        return {
            "run_dir": str(self.run_dir),
            "steps": self.cfg.steps,
            "resumed_from": self.start_step or None,
            "loss": last.get("loss"),
            "val_loss": val[-1] if val else last.get("val_loss"),
            "initial_val_loss": val[0] if val else None,
            "tokens_seen": self.cfg.steps * self.derived["tokens_per_step"],
            "tok_per_s": last.get("tok_per_s"),
            "mean_tok_per_s": sum(timed) / len(timed) if timed else None,
            "mfu": last.get("mfu"),
            "windows_seen": dict(sorted(self.sampler.seen.items())),
            "checkpoint_step": latest_step(self.run_dir),
            "early_stop": ({"patience": self.cfg.early_stop_patience, "stopped_at": self.stopped_at,
                            "best": self.best} if self.cfg.early_stop_patience else None),
            "world_size": self.ctx.world_size,
            "derived": self.derived,
        }
