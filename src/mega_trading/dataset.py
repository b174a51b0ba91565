"""Events -> chronological splits -> token shards on disk -> training windows.

The split contract (per symbol, in time order)::

    | train ............ | gap | validation ... | gap | backtest ... |

* Boundaries are cut by event-count fractions (``splits``) or explicit UTC timestamps
  (``split_times``) and recorded as timestamps in the manifest.
* ``gap_events`` events (default: one block) are dropped after each boundary, so the
  held-out stretch starts well after the last training event.
* Each (split, symbol) is its own shard file: a window lies wholly inside one shard, so no
  window ever straddles a split boundary.
* The tokenizer is fitted on training events only.

Memory stays bounded however large the input: every input file is processed on its own
(in parallel worker processes), the tokenizer is fitted on a bounded sample, and shards
are assembled by appending part files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import field
from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from mega_trading.config import NonNegativeInt, PositiveInt, config_dataclass, to_dict
from mega_trading.errors import DataError
from mega_trading.events import EVENT_COLUMNS, EventConfig, compute_events
from mega_trading.lineage import (
    atomic_dir,
    json_hash,
    provenance,
    read_json,
    sha256_file,
    write_json_atomic,
)
from mega_trading.tokenizer import Tokenizer, TokenizerConfig
from mega_trading.tokenizer_reuse import ReusedTokenizer, outlier_counts, resolve_reused_tokenizer

SPLITS = ("train", "validation", "backtest")
MANIFEST_FORMAT = "mega-trading/shards@2"
TOKEN_DTYPE = np.uint16


@config_dataclass
class PrepareConfig:
    # Context of the model trained on this data: THE block_size of a run (train and
    # generate read it from here); also the default gap after each split boundary.
    block_size: Annotated[int, Field(ge=2)] = 512
    stride: PositiveInt = 256
    splits: tuple[Annotated[float, Field(ge=0)], ...] = (0.8, 0.1, 0.1)
    split_times: tuple[str, ...] = ()  # two ISO UTC timestamps: validation start, backtest start
    gap_events: NonNegativeInt | None = None  # events dropped after each boundary; default block_size
    kind: str = "trades"  # trades or aggTrades: one event grammar per data set
    symbols: tuple[str, ...] = ()  # empty: every symbol found
    workers: PositiveInt = 2
    market: str | None = None  # spot | um: every file must be of that market; None: detected per file
    # Streams (`NEXOUSDT`, `BTCUSDT.um`) or base symbols (every market) kept out of training
    # and validation entirely: all their events go to the backtest split (zero-shot rows).
    holdout_symbols: tuple[str, ...] = ()
    events: EventConfig = field(default_factory=EventConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @model_validator(mode="after")
    def _check_splits(self) -> PrepareConfig:
        if len(self.splits) != 3 or abs(sum(self.splits) - 1.0) > 1e-6:
            raise ValueError(f"splits must be three non-negative fractions summing to 1, got {list(self.splits)}")
        if self.split_times and len(self.split_times) != 2:
            raise ValueError("split_times takes two timestamps: validation start, backtest start")
        return self

    @property
    def gap(self) -> int:
        return self.block_size if self.gap_events is None else self.gap_events


# --- windows ------------------------------------------------------------------------------

def n_windows(n_tokens: int, block_size: int, stride: int) -> int:
    """How many windows of block_size + 1 tokens (inputs + shifted targets) a shard holds;
    window i starts at token i * stride."""
    last = n_tokens - (block_size + 1)
    return 0 if last < 0 else last // stride + 1


def window_starts(n_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """Starts of the windows of block_size + 1 tokens (inputs + shifted targets) in a shard."""
    return np.arange(n_windows(n_tokens, block_size, stride), dtype=np.int64) * stride


def sequential_windows(
    tokens: np.ndarray, block_size: int, stride: int | None = None
) -> Iterator[tuple[int, np.ndarray, int]]:
    """Cover every target of a shard exactly once, each with as much past context as fits.

    Yields ``(start, window, score_from)``: ``window = tokens[start:start + block_size + 1]``
    (inputs ``window[:-1]``, targets ``window[1:]``); only targets with index
    ``>= score_from`` within the window are new and should be scored.
    """
    stride = min(stride or max(1, block_size // 2), block_size)
    n_targets = len(tokens) - 1
    start, scored = 0, 0  # targets [0, scored) of the shard are already covered
    while scored < n_targets:
        end = min(start + block_size, n_targets)  # this window's targets: [start, end)
        yield start, np.asarray(tokens[start:end + 1], dtype=np.int64), scored - start
        scored = end
        start = min(start + stride, max(0, n_targets - block_size))


class ShardSet:
    """Read access to a prepared data directory (see docs/CONTRACTS.md)."""

    def __init__(self, root: Path, manifest: dict, tokenizer: Tokenizer):
        self.root = root
        self.manifest = manifest
        self.tokenizer = tokenizer

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise DataError("not a prepared data directory (no manifest.json); run `mega-trading prepare`", root)
        manifest = read_json(manifest_path)
        found = manifest.get("format")
        if found != MANIFEST_FORMAT:
            hint = ("; it was prepared by another version of mega-trading: run `mega-trading "
                    "prepare` again" if str(found).startswith("mega-trading/shards@") else "")
            raise DataError(f"manifest format {found!r}, expected {MANIFEST_FORMAT!r}{hint}",
                            manifest_path)
        tokenizer = Tokenizer.load(root / "tokenizer.json")
        if tokenizer.hash != manifest["tokenizer_hash"]:
            raise DataError("tokenizer.json does not match the manifest's tokenizer hash", root)
        return cls(root, manifest, tokenizer)

    @property
    def manifest_hash(self) -> str:
        return self.manifest["manifest_hash"]

    @property
    def tokenizer_reused(self) -> bool:
        """Encoded with a tokenizer fitted elsewhere (`prepare --tokenizer`): new data to
        score a trained run on."""
        return bool(self.manifest.get("tokenizer_reuse"))

    @property
    def model_manifest_hash(self) -> str | None:
        """The data-manifest hash a checkpoint must carry to be used with this data: this
        data's own, or None for data encoded with a reused tokenizer (then the tokenizer
        hash alone says the token ids mean the same thing)."""
        return None if self.tokenizer_reused else self.manifest_hash

    def training_data(self, run_config: dict | None = None) -> ShardSet:
        """The prepared data a run was trained on, for what must come from training data
        (baselines, the facts' noise floor, zero-shot tags): this data itself, or, for data
        encoded with a reused tokenizer, the run's own data dir (``run_config`` is
        RUN/config.json; without it, the data dir recorded when the tokenizer was reused)."""
        if not self.tokenizer_reused:
            return self
        reuse = self.manifest["tokenizer_reuse"]
        if run_config and run_config.get("manifest_hash") == self.manifest_hash:
            return self  # the run was trained on this very data
        where = (run_config or {}).get("data_dir") or reuse.get("train_data_dir")
        expected = (run_config or {}).get("manifest_hash") or reuse.get("train_manifest_hash")
        if not where or not (Path(where) / "manifest.json").is_file():
            raise DataError(f"this data was encoded with a reused tokenizer; its baselines and "
                            f"zero-shot tags come from the run's training data, which is not at "
                            f"{where or '(unknown)'}", self.root)
        train = ShardSet.open(where)
        if expected and train.manifest_hash != expected:
            raise DataError(f"the training data at {where} has manifest {train.manifest_hash[:12]}, "
                            f"the run was trained on {expected[:12]}", self.root)
        if train.tokenizer_hash != self.tokenizer_hash:
            raise DataError(f"the training data at {where} uses another tokenizer", self.root)
        return train

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.hash

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def block_size(self) -> int:
        """The run's one block_size: prepare's, recorded in the manifest."""
        return int(self.manifest["config"]["block_size"])

    def symbols(self, split: str) -> list[str]:
        return sorted(self.manifest["shards"].get(split, {}))

    def n_tokens(self, split: str, symbol: str) -> int:
        return int(self.manifest["shards"][split][symbol]["n_tokens"])

    def tokens(self, split: str, symbol: str) -> np.ndarray:
        info = self.manifest["shards"][split][symbol]
        if info["n_tokens"] == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.memmap(self.root / info["tokens"], dtype=TOKEN_DTYPE, mode="r")

    def events(self, split: str, symbol: str, tail: int | None = None) -> pl.DataFrame:
        """The shard's event rows in time order (only the last `tail` when given), with
        `token` and `token_pos`, its index in `tokens(split, symbol)`.

        Events are stored once per input file (``manifest["events"]``), whatever split
        they fall in; a shard is the row range ``rows`` of its symbol's files.
        """
        shard = self.manifest["shards"][split][symbol]
        lo, hi = shard["rows"]
        if tail is not None:
            lo = max(lo, hi - max(tail, 0))
        events = self._rows(symbol, lo, hi)
        # The shard ends with its last event; before an event come the events after it and
        # one SEG token before each segment start after it.
        starts = events["segment_start"].to_numpy().astype(np.int64)
        starts_after = starts[::-1].cumsum()[::-1] - starts
        token_pos = shard["n_tokens"] - events.height + np.arange(events.height) - starts_after
        tokens = np.asarray(self.tokens(split, symbol)[token_pos], dtype=np.int32)
        return events.with_columns(token=pl.Series(tokens, dtype=pl.Int32),
                                   token_pos=pl.Series(token_pos, dtype=pl.Int64))

    def _rows(self, symbol: str, lo: int, hi: int, global_segments: bool = True) -> pl.DataFrame:
        """Stored event rows [lo, hi) of a symbol's files.

        With ``global_segments=False`` the segment ids are counted from the first row read
        (they still change exactly at segment starts), which lets Polars read only the rows
        asked for: global ids need every earlier row's segment_start, so a slice of them
        reads (and, as a zero-copy view, keeps alive) the whole file.
        """
        parts = self.manifest["events"][symbol]
        scan = _scan_part if global_segments else _scan_part_rows
        frames, start = [scan(self.root, parts[0], symbol).head(0)], 0
        for part in parts:
            end = start + part["n_events"]
            first, last = max(lo, start), min(hi, end)
            if last > first:
                frames.append(scan(self.root, part, symbol).slice(first - start, last - first))
            start = end
        events = pl.concat(frames).collect()
        if global_segments:
            return events
        segment = events["segment_start"].cast(pl.Int32).cum_sum()
        return events.with_columns(segment=segment).select(EVENT_COLUMNS)

    def n_events(self, split: str, symbol: str) -> int:
        lo, hi = self.manifest["shards"][split][symbol]["rows"]
        return hi - lo

    def sample_events(self, split: str, max_events: int, window: int,
                      seed: int = 0) -> tuple[pl.DataFrame, dict]:
        """At most ~`max_events` event rows of `split`: all of them when they fit, else a
        seeded sample of `window`-event windows, stratified by symbol (in proportion to its
        events) and by time (one window drawn inside each of equal strata of its rows).

        Only the drawn rows are read, so memory does not grow with the split. A window's
        rows get segment ids of their own (``segment`` is renumbered over (window,
        segment)), so no statistic runs across the hole between two windows. Returns the
        rows and a description of the sample for facts.json.
        """
        symbols = [s for s in self.symbols(split) if self.n_events(split, s) > 0]
        sizes = {s: self.n_events(split, s) for s in symbols}
        total = sum(sizes.values())
        info = {"split": split, "events_in_split": total, "max_events": max_events,
                "window_events": window, "seed": seed}
        if total <= max_events:
            frames = [self._rows(s, *self.manifest["shards"][split][s]["rows"]) for s in symbols]
            events = pl.concat(frames) if frames else pl.DataFrame()
            return events, {**info, "complete": True, "windows": None, "events": events.height}
        ranges = {s: tuple(self.manifest["shards"][split][s]["rows"]) for s in symbols}
        plan = window_plan(ranges, max_events, window, seed)
        events = pl.concat([self.window_rows(split, symbol, start, stop).with_columns(
            window=pl.lit(i, dtype=pl.Int64)) for i, (symbol, start, stop) in enumerate(plan)])
        drawn = len(plan)
        window_ids, segments = events["window"].to_numpy(), events["segment"].to_numpy()
        changed = np.r_[False, (window_ids[1:] != window_ids[:-1]) | (segments[1:] != segments[:-1])]
        events = events.with_columns(segment=pl.Series(np.cumsum(changed), dtype=pl.Int32))
        events = events.drop("window")
        return events, {**info, "complete": False, "windows": drawn, "events": events.height}

    def window_rows(self, split: str, symbol: str, start: int, stop: int) -> pl.DataFrame:
        """Stored rows [start, stop) of the symbol's files (a window of ``window_plan``),
        segment ids counted locally. A slice read is a zero-copy view of the whole row group
        it came from: the copy keeps only the window's rows alive."""
        rows = self._rows(symbol, start, stop, global_segments=False)
        return pl.DataFrame({c: rows[c].to_numpy().copy() for c in rows.columns}).cast(
            dict(rows.schema))

    def seg_positions(self, split: str, symbol: str) -> np.ndarray:
        """Token positions of the shard's SEG tokens (one per segment start), read from the
        memory-mapped tokens a million at a time."""
        tokens, seg = self.tokens(split, symbol), self.tokenizer.seg_id
        step = 1 << 20
        found = [lo + np.flatnonzero(np.asarray(tokens[lo:lo + step]) == seg)
                 for lo in range(0, len(tokens), step)]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def event_at_token(self, split: str, symbol: str, token_pos: int,
                       seg_positions: np.ndarray | None = None) -> pl.DataFrame:
        """The one event row (with `token_pos`; its `segment` id is local) that is the last at
        or before token position `token_pos` of the shard, read alone: a shard's tokens are its events with one SEG
        before each segment start, so that event is number token_pos - (SEGs up to it)."""
        segs = self.seg_positions(split, symbol) if seg_positions is None else seg_positions
        index = token_pos - int(np.searchsorted(segs, token_pos, side="right"))
        if index < 0:
            raise DataError(f"no event at or before token {token_pos} of the {split} shard of "
                            f"{symbol}", self.root)
        lo = self.manifest["shards"][split][symbol]["rows"][0]
        # Local segment ids: global ones would read the whole file up to the row.
        row = self._rows(symbol, lo + index, lo + index + 1, global_segments=False)
        position = token_pos  # step back over SEG tokens to the event's own position
        while np.any(segs == position):
            position -= 1
        return row.with_columns(token_pos=pl.lit(position, dtype=pl.Int64))

    def events_between_tokens(self, split: str, symbol: str, lo_pos: int, hi_pos: int,
                              n_after: int = 0, seg_positions: np.ndarray | None = None,
                              ) -> pl.DataFrame:
        """The events whose token position lies in [lo_pos, hi_pos), then up to `n_after`
        more, with `token_pos` (segment ids counted from the first row); only those rows
        are read (see ``event_at_token``)."""
        segs = self.seg_positions(split, symbol) if seg_positions is None else seg_positions
        first = lo_pos - int(np.searchsorted(segs, lo_pos, side="left"))
        stop = hi_pos - int(np.searchsorted(segs, hi_pos, side="left")) + n_after
        lo, hi = self.manifest["shards"][split][symbol]["rows"]
        rows = self._rows(symbol, lo + first, min(lo + stop, hi), global_segments=False)
        index = np.arange(first, first + rows.height)
        token_pos = index + np.searchsorted(segs - np.arange(len(segs)), index, side="right")
        return rows.with_columns(token_pos=pl.Series(token_pos, dtype=pl.Int64))

    def all_events(self, split: str) -> pl.DataFrame:
        frames = [self.events(split, s) for s in self.symbols(split)]
        return pl.concat(frames) if frames else pl.DataFrame()


