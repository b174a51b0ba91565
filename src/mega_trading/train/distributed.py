"""Multi-process training under `torchrun`: process group, device, DDP / FSDP2 wrapping.

The same `mega-trading train` command runs alone or under
`torchrun --nproc_per_node=N -m mega_trading.cli train ...`: torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK, and `init_distributed` picks them up (gloo on CPU, NCCL on
CUDA). Each rank draws the same global batch and keeps its own slice (see
`dataset.WindowSampler`), so N ranks follow the same trajectory as one process with the
same global batch. Small models are replicated with DDP; large ones on CUDA are sharded
with FSDP2 (`torch.distributed.fsdp.fully_shard`), one unit per transformer block.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mega_trading.core.errors import ConfigError

# Above this many parameters, replicating weights + optimizer state on every GPU costs
# more memory than sharding costs in communication.
FSDP_MIN_PARAMS = 100_000_000
CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a ConfigError."""
    if kind not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {kind!r}")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_kind: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (or run alone)."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device_kind))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_kind, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                       device=device, backend=backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a barrier: a rank leaving early aborts gloo peers)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def mean_across_ranks(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise mean of a few scalars over all ranks (one collective)."""
    if not ctx.is_distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / ctx.world_size).tolist()


def use_fsdp(setting: str | bool, ctx: DistContext, n_params: int) -> bool:
    """'auto': FSDP2 for large models on several GPUs; True/False force it on/off."""
    if setting in (True, "true"):
        if not ctx.is_distributed:
            raise ConfigError("fsdp=true needs several processes (run under torchrun)")
        return True
    if setting in (False, "false"):
        return False
    return ctx.is_distributed and ctx.device.type == "cuda" and n_params >= FSDP_MIN_PARAMS


def wrap_model(model: nn.Module, ctx: DistContext, fsdp: bool) -> nn.Module:
    """The module to call for forward/backward. FSDP2 shards `model` in place (the optimizer
    and checkpoints keep using `model`); DDP returns a wrapper around it."""
    if not ctx.is_distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # embeddings, tied output head, final norm
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (sync on the last one)."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
