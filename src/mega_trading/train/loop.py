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

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mega_trading.core.config import (
    to_dict,
)
from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import provenance, read_json, write_json_atomic
from mega_trading.data.shards import ShardSet
from mega_trading.data.windows import WindowSampler
from mega_trading.model.checkpoint import (
    latest_step,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from mega_trading.model.transformer import PRESETS, ModelConfig, Transformer
from mega_trading.train.accel import AccelPlan, apply_accel, resolve_accel, to_device
from mega_trading.train.config import (
    RESUMABLE_CHANGES,
    VALIDATION_SEED_OFFSET,
    NonFiniteLossError,
    TrainConfig,
    check_block_size,
    lr_scale,
)
from mega_trading.train.distributed import (
    DistContext,
    barrier,
    gradient_sync,
    init_distributed,
    mean_across_ranks,
    shutdown,
    use_fsdp,
    wrap_model,
)
from mega_trading.train.loss import (
    amp_dtype_for,
    autocast_for,
    build_loss_module,
    evaluate,
    want_compile,
)
from mega_trading.train.metrics import (
    MetricsLog,
    default_log,
    derived_numbers,
    peak_flops,
    progress_bar,
)
from mega_trading.train.optim import OptimConfig, build_optimizer
from mega_trading.train.tracking import Tracker, open_tracker


def _model_config(cfg: TrainConfig, shards, log: Callable[[str], None]):

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

    try:
        sampler = WindowSampler(shards, "validation", block, batch,
                                seed=cfg.seed + VALIDATION_SEED_OFFSET,
                                rank=ctx.rank, world_size=ctx.world_size)
    except DataError as exc:
        log(f"validation disabled: {exc}")
        return []
    return [sampler.next_batch()[:2] for _ in range(cfg.eval_batches)]


def _check_finite(loss: float, grad_norm: float, step: int, cfg: TrainConfig,
                  run_dir: Path) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return

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


# --- the loop ----------------------------------------------------------------------------------

def train(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False, *,
          show_progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on a prepared data directory; write RUN = `out_dir`; return a summary dict.

    Under torchrun every rank calls this; rank 0 writes files and logs; every rank returns
    the summary. `log` receives the human-readable lines (default: stderr).
    """

    ctx = init_distributed(cfg.device)
    try:
        session = _Session.start(Path(data_dir), Path(out_dir), cfg, resume, ctx,
                                 log or default_log)
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
    ctx: DistContext
    run_dir: Path
    shards: ShardSet
    model_cfg: ModelConfig
    derived: dict[str, Any]
    raw: torch.nn.Module  # the bare (maybe FSDP2-sharded) model: optimizer and checkpoints
    wrapped: torch.nn.Module  # DDP wrapper or `raw`: owns gradient sync
    loss: torch.nn.Module  # what a step calls: (x, y) -> loss (`build_loss_module`)
    optimizer: Any
    sampler: WindowSampler  # over the train split
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
        amp_dtype = amp_dtype_for(cfg.dtype, device)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        raw = Transformer(model_cfg).to(device)
        fsdp = use_fsdp(cfg.fsdp, ctx, derived["n_params"])
        accel = resolve_accel(cfg.liger, cfg.activation_checkpointing, device, fsdp,
                              cpu_attention=cfg.cpu_attention, head_dim=model_cfg.head_dim)
        apply_accel(raw, accel)  # module swaps come before wrapping and compiling
        wrapped = wrap_model(raw, ctx, fsdp)
        compiled = want_compile(cfg.compile, device)
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
                      loss=build_loss_module(raw, wrapped, compiled, accel.fused_cross_entropy),
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

        state = load_checkpoint(self.run_dir, self.raw, self.optimizer, step=step,
                                expect_tokenizer_hash=self.shards.tokenizer_hash,
                                expect_manifest_hash=self.shards.manifest_hash)
        self.sampler.load_state_dict(state["sampler"])
        self.start_step = int(state["step"])

    def open_outputs(self) -> None:
        """Rank 0: config.json + tokenizer copy (new run), metrics file, tracker."""

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

        save_checkpoint(self.run_dir, step, self.raw, self.optimizer,
                        sampler_state=self.sampler.state_dict(), config=self.run_config,
                        tokenizer_hash=self.shards.tokenizer_hash,
                        manifest_hash=self.shards.manifest_hash, keep_last=self.cfg.keep_last,
                        extra={"world_size": self.ctx.world_size}, rank=self.ctx.rank)
        barrier(self.ctx)  # nobody runs ahead of (or reads) a checkpoint being written

    def optimizer_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (all micro-batches); returns (mean loss, gradient norm)."""

        cfg, device = self.cfg, self.ctx.device
        accel = self.accel or AccelPlan()
        pin = accel.pin_memory
        self.optimizer.set_lr_scale(lr_scale(step - 1, cfg))
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y, _ = self.sampler.next_batch()
            x, y = to_device(x, device, pin), to_device(y, device, pin)
            with gradient_sync(self.wrapped, enabled=micro == cfg.grad_accum - 1):
                with autocast_for(device, self.amp_dtype):
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
        with progress_bar(show_progress and self.ctx.is_main) as progress:
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