def window_plan(ranges: dict[str, tuple[int, int]], max_events: int, window: int,
                seed: int = 0) -> list[tuple[str, int, int]]:
    """(symbol, first row, end row) of ~`max_events // window` windows of `window` rows:
    each symbol gets windows in proportion to its rows (at least one), one drawn uniformly
    inside each of that many equal strata of its row range, so the sample covers the
    whole time range and never overlaps itself."""
    rng = np.random.default_rng(seed)
    total = sum(hi - lo for lo, hi in ranges.values())
    n_total = max(1, max_events // window)
    plan = []
    for symbol, (lo, hi) in ranges.items():
        share = max(1, round(n_total * (hi - lo) / total))
        n_strata = min(share, max(1, (hi - lo) // window))
        edges = np.linspace(lo, hi, n_strata + 1).astype(np.int64)
        for a, b in itertools.pairwise(edges):
            start = int(rng.integers(a, max(a, b - window) + 1))
            plan.append((symbol, start, min(start + window, int(b))))
    return plan


class WindowSampler:
    """Seeded random training windows across every symbol and the whole time range.

    Windows are drawn with replacement, each symbol weighted by its number of windows, so
    a run never reads storage order (the prototype saw one symbol). Every rank draws the
    same global batch of ``batch_size * world_size`` windows and keeps its own slice, so
    N ranks see exactly the windows one process with the global batch would see.
    """

    def __init__(self, shards: ShardSet, split: str, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, stride: int | None = None):
        self.shards, self.split = shards, split
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        stride = stride or shards.manifest["config"]["stride"]
        self.stride = stride
        self.symbols = [s for s in shards.symbols(split)
                        if n_windows(shards.n_tokens(split, s), block_size, stride)]
        if not self.symbols:
            raise DataError(
                f"no {split} window of {block_size + 1} tokens fits in any shard; "
                f"use a smaller block_size", shards.root)
        # Memory-mapped shards, read one window at a time: nothing grows with the data.
        self._tokens = {s: shards.tokens(split, s) for s in self.symbols}
        self._n_windows = [n_windows(len(self._tokens[s]), block_size, stride) for s in self.symbols]
        counts = np.array(self._n_windows, dtype=np.float64)
        self._weights = counts / counts.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.seen = {s: 0 for s in self.symbols}
        self.batches_drawn = 0

    @property
    def windows_per_symbol(self) -> dict[str, int]:
        return dict(zip(self.symbols, self._n_windows))

    def next_batch(self):
        import torch

        global_batch = self.batch_size * self.world_size
        which = self.rng.choice(len(self.symbols), size=global_batch, p=self._weights)
        picks = [int(self.rng.integers(self._n_windows[i])) for i in which]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows, names = [], []
        for i, pick in zip(which[lo:hi], picks[lo:hi]):
            symbol = self.symbols[i]
            start = pick * self.stride
            rows.append(np.asarray(self._tokens[symbol][start:start + self.block_size + 1], dtype=np.int64))
            names.append(symbol)
        for i in which:
            self.seen[self.symbols[i]] += 1
        self.batches_drawn += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), names

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seen": dict(self.seen),
                "batches_drawn": self.batches_drawn, "symbols": list(self.symbols)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["symbols"]) != self.symbols:
            raise DataError(f"sampler state was saved for symbols {state['symbols']}, data has {self.symbols}")
        self.rng.bit_generator.state = state["rng"]
        self.seen = {s: int(v) for s, v in state["seen"].items()}
        self.batches_drawn = int(state["batches_drawn"])


# --- prepare: raw files -> prepared data directory -----------------------------------------

INPUT_SUFFIXES = (".zip", ".csv", ".gz")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus archive files found under named directories."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
            if not found:
                raise DataError("directory holds no .zip or .csv trade files", path)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError("input path does not exist", path)
    return files


class _Workers:
    """One pool of worker processes for every parallel step of a `prepare` (started
    lazily, once: spawning a Python with Polars costs about a second), or inline work."""

    def __init__(self, workers: int, show: bool):
        self.workers, self.show, self._pool = workers, show, None

    def map(self, fn: Callable, items: list, label: str) -> list:
        from rich.progress import Progress

        with Progress(disable=not self.show, transient=True) as progress:
            task = progress.add_task(label, total=len(items))
            if self.workers <= 1 or len(items) <= 1:
                results = []
                for item in items:
                    results.append(fn(*item))
                    progress.advance(task)
                return results
            if self._pool is None:
                import multiprocessing

                # spawn: Polars' thread pool does not survive fork().
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            # Workers start during the first submits and size Polars' thread pool at import:
            # one thread each, since N workers x N threads would oversubscribe N cores.
            with _environment_default("POLARS_MAX_THREADS", "1"):
                futures = [self._pool.submit(fn, *item) for item in items]
            results = []
            for future in futures:
                results.append(future.result())
                progress.advance(task)
            return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


@contextlib.contextmanager
def _environment_default(name: str, value: str) -> Iterator[None]:
    """Set an environment variable (unless the user set it) for the duration of a block."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _read_input(path: Path, kind: str, out_root: Path, work: Path, event_cfg: EventConfig,
                index: int, market: str | None = None) -> dict:
    """Worker: one raw file -> its events, written once, where they stay, plus edge rows.

    Fusing read and feature computation avoids a scratch copy of the trades. The first
    ``size_window`` events of a file depend on the previous file's last trades; they are
    recomputed later from the saved edge rows (``_patch_heads``, exact) and stored beside
    the file's events as its head, which readers put in place of the first rows.
    """
    from mega_trading.ingest.reader import read_trades_with_report, stream_key

    trades, report = read_trades_with_report(path, market=market)
    found_kind = trades["kind"][0] if trades.height else kind
    info = {"path": str(path), "name": Path(path).name,
            "sha256": report.source_sha256 or sha256_file(path),
            "time_unit": report.time_unit, "id_gaps": report.n_gaps,
            "rows": trades.height, "kind": found_kind, "market": report.market}
    if trades.height == 0 or found_kind != kind:
        return {**info, "skipped": f"kind {found_kind} (preparing {kind})" if found_kind != kind else "empty"}
    # The stream key (`BTCUSDT`, `BTCUSDT.um`) names events, shards, baselines and report
    # rows from here on: spot and futures of one symbol are different markets.
    symbol = stream_key(trades["symbol"][0], report.market)
    # Named by input index until the parts are ordered in time (then renamed part-NNNNN).
    events_rel = f"events/{symbol}/input-{index:05d}.parquet"
    stem = work / symbol / f"input-{index:05d}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(out_root, events_rel).parent.mkdir(parents=True, exist_ok=True)
    events = compute_events(trades, event_cfg)
    # Stored without what the manifest already knows (symbol) or readers number (segment).
    events.drop("segment", "symbol").write_parquet(Path(out_root, events_rel), compression="lz4")
    edge = event_cfg.size_window + 1
    trades.head(edge).write_parquet(f"{stem}.head.parquet")
    trades.tail(edge).write_parquet(f"{stem}.tail.parquet")
    return {**info, "symbol": symbol, "stem": str(stem), "events": events_rel, "n": events.height,
            "n_segment_starts": int(events["segment_start"].sum()),
            "first_time_us": int(trades["time_us"][0]), "last_time_us": int(trades["time_us"][-1]),
            "first_id": int(trades["trade_id"][0]), "last_id": int(trades["trade_id"][-1])}


def _name_parts(root: Path, parts: dict[str, list[dict]]) -> None:
    """Rename each symbol's event files part-00000, part-00001, ... in time order."""
    for symbol, metas in parts.items():
        for i, meta in enumerate(metas):
            final = f"events/{symbol}/part-{i:05d}.parquet"
            Path(root, meta["events"]).rename(root / final)
            meta["events"] = final


def _patch_heads(root: Path, parts: dict[str, list[dict]], event_cfg: EventConfig) -> None:
    """Recompute each file's first events with the previous file's tail as causal context.

    Writes them to ``part-NNNNN.head.parquet`` and updates the part's segment-start count;
    then numbers segments across a symbol's files (``segment_offset``).
    """
    for metas in parts.values():
        offset = 0
        for i, meta in enumerate(metas):
            meta["head"] = None
            if i:
                head = pl.read_parquet(meta["stem"] + ".head.parquet")
                context = pl.read_parquet(metas[i - 1]["stem"] + ".tail.parquet")
                patch = compute_events(head, event_cfg, context=context).head(event_cfg.size_window)
                unpatched = pl.read_parquet(root / meta["events"], columns=["segment_start"],
                                            n_rows=patch.height)
                meta["n_segment_starts"] += int(patch["segment_start"].sum()) - int(unpatched["segment_start"].sum())
                meta["head"] = meta["events"].removesuffix(".parquet") + ".head.parquet"
                meta["head_rows"] = patch.height
                patch.drop("segment", "symbol").write_parquet(root / meta["head"], compression="lz4")
            meta["segment_offset"] = offset
            offset += meta["n_segment_starts"]


def _scan_part(root: Path, part: dict, symbol: str) -> pl.LazyFrame:
    """One file's stored events with its patched head in place, its symbol, and global
    segment ids (segment starts counted across the symbol's earlier files)."""
    segment = pl.col("segment_start").cast(pl.Int32).cum_sum() - 1 + part["segment_offset"]
    return _scan_part_rows(root, part, symbol).with_columns(
        segment=segment.cast(pl.Int32)).select(EVENT_COLUMNS)


def _scan_part_rows(root: Path, part: dict, symbol: str) -> pl.LazyFrame:
    """One file's stored events with its patched head, its symbol and no segment ids (see
    ``ShardSet._rows``: global ids need every earlier row, so a slice would read them all)."""
    events = pl.scan_parquet(root / part["events"])
    if part.get("head"):
        head = pl.scan_parquet(root / part["head"])
        events = pl.concat([head, events.slice(part["head_rows"])])
    return events.with_columns(symbol=pl.lit(symbol, dtype=pl.Utf8)).select(
        [c for c in EVENT_COLUMNS if c != "segment"])


def _encode_part(root: str, symbol: str, part: dict, tokenizer_path: str, offset: int,
                 cuts: dict, bin_stem: str) -> dict:
    """Worker: one file's events -> per-split token arrays, a SEG token before each segment.

    ``cuts`` maps split -> (lo, hi) global event indices of that split for this symbol;
    ``offset`` is the global index of this file's first event.
    """
    tokenizer = Tokenizer.load(tokenizer_path)
    columns = ["time_us", "side", "move_bps", "log_size", "dt_us", "segment_start"]
    events = _scan_part(Path(root), part, symbol).select(columns).collect()
    tokens = tokenizer.encode(events)
    result = {}
    for split, (lo, hi) in cuts.items():
        first, last = max(lo - offset, 0), min(hi - offset, events.height)
        if last <= first:
            continue
        # A segment-start token opens every shard and every segment inside it.
        opens = events["segment_start"].slice(first, last - first).to_numpy().copy()
        if offset + first == lo:
            opens[0] = True
        with_seg = np.insert(tokens[first:last], np.flatnonzero(opens), tokenizer.seg_id)
        bin_path = f"{bin_stem}.{split}.bin"
        with_seg.astype(TOKEN_DTYPE).tofile(bin_path)
        result[split] = {"bin": bin_path, "n_tokens": len(with_seg), "n_events": last - first,
                         "first_time_us": int(events["time_us"][first]),
                         "last_time_us": int(events["time_us"][last - 1])}
    return result


def _parse_time_us(text: str) -> int:
    stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return int(stamp.timestamp() * 1_000_000)


class _SymbolTimes:
    """Event times of one symbol's parts, read a part at a time (never all in memory)."""

    def __init__(self, root: Path, metas: list[dict]):
        self.root, self.metas = root, metas
        self.n = sum(m["n"] for m in metas)
        self._last: tuple[str, np.ndarray] | None = None  # split edges cluster in one part

    def _times(self, meta: dict) -> np.ndarray:
        if self._last is None or self._last[0] != meta["events"]:
            times = pl.read_parquet(self.root / meta["events"], columns=["time_us"])["time_us"]
            self._last = (meta["events"], times.to_numpy())
        return self._last[1]

    def at(self, i: int) -> int:
        for meta in self.metas:
            if i < meta["n"]:
                return int(self._times(meta)[i])
            i -= meta["n"]
        raise IndexError(i)

    def index_of(self, time_us: int) -> int:
        """Global index of the first event at or after time_us."""
        offset = 0
        for meta in self.metas:
            if meta["last_time_us"] >= time_us:
                return offset + int(np.searchsorted(self._times(meta), time_us, side="left"))
            offset += meta["n"]
        return offset


def _split_cuts(times: _SymbolTimes, cfg: PrepareConfig, held_out: bool = False) -> tuple[dict, dict]:
    """Global (lo, hi) event indices per split and the boundary timestamps, for one symbol
    (``held_out``: every event to backtest)."""
    n = times.n
    if held_out:
        i_val = i_bt = 0
    elif cfg.split_times:
        i_val, i_bt = (times.index_of(_parse_time_us(t)) for t in cfg.split_times)
    else:
        i_val = int(n * cfg.splits[0])
        i_bt = int(n * (cfg.splits[0] + cfg.splits[1]))
    gap = cfg.gap
    # The gap separates a split from the one before it; a split at the very start (empty
    # splits before it, e.g. all events to backtest) has nothing to be separated from.
    cuts = {"train": (0, i_val), "validation": (min(i_val + gap, i_bt) if i_val else 0, i_bt),
            "backtest": (min(i_bt + gap, n) if i_bt else 0, n)}
    bounds = {}
    for split, (lo, hi) in cuts.items():
        bounds[f"{split}_start_us"] = times.at(lo) if hi > lo else None
        bounds[f"{split}_end_us"] = times.at(hi - 1) if hi > lo else None
    bounds["gap_events"] = gap
    return cuts, bounds


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, cfg: PrepareConfig = PrepareConfig(),
            show_progress: bool = False, reuse_tokenizer: str | Path | None = None) -> dict:
    """Raw trade files -> OUT/{manifest.json, tokenizer.json, shards/, events/}, atomically.

    ``reuse_tokenizer`` (a tokenizer.json, a run folder or a prepared data dir): encode
    with that fitted tokenizer instead of fitting one (`resolve_reused_tokenizer`).
    """
    files = expand_inputs(inputs)
    out_dir = Path(out_dir)
    reused = resolve_reused_tokenizer(reuse_tokenizer) if reuse_tokenizer is not None else None
    pool = _Workers(cfg.workers, show_progress)
    try:
        return _prepare(files, inputs, out_dir, cfg, pool, reused)
    finally:
        pool.close()


