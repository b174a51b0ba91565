"""The training config (typed, bounded), its LR schedule, and how a run's config is
resolved from the CLI, a YAML file and a resumed run's saved config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from mega_trading.core.config import (
    AutoBool,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    config_dataclass,
    load_config,
)
from mega_trading.core.errors import ConfigError, MegaTradingError
from mega_trading.core.lineage import read_json
from mega_trading.model.transformer import ModelConfig

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



def check_block_size(name: str, value: Any, expected: int, expected_name: str) -> None:
    """block_size is one setting per run (prepare's); an explicit other value is an error."""
    if value is not None and int(value) != expected:
        raise ConfigError(f"{name}={value} disagrees with {expected_name}={expected}: "
                          f"block_size is set once, by prepare (prepare.block_size / --block-size)")


