"""Synthetic order flow: sample token rollouts from a trained decoder, decode them to trades.

Decoding runs on THE decoder engine, ``engine.DecodeEngine`` (also used by the rollout
service and the simulator's model source), built on small pure functions around the
model's preallocated KV cache (in the spirit of gpt-fast), all in ``engine.py`` and
re-exported here:

* ``prefill(model, cache, prompt)`` runs a whole context once and fills the cache;
* ``decode_one(model, cache, token, pos)`` feeds one token per rollout (on fused weights:
  ``decode.decode_step``, fetched once per engine);
* ``sampling.sample_next(logits, temperature, top_k, top_p, min_p, generator)`` draws the
  next token (temperature -> top-k -> top-p -> min-p, the order Hugging Face applies them in);
* ``generate`` loops the engine (``start``, ``sample``, ``feed``) over a batch of
  rollouts; ``generate_nocache`` is its uncached reference.

Sliding window. RoPE tables (and the cache) stop at ``cache_len <= block_size`` positions,
so a rollout longer than that cannot keep every token in context. When the cache is full,
``generate`` keeps the newest ``keep`` tokens (default ``cache_len // 2``), re-prefills
them at positions ``0 .. keep-1`` and carries on decoding. Positions therefore never pass
the model's precomputed range, and the context always holds between ``keep`` and
``cache_len`` tokens, just like a training window, which starts at an arbitrary token too.
The cost is one prefill of ``keep`` tokens every ``cache_len - keep`` new tokens.
``generate_nocache`` recomputes the full context window at every step and follows exactly
the same window schedule, so both paths see the same context and give the same logits
(it is the reference for tests and the baseline in ``bench/generate.py``).

Special tokens. By the tokenizer contract the specials follow the event tokens, PAD then
SEG, so for a model of vocabulary V: PAD = V - 2, SEG = V - 1 (``special_ids``). PAD only
ever fills batches, so it is forbidden by default (its logit is set to -inf before
sampling); SEG (a new segment: a hole in the data or a long pause) is allowed by default
and can be forbidden too (``SamplingConfig.forbid_seg``).

Randomness comes only from an explicit, seeded ``torch.Generator`` (on the model's
device): the same seed gives the same rollouts.

Rollouts are decoded to trades and written by ``rollouts.py`` (its docstring has the file
layout and the size level).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

from mega_trading.core.config import (
    PositiveInt,
    config_dataclass,
    to_dict,
)
from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import provenance
from mega_trading.data.windows import allocate, stratified_starts
from mega_trading.generation.engine import (
    DecodeEngine,
    banned_ids,
    decode_one,
    prefill,
    sample_step,
    special_ids,
    window_sizes,
)
from mega_trading.generation.rollouts import rollouts_to_events
from mega_trading.generation.sampling import SamplingConfig, sample_next
from mega_trading.generation.support import TickSupport, restrict

# re-exported: the sampling config lives in sampling.py, the decoding steps in engine.py
__all__ = ["DecodeEngine", "SamplingConfig", "banned_ids", "decode_one", "prefill",
           "sample_next", "special_ids"]
_sample_step = sample_step  # the name tests and older callers use
PLAIN_SAMPLING = SamplingConfig()  # temperature 1, no truncation

PromptSource = Literal["train", "validation", "backtest", "seg"]
PROMPT_SOURCES: tuple[str, ...] = typing.get_args(PromptSource)


@config_dataclass
class GenerateConfig:
    n: PositiveInt = 32  # rollouts
    length: PositiveInt = 512  # new tokens per rollout
    prompt_from: PromptSource = "backtest"  # a split to draw real prompt windows from, or "seg"
    prompt_length: PositiveInt = 128  # tokens per real prompt (a "seg" prompt is one SEG token)
    symbol: str | None = None  # None: symbols in proportion to their windows (largest remainder)
    split: str = "backtest"  # where a "seg" prompt finds its anchor price / time / size
    seed: int = 0
    rollouts_per_prompt: PositiveInt = 1  # >1: several rollouts continue each prompt (a fan)
    batch_size: PositiveInt = 32  # rollouts decoded together
    keep: int | None = None  # tokens kept when the window slides; None: half the cache
    # None: the run's measured choice (RUN/sampling.json), else plain sampling; set any
    # field (e.g. generate.sampling.top_k=16) to choose by hand (sampling.py)
    sampling: SamplingConfig | None = None


# --- decoding steps ---------------------------------------------------------------------

def _setup(model, prompt, n_new, cfg, cache_len, keep, specials):
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ConfigError(f"prompt must be a non-empty [B, T] tensor, got {tuple(prompt.shape)}")
    if n_new < 0:
        raise ConfigError(f"n_new must be >= 0, got {n_new}")
    cache_len, keep = window_sizes(model, cache_len, keep)
    pad_id, seg_id = specials or special_ids(model.cfg.vocab_size)
    batch, prompt_len = prompt.shape
    device = model.tok_embeddings.weight.device
    tokens = torch.empty(batch, prompt_len + n_new, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = prompt
    return tokens, cache_len, keep, banned_ids(cfg, pad_id, seg_id)


@torch.inference_mode()
def generate(model, prompt: torch.Tensor, n_new: int, cfg: SamplingConfig = PLAIN_SAMPLING,
             generator: torch.Generator | None = None, cache_len: int | None = None, *,
             keep: int | None = None, specials: tuple[int, int] | None = None,
             on_logits: Callable[[int, torch.Tensor], None] | None = None,
             support: TickSupport | None = None) -> torch.Tensor:
    """Continue prompt [B, T] by n_new sampled tokens per row -> tokens [B, T + n_new].

    Decodes on a `engine.DecodeEngine` with a KV cache of cache_len (default block_size)
    positions that slides as the module docstring says; a prompt longer than cache_len is
    cut to its last cache_len tokens of context. `specials` = (PAD, SEG) ids (default:
    the contract's); `on_logits(t, logits)` sees the logits that token t is drawn from;
    `support` is needed by a cfg with tick_support (``support.py``).
    """
    tokens, cache_len, keep, _ = _setup(model, prompt, n_new, cfg, cache_len, keep, specials)
    engine = DecodeEngine(model, cache_len, keep, specials, support)
    end = tokens.shape[1]
    engine.start(tokens[:, :prompt.shape[1]])
    for t in range(prompt.shape[1], end):
        if on_logits is not None:
            on_logits(t, engine.logits)
        tokens[:, t] = engine.sample(cfg, generator)
        if t + 1 < end:
            engine.feed(tokens[:, t])
    return tokens


@torch.inference_mode()
def generate_nocache(model, prompt: torch.Tensor, n_new: int,
                     cfg: SamplingConfig = PLAIN_SAMPLING,
                     generator: torch.Generator | None = None, cache_len: int | None = None, *,
                     keep: int | None = None, specials: tuple[int, int] | None = None,
                     on_logits: Callable[[int, torch.Tensor], None] | None = None,
                     support: TickSupport | None = None) -> torch.Tensor:
    """`generate` without a cache: the whole context window is recomputed at every step.

    Same window schedule as `generate`, so with the same generator both draw the same
    tokens (up to float rounding flipping a near-tie).
    """
    tokens, cache_len, keep, banned = _setup(model, prompt, n_new, cfg, cache_len, keep, specials)
    t0 = prompt.shape[1]
    start = max(0, t0 - cache_len)
    for t in range(t0, tokens.shape[1]):
        if t - start > cache_len:
            start = t - keep
        logits = model(tokens[:, start:t])[:, -1]
        if on_logits is not None:
            on_logits(t, logits)
        if cfg.tick_support:  # the support state from scratch, from every token so far
            logits = restrict(logits, support, support and support.start(tokens[:, :t]))
        tokens[:, t] = sample_step(logits, cfg, banned, generator)
    return tokens


# --- prompts ------------------------------------------------------------------------------

def _pick_symbols(shards, split: str, symbol: str | None,
                  weights_of) -> tuple[list[str], np.ndarray]:
    if split not in shards.manifest["shards"]:
        known = sorted(shards.manifest["shards"])
        raise ConfigError(f"unknown split {split!r}; the data has {known}")
    names = shards.symbols(split)
    if symbol is not None:
        if symbol not in names:
            raise DataError(f"symbol {symbol} has no {split} shard (it has {names})", shards.root)
        names = [symbol]
    weights = np.array([weights_of(s) for s in names], dtype=np.float64)
    if not names or weights.sum() <= 0:
        return [], weights
    return names, weights / weights.sum()


def prompt_from_split(shards, split: str = "backtest", symbol: str | None = None,
                      length: int = 128, n: int = 32,
                      rng: np.random.Generator | None = None) -> tuple[torch.Tensor, pl.DataFrame]:
    """n real windows of `length` tokens from one split -> (prompts [n, length], info).

    A window lies wholly inside one (split, symbol) shard. Each symbol gets prompts in
    proportion to its number of windows (largest remainder: the market mix of the split,
    not a random draw of it) and their starts are stratified over its time range. `info` has one row per prompt: rollout,
    symbol, split, start_pos (in the shard), length, last_trade_id, last_price,
    last_time_us (of the last real event at or before the window's end) and size_level.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if length < 1:
        raise ConfigError(f"prompt length must be >= 1, got {length}")
    # Each shard opens with SEG, so a window must end past position 1 to hold an event.
    lowest = max(0, 2 - length)

    def n_starts(s: str) -> int:
        return max(0, shards.n_tokens(split, s) - length + 1 - lowest)

    names, weights = _pick_symbols(shards, split, symbol, n_starts)
    if not names:
        raise DataError(f"no {split} shard holds a prompt window of {length} tokens", shards.root)
    rows, info = [], []
    for i, (name, offset) in enumerate(_stratified_windows(names, weights, n, n_starts, rng)):
        if i == 0 or name != info[-1]["symbol"]:
            segs = shards.seg_positions(split, name)  # the event index of each token
        start = lowest + offset
        tokens, anchor = shards.window(split, name, start, length, segs)
        rows.append(tokens)
        info.append({
            "rollout": i, "symbol": name, "split": split, "start_pos": start, "length": length,
            "last_trade_id": anchor.trade_id, "last_price": anchor.price,
            "last_time_us": anchor.time_us, "size_level": anchor.size_level,
        })
    return torch.from_numpy(np.stack(rows)), pl.DataFrame(info)


def _stratified_windows(names: list[str], weights: np.ndarray, n: int, n_starts,
                        rng: np.random.Generator) -> list[tuple[str, int]]:
    """(symbol, start) of n windows: symbols in proportion to ``weights`` (largest remainder,
    so the prompts hold the markets in the split's mix, as the real reference sample does),
    starts stratified over each symbol's range."""
    out = []
    for name, count in zip(names, allocate(n, weights)):
        out.extend((name, int(s)) for s in stratified_starts(int(count), 0, n_starts(name), rng))
    return out


def seg_prompts(shards, split: str = "backtest", symbol: str | None = None, n: int = 32,
                rng: np.random.Generator | None = None) -> tuple[torch.Tensor, pl.DataFrame]:
    """n bare one-token prompts [[SEG]] -> (prompts [n, 1], info like `prompt_from_split`).

    With no real context, each rollout is anchored to a randomly drawn real segment start
    of the split: its price, time and causal size level (start_pos is the SEG's position).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    seg_id = shards.tokenizer.seg_id

    def first_events(s: str) -> pl.DataFrame:
        tokens = np.asarray(shards.tokens(split, s))
        events = shards.events(split, s)
        after_seg = tokens[np.asarray(events["token_pos"].to_numpy()) - 1] == seg_id
        return events.filter(pl.Series(after_seg))

    anchors = {}
    names, weights = _pick_symbols(shards, split, symbol,
                                   lambda s: anchors.setdefault(s, first_events(s)).height)
    if not names:
        raise DataError(f"no {split} shard holds an event to anchor a SEG prompt", shards.root)
    info = []
    for i, k in enumerate(rng.choice(len(names), size=n, p=weights)):
        events = anchors[names[k]]
        row = int(rng.integers(events.height))
        level = math.exp(math.log(float(events["quote_qty"][row])) - float(events["log_size"][row]))
        info.append({
            "rollout": i, "symbol": names[k], "split": split,
            "start_pos": int(events["token_pos"][row]) - 1, "length": 1,
            "last_trade_id": int(events["trade_id"][row]),
            "last_price": float(events["price"][row]),
            "last_time_us": int(events["time_us"][row]),
            "size_level": level,
        })
    return torch.full((n, 1), seg_id, dtype=torch.long), pl.DataFrame(info)


# --- whole runs and files ------------------------------------------------------------------

def make_prompts(shards, cfg: GenerateConfig,
                 rng: np.random.Generator) -> tuple[torch.Tensor, pl.DataFrame]:
    """n prompts: ceil(n / rollouts_per_prompt) distinct ones, each repeated in a row."""
    distinct = -(-cfg.n // cfg.rollouts_per_prompt)
    if cfg.prompt_from == "seg":
        prompts, info = seg_prompts(shards, cfg.split, cfg.symbol, distinct, rng)
    else:
        prompts, info = prompt_from_split(shards, cfg.prompt_from, cfg.symbol, cfg.prompt_length,
                                          distinct, rng)
    if cfg.rollouts_per_prompt == 1:
        return prompts, info
    rows = np.repeat(np.arange(distinct), cfg.rollouts_per_prompt)[:cfg.n]
    info = info[rows].with_columns(prompt_id=pl.Series(rows))
    if "rollout" in info.columns:  # one row per rollout, numbered 0..n-1 like the rollouts
        info = info.with_columns(rollout=pl.Series(np.arange(cfg.n, dtype=np.int64)))
    return prompts[torch.from_numpy(rows)], info


def generate_rollouts(model, shards, cfg: GenerateConfig,
                      on_batch: Callable[[int, int], None] | None = None,
                      sampling: SamplingConfig | None = None
                      ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Prompts from `shards`, cached sampling in batches -> (rollout events, prompt info).

    `sampling`: the resolved settings (`sampling.resolve_sampling`); default cfg.sampling,
    else the built-in default. Deterministic in cfg.seed: prompts come from numpy's
    PCG64(seed), tokens from a torch.Generator seeded with it on the model's device, the
    in-bin decoding from PCG64(seed).
    """
    sampling = sampling or cfg.sampling or SamplingConfig()
    if model.cfg.vocab_size != shards.vocab_size:
        raise DataError(f"model vocabulary {model.cfg.vocab_size} != tokenizer vocabulary "
                        f"{shards.vocab_size}", shards.root)
    tokenizer = shards.tokenizer
    prompts, info = make_prompts(shards, cfg, np.random.default_rng(cfg.seed))
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    support = TickSupport.for_sampling(tokenizer, sampling.tick_support, device)
    new_tokens = []
    for lo in range(0, cfg.n, cfg.batch_size):
        batch = prompts[lo:lo + cfg.batch_size].to(device)
        out = generate(model, batch, cfg.length, sampling, generator, keep=cfg.keep,
                       specials=(tokenizer.pad_id, tokenizer.seg_id), support=support)
        new_tokens.append(out[:, batch.shape[1]:].cpu())
        if on_batch is not None:
            on_batch(min(lo + cfg.batch_size, cfg.n), cfg.n)
    events = rollouts_to_events(torch.cat(new_tokens), tokenizer, info["last_price"].to_numpy(),
                                info["last_time_us"].to_numpy(), info["symbol"].to_list(),
                                info["size_level"].to_numpy(), decode_seed=cfg.seed,
                                context_tokens=prompts)
    return events, info


def rollout_lineage(cfg: GenerateConfig, shards, prompts: pl.DataFrame,
                    **extra: Any) -> dict[str, Any]:
    """What a rollouts file records about how it was made."""

    return provenance(
        stage="generate", tokenizer_hash=shards.tokenizer_hash,
        manifest_hash=shards.manifest_hash, data_dir=str(Path(shards.root).resolve()),
        config=to_dict(cfg), seed=cfg.seed, prompts=prompts.to_dicts(), **extra,
    )