def _held_out(stream: str, cfg: PrepareConfig) -> bool:
    return stream in cfg.holdout_symbols or stream.partition(".")[0] in cfg.holdout_symbols


def _prepare(files: list[Path], inputs: Sequence, out_dir: Path, cfg: PrepareConfig, pool: _Workers,
             reused: ReusedTokenizer | None = None) -> dict:
    with atomic_dir(out_dir) as tmp:
        work = tmp / "_work"
        work.mkdir()
        jobs = [(f, cfg.kind, tmp, work, cfg.events, i, cfg.market) for i, f in enumerate(files)]
        read = pool.map(_read_input, jobs, "reading + events")
        used = [r for r in read if "stem" in r and (not cfg.symbols or r["symbol"] in cfg.symbols)]
        if not used:
            raise DataError(f"no {cfg.kind} trades found in the inputs", ", ".join(map(str, inputs)))
        parts = _order_parts(used)
        kept = {id(m) for metas in parts.values() for m in metas}
        for r in read:  # other symbols, repeated files
            if "events" in r and id(r) not in kept:
                Path(tmp, r["events"]).unlink()
        _name_parts(tmp, parts)
        _patch_heads(tmp, parts, cfg.events)
        events_index = {symbol: [_part_entry(m) for m in metas] for symbol, metas in parts.items()}

        cuts, boundaries = {}, {}
        for symbol, metas in parts.items():
            cuts[symbol], boundaries[symbol] = _split_cuts(_SymbolTimes(tmp, metas), cfg,
                                                           held_out=_held_out(symbol, cfg))

        tokenizer_path = tmp / "tokenizer.json"
        if reused is None:
            tokenizer = Tokenizer.fit(_training_sample(tmp, events_index, cuts, cfg), cfg.tokenizer)
            tokenizer.save(tokenizer_path, fitted_on="train split only", inputs=[r["sha256"] for r in used])
        else:  # never refit: the run's token ids must keep their meaning
            tokenizer = reused.tokenizer
            shutil.copyfile(reused.source, tokenizer_path)

        encode_jobs = []
        for symbol, entries in events_index.items():
            offset = 0
            for meta, entry in zip(parts[symbol], entries):
                encode_jobs.append((str(tmp), symbol, entry, str(tokenizer_path), offset,
                                    cuts[symbol], meta["stem"]))
                offset += entry["n_events"]
        encoded = pool.map(_encode_part, encode_jobs, "tokenizing")
        shards = _assemble_shards(tmp, parts, encoded, cuts, cfg)
        shutil.rmtree(work)

        private = ("stem", "events", "head", "head_rows", "segment_offset")
        inputs_info = [{k: v for k, v in r.items() if k not in private} for r in read]
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": cfg.kind,
            "tokenizer_hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "config": to_dict(cfg),
            "inputs": inputs_info,
            "boundaries": boundaries,
            "shards": shards,
            "events": events_index,
            "token_stats": _token_stats(tmp, shards, tokenizer),
            "outliers": outlier_counts(tmp, shards, tokenizer),
            "held_out_streams": sorted(s for s in parts if _held_out(s, cfg)),
        }
        source = {}
        if reused is not None:
            manifest["tokenizer_reuse"] = {"hash": tokenizer.hash,
                                           "train_manifest_hash": reused.train_manifest_hash,
                                           "train_streams": None if reused.train_streams is None
                                           else list(reused.train_streams)}
            source = {"tokenizer_source": str(reused.source),
                      "train_data_dir": str(reused.train_data_dir) if reused.train_data_dir else None}
        manifest["manifest_hash"] = _content_hash(manifest)
        manifest["provenance"] = provenance(stage="prepare", **source)
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest


