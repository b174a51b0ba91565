"""Where the market's next events come from: the model (sampled) or the real tape (replay).

Both serve a batch of episodes in lockstep through one small interface:

* ``propose() -> Proposal``: the next market event of every row;
* ``commit(tokens, consumed)``: what actually happened at this step in each row, either
  the proposal (``consumed``) or an agent fill's token inserted in its place.

`ModelSource` feeds every committed token to the model through the one decoder,
`mega_trading.generation.engine.DecodeEngine` (KV cache, sliding window, fused weights fetched once), so a discarded proposal is never seen again and later proposals
react to the inserted fill. Randomness comes from one seeded ``torch.Generator`` drawing
the same amount at every step whatever is committed, so closed- and open-loop runs with
one seed differ only through the inserted tokens. `ReplaySource` steps through a split's
real event table and ignores inserted fills (``reacts_to_fills = False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl
import torch

from mega_trading.core.errors import ConfigError, DataError
from mega_trading.data.windows import window_plan
from mega_trading.generation.engine import DecodeEngine
from mega_trading.generation.sampling import SamplingConfig
from mega_trading.generation.support import TickSupport
from mega_trading.simulate.config import SimConfig
from mega_trading.simulate.market import StartState

DEFAULT_SIZE_WINDOW = 1000  # EventConfig.size_window when a manifest does not record it


class NoStartError(DataError):
    """No real window of the split qualifies as an episode start."""


@dataclass
class Proposal:
    """The next market event per row. Model rows give relative features (integrated by
    the engine against each episode's own tape); replay rows give absolute values."""

    token: np.ndarray  # int64 [B]
    is_event: np.ndarray  # bool [B]; False for SEG (a marker: nothing trades)
    move_bps: np.ndarray | None = None
    log_size: np.ndarray | None = None
    dt_us: np.ndarray | None = None
    price: np.ndarray | None = None  # replay
    quote_qty: np.ndarray | None = None  # replay
    time_us: np.ndarray | None = None  # replay
    exhausted: np.ndarray | None = None  # replay: the table has no more events


class EventSource(Protocol):
    kind: str
    reacts_to_fills: bool
    starts: list[StartState]

    def propose(self) -> Proposal: ...

    def commit(self, tokens: np.ndarray, consumed: np.ndarray) -> None: ...

    def encode(self, side: int, move_bps: float, log_size: float, dt_us: int) -> int: ...


# --- the model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenTable:
    """Decoded features of every token id (specials: is_event False)."""

    move_bps: np.ndarray
    log_size: np.ndarray
    dt_us: np.ndarray
    is_event: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenTable:
        frame = tokenizer.decode(np.arange(tokenizer.vocab_size))
        return cls(frame["move_bps"].fill_null(0.0).to_numpy(),
                   frame["log_size"].fill_null(0.0).to_numpy(),
                   frame["dt_us"].fill_null(0).to_numpy().astype(np.int64),
                   frame["is_event"].to_numpy())


class ModelSource:
    kind = "model"
    reacts_to_fills = True

    def __init__(self, model, tokenizer, prompts: np.ndarray, starts: list[StartState],
                 sampling: SamplingConfig, generator: torch.Generator, keep: int | None = None,
                 table: TokenTable | None = None, decode_rng: np.random.Generator | None = None,
                 engine: DecodeEngine | None = None):
        """decode_rng: draw each proposed event's features inside its bins (in-bin
        decoding, a fixed number of draws per step); None: the bin medians (``table``).
        engine: a decoder to start on these prompts (one source at a time may use it);
        default: a new one."""
        prompts = np.asarray(prompts, dtype=np.int64)
        block = model.cfg.block_size
        if prompts.ndim != 2 or not 1 <= prompts.shape[1] <= block:
            raise ConfigError(f"prompts must be [B, T] with 1 <= T <= block_size "
                              f"{block}, got {prompts.shape}")
        # The one decoder (engine.DecodeEngine): cache, sliding window, fused weights.
        self.engine = engine or DecodeEngine(model, keep=keep,
                                             specials=(tokenizer.pad_id, tokenizer.seg_id),
                                             support=TickSupport.for_sampling(
                                                 tokenizer, sampling.tick_support,
                                                 model.tok_embeddings.weight.device))
        self.model, self.tokenizer, self.starts = model, tokenizer, starts
        self.sampling, self.generator = sampling, generator
        self.table = table or TokenTable.from_tokenizer(tokenizer)
        self.decode_rng = decode_rng
        self.prompts = prompts
        # each episode is one decoding stream; its prompt sets the move context
        self.decode_memory = None
        self._streams = np.arange(prompts.shape[0])
        if decode_rng is not None:
            self.decode_memory = tokenizer.decode_memory()
            tokenizer.decode_fields(prompts.reshape(-1), rng=np.random.default_rng(0),
                                    streams=np.repeat(self._streams, prompts.shape[1]),
                                    memory=self.decode_memory)
        self.fed: list[np.ndarray] = []  # token committed at each step, [B] each
        self.forced: list[np.ndarray] = []  # True where an agent fill was inserted
        self.engine.start(torch.from_numpy(prompts))

    def propose(self) -> Proposal:
        token = self.engine.sample(self.sampling, self.generator).cpu().numpy()
        if self.decode_rng is not None:
            # the proposal may be replaced by an agent fill (commit): keep the state before it
            self._memory_before = self.decode_memory.copy()
            f = self.tokenizer.decode_fields(token, rng=self.decode_rng, streams=self._streams,
                                             memory=self.decode_memory)
            return Proposal(token=token, is_event=f["is_event"], move_bps=f["move_bps"],
                            log_size=f["log_size"], dt_us=f["dt_us"])
        t = self.table
        return Proposal(token=token, is_event=t.is_event[token], move_bps=t.move_bps[token],
                        log_size=t.log_size[token], dt_us=t.dt_us[token])

    def commit(self, tokens: np.ndarray, consumed: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        forced = ~np.asarray(consumed, dtype=bool)
        if self.decode_memory is not None and forced.any():
            # an inserted fill replaced the proposal: its stream's move context continues
            # from before the proposal, with the fill's token
            memory = self._memory_before
            for stream in np.flatnonzero(~forced):
                memory.copy_stream(self.decode_memory, int(stream))
            self.tokenizer.decode_fields(tokens[forced], rng=self.decode_rng,
                                         streams=self._streams[forced], memory=memory)
            self.decode_memory = memory
        self.fed.append(tokens.copy())
        self.forced.append(~np.asarray(consumed, dtype=bool))
        self.engine.feed(torch.from_numpy(tokens))

    def encode(self, side: int, move_bps: float, log_size: float, dt_us: int) -> int:
        row = pl.DataFrame({"side": [side], "move_bps": [move_bps], "log_size": [log_size],
                            "dt_us": [dt_us]})
        return int(self.tokenizer.encode(row)[0])

    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, forced) [B, steps]: every committed token and whether it was a fill."""
        if not self.fed:
            empty = np.zeros((len(self.starts), 0))
            return empty.astype(np.int64), empty.astype(bool)
        return np.stack(self.fed, axis=1), np.stack(self.forced, axis=1)


# --- the real tape ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Tape:
    """Columns of one real event table, as numpy (rows in time order)."""

    symbol: str
    price: np.ndarray
    time_us: np.ndarray
    quote_qty: np.ndarray
    token: np.ndarray  # -1 where unknown
    log_size: np.ndarray | None = None
    move_bps: np.ndarray | None = None
    segment: np.ndarray | None = None
    token_pos: np.ndarray | None = None

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, symbol: str | None = None,
                   tokens: np.ndarray | None = None) -> Tape:
        def col(name, dtype):
            return frame[name].to_numpy().astype(dtype) if name in frame.columns else None

        token_pos = col("token_pos", np.int64)
        token = (np.asarray(tokens[token_pos], dtype=np.int64) if tokens is not None
                 and token_pos is not None else np.full(frame.height, -1, dtype=np.int64))
        name = symbol or (str(frame["symbol"][0]) if "symbol" in frame.columns else "?")
        return cls(name, col("price", np.float64), col("time_us", np.int64),
                   col("quote_qty", np.float64), token, col("log_size", np.float64),
                   col("move_bps", np.float64), col("segment", np.int64), token_pos)

    def __len__(self) -> int:
        return len(self.price)

    def start_state(self, row: int, window_events: int, size_window: int,
                    vol_bps: float = float("nan")) -> StartState:
        """State after event `row`: its price and time, the causal size level the next
        event is measured against, and the notional of up to `window_events` events."""
        ln_q = math.log(float(self.quote_qty[row]))
        # level the data used for this event; without log_size, the event itself
        level = ln_q - float(self.log_size[row]) if self.log_size is not None else ln_q
        lo = max(0, row + 1 - window_events)
        return StartState(self.symbol, float(self.price[row]), int(self.time_us[row]),
                          level + (ln_q - level) / size_window,
                          tuple(float(q) for q in self.quote_qty[lo:row + 1]), row, vol_bps)


class ReplaySource:
    kind = "replay"
    reacts_to_fills = False

    def __init__(self, tapes: Sequence[Tape], starts: Sequence[StartState]):
        if len(tapes) != len(starts):
            raise ConfigError("one tape per start")
        self.tapes, self.starts = list(tapes), list(starts)
        self.pos = np.array([s.row + 1 for s in starts], dtype=np.int64)

    @classmethod
    def from_frames(cls, frames: Sequence[pl.DataFrame], rows: Sequence[int],
                    window_events: int = 200,
                    size_window: int = DEFAULT_SIZE_WINDOW) -> ReplaySource:
        """Replay hand-built (or real) event tables after rows[i]; rows up to it are history."""
        tapes = [Tape.from_frame(f) for f in frames]
        starts = [t.start_state(r, window_events, size_window) for t, r in zip(tapes, rows)]
        return cls(tapes, starts)

    def propose(self) -> Proposal:
        n = len(self.tapes)
        out = {k: np.zeros(n, dtype=d) for k, d in
               (("price", np.float64), ("quote_qty", np.float64), ("time_us", np.int64))}
        token = np.full(n, -1, dtype=np.int64)
        exhausted = np.zeros(n, dtype=bool)
        for b, (tape, i) in enumerate(zip(self.tapes, self.pos)):
            if i >= len(tape):
                exhausted[b] = True
                continue
            out["price"][b], out["quote_qty"][b] = tape.price[i], tape.quote_qty[i]
            out["time_us"][b], token[b] = tape.time_us[i], tape.token[i]
        return Proposal(token=token, is_event=~exhausted, exhausted=exhausted, **out)

    def commit(self, tokens: np.ndarray, consumed: np.ndarray) -> None:
        self.pos += np.asarray(consumed, dtype=np.int64)  # inserted fills never move the tape

    def encode(self, side: int, move_bps: float, log_size: float, dt_us: int) -> int:
        raise ConfigError("a replay source never takes fills into its flow")


# --- where episodes start ----------------------------------------------------------------------

def _tapes(shards, split: str, symbol: str | None, cfg: SimConfig, seed: int = 0) -> list[Tape]:
    """The split's real tape, one per symbol; above cfg.max_tape_events, a seeded stratified
    sample of windows instead (one tape each), read window by window."""
    if split not in shards.manifest["shards"]:
        raise ConfigError(f"unknown split {split!r}; "
                          f"the data has {sorted(shards.manifest['shards'])}")
    names = shards.symbols(split)
    if symbol is not None:
        if symbol not in names:
            raise DataError(f"symbol {symbol} has no {split} shard (it has {names})", shards.root)
        names = [symbol]
    names = [name for name in names if shards.n_tokens(split, name) > 0]
    if sum(shards.n_events(split, name) for name in names) > cfg.max_tape_events:
        return _window_tapes(shards, split, names, cfg, seed)
    tapes = []
    for name in names:
        frame = shards.events(split, name).sort("token_pos")
        tapes.append(Tape.from_frame(frame, name, np.asarray(shards.tokens(split, name))))
    return tapes


def _window_tapes(shards, split: str, names: list[str], cfg: SimConfig, seed: int) -> list[Tape]:

    ranges = {name: tuple(shards.manifest["shards"][split][name]["rows"]) for name in names}
    segs = {name: shards.seg_positions(split, name) for name in names}
    tapes = []
    for name, start, stop in window_plan(ranges, cfg.max_tape_events, cfg.tape_window_events,
                                         seed):
        frame = shards.window_rows(split, name, start, stop)
        # Event k of the shard sits after every SEG that has at most k events before it.
        events_before_seg = segs[name] - np.arange(len(segs[name]))
        index = np.arange(start, stop) - ranges[name][0]
        token_pos = index + np.searchsorted(events_before_seg, index, side="right")
        frame = frame.with_columns(token_pos=pl.Series(token_pos, dtype=pl.Int64))
        tapes.append(Tape.from_frame(frame, name, shards.tokens(split, name)))
    return tapes


def _candidates(tape: Tape, cfg: SimConfig, horizon_us: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, vol_bps) of the events an episode may start after."""
    n = len(tape)
    rows = np.arange(n)
    ok = tape.token_pos + 1 >= cfg.prompt_length  # a full prompt window ends at the event
    if cfg.replayable_starts:
        # the real continuation must span the horizon plus the impact lags in one segment
        past = np.searchsorted(tape.time_us, tape.time_us + horizon_us, side="left")
        last = past + cfg.impact_lags
        inside = last < n
        same = np.zeros(n, dtype=bool)
        same[inside] = tape.segment[last[inside]] == tape.segment[inside]
        ok &= same
    sq = np.concatenate([[0.0], np.cumsum(tape.move_bps ** 2)])
    width = np.minimum(rows + 1, cfg.prompt_length)
    vol = np.sqrt((sq[rows + 1] - sq[rows + 1 - width]) / width)
    return rows[ok], vol[ok]


def pick_starts(shards, cfg: SimConfig, horizon_s: float,
                seed: int) -> tuple[list[Tape], list[StartState]]:
    """cfg.episodes start points (seeded) and the tape each lies on.

    A start is the end of a real window of `prompt_length` tokens of the split; with
    ``selection: high_vol`` only the top `vol_top_fraction` of windows by realized
    volatility (RMS move in bps per event) are eligible.
    """
    tapes = _tapes(shards, cfg.split, cfg.symbol, cfg, seed)
    horizon_us = round(horizon_s * 1e6)
    pool = [(k, *_candidates(t, cfg, horizon_us)) for k, t in enumerate(tapes)]
    which = np.concatenate([np.full(len(r), k) for k, r, _ in pool]) if pool else np.zeros(0, int)
    rows = np.concatenate([r for _, r, _ in pool]) if pool else np.zeros(0, int)
    vols = np.concatenate([v for _, _, v in pool]) if pool else np.zeros(0)
    if len(rows) == 0:
        need = f"{cfg.prompt_length} tokens of context"
        if cfg.replayable_starts:
            need += f" and {horizon_s:g} s + {cfg.impact_lags} events of real continuation"
        raise NoStartError(f"no start in the {cfg.split} split has {need}; shorten the "
                           f"horizon or set replayable_starts=false", shards.root)
    if cfg.selection == "high_vol":
        keep = vols >= np.quantile(vols, 1.0 - cfg.vol_top_fraction, method="higher")
        which, rows, vols = which[keep], rows[keep], vols[keep]
    rng = np.random.default_rng([seed, 1])
    picks = rng.choice(len(rows), size=cfg.episodes, replace=len(rows) < cfg.episodes)
    size_window = shards.size_window
    chosen = [tapes[which[i]] for i in picks]
    starts = [tape.start_state(int(rows[i]), cfg.impact.window_events, size_window, float(vols[i]))
              for tape, i in zip(chosen, picks)]
    return chosen, starts


def prompt_tokens(shards, split: str, tape: Tape, start: StartState, length: int) -> np.ndarray:
    end = int(tape.token_pos[start.row]) + 1
    return np.asarray(shards.tokens(split, tape.symbol)[end - length:end], dtype=np.int64)


# --- factories: episode ids -> a source over those episodes ---------------------------------------

class ReplaySourceFactory:
    def __init__(self, tapes: list[Tape], starts: list[StartState]):
        self.tapes, self.starts = tapes, starts

    def __call__(self, episode_ids: Sequence[int], seed: int) -> ReplaySource:
        ids = list(episode_ids)
        return ReplaySource([self.tapes[i] for i in ids], [self.starts[i] for i in ids])


class ModelSourceFactory:
    def __init__(self, model, shards, tapes: list[Tape], starts: list[StartState], cfg: SimConfig,
                 sampling: SamplingConfig | None = None):
        """sampling: the resolved settings (default cfg.sampling, else SEG forbidden)."""
        if model.cfg.vocab_size != shards.vocab_size:
            raise DataError(f"model vocabulary {model.cfg.vocab_size} != tokenizer vocabulary "
                            f"{shards.vocab_size}", shards.root)
        if cfg.prompt_length > model.cfg.block_size:
            raise ConfigError(f"prompt_length {cfg.prompt_length} exceeds the model's block_size "
                              f"{model.cfg.block_size}")
        self.model, self.tokenizer, self.cfg = model, shards.tokenizer, cfg
        self.starts = starts
        self.prompts = np.stack([prompt_tokens(shards, cfg.split, t, s, cfg.prompt_length)
                                 for t, s in zip(tapes, starts)])
        self.table = TokenTable.from_tokenizer(self.tokenizer)
        self.sampling = sampling or cfg.sampling or SamplingConfig(forbid_seg=True)
        # One decoder for every source it makes (batches run one after another): the fused
        # weights are fetched once, with the model, and the KV cache is reused batch after
        # batch when the batch size repeats.
        self.engine = DecodeEngine(model, keep=cfg.keep,
                                   specials=(self.tokenizer.pad_id, self.tokenizer.seg_id),
                                   support=TickSupport.for_sampling(
                                       self.tokenizer, self.sampling.tick_support,
                                       model.tok_embeddings.weight.device))

    def __call__(self, episode_ids: Sequence[int], seed: int) -> ModelSource:
        ids = list(episode_ids)
        device = self.model.tok_embeddings.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        return ModelSource(self.model, self.tokenizer, self.prompts[ids],
                           [self.starts[i] for i in ids], self.sampling, generator,
                           self.cfg.keep, self.table,
                           decode_rng=np.random.default_rng(seed) if self.cfg.decode == "in_bin"
                           else None, engine=self.engine)
