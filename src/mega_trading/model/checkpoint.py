"""Checkpoints: a folder per step, written atomically, loadable without pickle.

Layout (see docs/CONTRACTS.md)::

    RUN/checkpoints/step_000100/model.safetensors   weights (a tied weight stored once)
    RUN/checkpoints/step_000100/optimizer.pt        optimizer state (torch.save, loaded weights_only)
    RUN/checkpoints/step_000100/state.json          step, sampler, RNGs, config, hashes, lineage
    RUN/checkpoints/latest                          name of the newest complete checkpoint

A checkpoint folder is built under a temp name and renamed into place, and `latest` is
rewritten only after that, so a run killed at any instant leaves either the previous or
the new checkpoint, never a half-written one that looks complete.

Model and optimizer state go through `torch.distributed.checkpoint.state_dict`, which
gathers full (unsharded) tensors for FSDP2 and is a plain state dict otherwise; optimizer
state is keyed by parameter name, so a run saved under N ranks resumes under any other N.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mega_trading.core.errors import ArtifactMismatchError, DataError
from mega_trading.core.lineage import (
    atomic_dir,
    git_commit,
    provenance,
    read_json,
    write_text_atomic,
)
from mega_trading.model.transformer import Transformer, config_from_dict

CHECKPOINT_FORMAT = "mega-trading/checkpoint@1"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


# --- RNG states as JSON ------------------------------------------------------------------

def _tensor_to_b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy and Python RNG states in a JSON-safe form."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": _tensor_to_b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_b64_to_tensor(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [_b64_to_tensor(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --- model / optimizer state --------------------------------------------------------------

def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias name: first name} for parameters registered under several names (tied weights)."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return aliases


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """A combined optimizer (e.g. optim.MuonAdamW exposes `.optimizers`) or a plain one."""
    return list(getattr(optimizer, "optimizers", None) or [optimizer])


def _full_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU weights of a plain, DDP-free or FSDP2-sharded model (collective under FSDP:
    every rank calls it; ranks other than 0 may get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def gather_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _optimizers(optimizer),
                                    options=_full_options(cpu_offload=True))


def _model_tensors_for_file(state: dict[str, torch.Tensor],
                            aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Drop tied aliases (safetensors refuses shared storage; the file keeps one copy)."""
    return {name: t.detach().cpu().contiguous() for name, t in state.items() if name not in aliases}


def load_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and tied aliases from model.safetensors (no pickle involved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    aliases = json.loads(metadata.get("tied", "{}"))
    tensors = load_file(str(path))
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    return tensors, aliases


# --- saving ---------------------------------------------------------------------------------

def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Any,
    *,
    sampler_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_hash: str,
    manifest_hash: str,
    keep_last: int = 3,
    extra: dict[str, Any] | None = None,
    rank: int = 0,
) -> Path:
    """Write RUN/checkpoints/step_XXXXXX atomically, point `latest` at it, prune old ones.

    `model` is the bare (possibly FSDP2-sharded) module the optimizer was built on. Under
    torch.distributed every rank must call this (gathering is collective); only rank 0
    writes. Returns the checkpoint folder.
    """
    from safetensors.torch import save_file

    model_state = gather_model_state(model)
    optimizer_state = gather_optimizer_state(model, optimizer)
    target = checkpoints_dir(run_dir) / step_dir_name(step)
    if rank != 0:
        return target
    aliases = tied_aliases(model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "sampler": sampler_state,
        "rng": rng_state(),
        "config": config,
        "tokenizer_hash": tokenizer_hash,
        "manifest_hash": manifest_hash,
        "tied": aliases,
        "git_commit": git_commit(),
        "provenance": provenance(stage="train", step=step),
        **(extra or {}),
    }
    with atomic_dir(target) as tmp:
        save_file(_model_tensors_for_file(model_state, aliases), str(tmp / "model.safetensors"),
                  metadata={"format": CHECKPOINT_FORMAT, "step": str(step),
                            "tied": json.dumps(aliases)})
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str) + "\n")
    write_text_atomic(checkpoints_dir(run_dir) / LATEST, target.name + "\n")
    prune_checkpoints(run_dir, keep_last)
    return target


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoint folders, ascending (temp folders are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    if keep_last <= 0:
        return []
    protected = latest_step(run_dir)
    doomed = [s for s in list_checkpoints(run_dir)[:-keep_last] if s != protected]
    for step in doomed:
        shutil.rmtree(checkpoints_dir(run_dir) / step_dir_name(step), ignore_errors=True)
    return doomed


def latest_step(run_dir: str | Path) -> int | None:
    """The step named by RUN/checkpoints/latest, or None when there is no checkpoint."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    match = _STEP_DIR.match(name)
    if not match:
        raise DataError(f"'latest' names {name!r}, not a checkpoint folder", pointer)
    return int(match.group(1))


# --- loading --------------------------------------------------------------------------------

def checkpoint_path(run_dir: str | Path, step: int | None = None) -> Path:
    """The folder of checkpoint `step` (default: the one `latest` names)."""
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise DataError("no checkpoint in this run (RUN/checkpoints/latest is missing)",
                            run_dir)
    path = checkpoints_dir(run_dir) / step_dir_name(step)
    if not (path / "state.json").is_file():
        available = ", ".join(map(str, list_checkpoints(run_dir))) or "none"
        raise DataError(f"no checkpoint at step {step} (available: {available})", run_dir)
    return path


def read_state(run_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    return read_json(checkpoint_path(run_dir, step) / "state.json")


def check_hashes(state: dict[str, Any], where: Path, expect_tokenizer_hash: str | None,
                 expect_manifest_hash: str | None) -> None:
    """Refuse a checkpoint made with another tokenizer or another prepared data set."""
    checks = (("tokenizer", "tokenizer_hash", expect_tokenizer_hash),
              ("data manifest", "manifest_hash", expect_manifest_hash))
    for what, key, expected in checks:
        if expected is not None and state.get(key) != expected:
            raise ArtifactMismatchError(
                f"{where} was trained with {what} {state.get(key)}, but {expected} was given; "
                f"token ids would mean different things. Use the run's own data or retrain.")


def _model_config(state: dict[str, Any]):

    return config_from_dict(state["config"]["model"])


def load_model(run_dir: str | Path, step: int | None = None,
               expect_tokenizer_hash: str | None = None,
               expect_manifest_hash: str | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint state) from a run folder; weights load without pickle."""

    path = checkpoint_path(run_dir, step)
    state = read_json(path / "state.json")
    check_hashes(state, path, expect_tokenizer_hash, expect_manifest_hash)
    model = Transformer(_model_config(state))
    tensors, _ = load_weights_file(path / "model.safetensors")
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), state


def load_checkpoint(run_dir: str | Path, model: nn.Module, optimizer: Any,
                    step: int | None = None, expect_tokenizer_hash: str | None = None,
                    expect_manifest_hash: str | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer state and RNGs in place (for resume); return the state,
    whose `sampler` entry the caller hands to `WindowSampler.load_state_dict`.

    `model` is the bare (possibly FSDP2-sharded) module the optimizer was built on; under
    torch.distributed every rank calls this with the same folder.
    """
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = checkpoint_path(run_dir, step)
    state = read_json(path / "state.json")
    check_hashes(state, path, expect_tokenizer_hash, expect_manifest_hash)
    tensors, _ = load_weights_file(path / "model.safetensors")
    set_model_state_dict(model, tensors, options=_full_options())
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, _optimizers(optimizer), optimizer_state,
                             options=_full_options())
    if restore_rng:
        set_rng_state(state["rng"])
    return state