def _content_hash(manifest: dict) -> str:
    """Hash of what the data IS (input contents, config, tokens), not where or how fast it
    was made: local paths and the worker count are left out, so equal inputs give equal hashes."""
    content = {**manifest, "config": {k: v for k, v in manifest["config"].items() if k != "workers"},
               "inputs": [{k: v for k, v in i.items() if k != "path"} for i in manifest["inputs"]]}
    return json_hash(content)


def _order_parts(metas: list[dict]) -> dict[str, list[dict]]:
    """Group parts by symbol in time order; refuse overlapping inputs, drop exact repeats."""
    by_symbol: dict[str, list[dict]] = {}
    for meta in sorted(metas, key=lambda m: (m["symbol"], m["first_time_us"], m["first_id"])):
        group = by_symbol.setdefault(meta["symbol"], [])
        if group and meta["sha256"] == group[-1]["sha256"]:
            continue  # the same file given twice
        if group and meta["first_id"] <= group[-1]["last_id"]:
            raise DataError(
                f"trade ids overlap with {group[-1]['path']} (ids up to {group[-1]['last_id']}, "
                f"this file starts at {meta['first_id']})", meta["path"])
        group.append(meta)
    return by_symbol


def _part_entry(meta: dict) -> dict:
    """A part as the manifest lists it under ``events`` (see `ShardSet.events`)."""
    return {"events": meta["events"], "head": meta["head"], "head_rows": meta.get("head_rows", 0),
            "n_events": meta["n"], "segment_offset": meta["segment_offset"],
            "first_time_us": meta["first_time_us"], "last_time_us": meta["last_time_us"]}


def _training_sample(root: Path, events_index: dict, cuts: dict, cfg: PrepareConfig) -> pl.DataFrame:
    """A bounded, seeded sample of TRAINING events (never a held-out row) to fit bins on."""
    n_train = sum(cuts[s]["train"][1] for s in cuts)
    keep = min(1.0, cfg.tokenizer.fit_sample / max(n_train, 1))
    frames = []
    for symbol, entries in events_index.items():
        offset, (lo, hi) = 0, cuts[symbol]["train"]
        for entry in entries:
            take_lo, take_hi = max(lo - offset, 0), min(hi - offset, entry["n_events"])
            if take_hi > take_lo:
                # symbol and segment starts: the move's decoding context is fitted per
                # stream, in time order (a row sample keeps the order)
                frame = (_scan_part(root, entry, symbol)
                         .select("move_bps", "log_size", "dt_us", "side", "segment_start")
                         .slice(take_lo, take_hi - take_lo).collect()
                         .with_columns(symbol=pl.lit(symbol)))
                if keep < 1.0:
                    frame = frame.sample(fraction=keep, seed=len(frames))
                frames.append(frame)
            offset += entry["n_events"]
    if not frames:
        raise DataError("the train split is empty; give more data or change `splits`")
    return pl.concat(frames)


def _assemble_shards(tmp: Path, parts: dict, encoded: list, cuts: dict, cfg: PrepareConfig) -> dict:
    """Concatenate each file's token arrays, in time order, into one shard per (split, symbol)."""
    shards: dict[str, dict] = {split: {} for split in SPLITS}
    symbols = [symbol for symbol, metas in parts.items() for _ in metas]
    for symbol, result in zip(symbols, encoded):
        for split, info in result.items():
            shard = shards[split].setdefault(symbol, {
                "tokens": f"shards/{split}/{symbol}.bin", "rows": list(cuts[symbol][split]),
                "n_tokens": 0, "n_events": 0,
                "start_time_us": info["first_time_us"], "end_time_us": None})
            path = tmp / shard["tokens"]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as handle:
                handle.write(Path(info["bin"]).read_bytes())
            shard["n_tokens"] += info["n_tokens"]
            shard["n_events"] += info["n_events"]
            shard["end_time_us"] = info["last_time_us"]
    for by_symbol in shards.values():
        for shard in by_symbol.values():
            shard["n_windows"] = n_windows(shard["n_tokens"], cfg.block_size, cfg.stride)
    return shards


def _token_stats(root: Path, shards: dict, tokenizer: Tokenizer, chunk: int = 1 << 20) -> dict:
    """Realized and effective vocabulary (exp of the entropy) per split, read in chunks."""
    stats = {}
    for split, by_symbol in shards.items():
        counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        for info in by_symbol.values():
            tokens = np.memmap(root / info["tokens"], dtype=TOKEN_DTYPE, mode="r")
            for lo in range(0, len(tokens), chunk):
                counts += np.bincount(tokens[lo:lo + chunk], minlength=tokenizer.vocab_size)
        events = counts[: tokenizer.n_event_tokens]
        total = events.sum()
        p = events[events > 0] / max(total, 1)
        stats[split] = {"n_tokens": int(counts.sum()), "n_events": int(total),
                        "realized_vocab": int((events > 0).sum()),
                        "effective_vocab": float(np.exp(-(p * np.log(p)).sum())) if total else 0.0}
    return stats
