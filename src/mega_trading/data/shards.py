"""Read access to a prepared data directory: token shards (memory-mapped), stored events,
and the rows a caller anchors on, read alone (see docs/CONTRACTS.md).

The split contract (per symbol, in time order)::

    | train ............ | gap | validation ... | gap | backtest ... |

Each (split, symbol) is its own shard file opening with a SEG token; ``data.prepare``
writes them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.core.lineage import (
    read_json,
)
from mega_trading.data.events import EVENT_COLUMNS, EventConfig
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.data.windows import window_plan

SPLITS = ("train", "validation", "backtest")
MANIFEST_FORMAT = "mega-trading/shards@2"
TOKEN_DTYPE = np.uint16



def scan_part(root: Path, part: dict, symbol: str) -> pl.LazyFrame:
    """One file's stored events with its patched head in place, its symbol, and global
    segment ids (segment starts counted across the symbol's earlier files)."""
    segment = pl.col("segment_start").cast(pl.Int32).cum_sum() - 1 + part["segment_offset"]
    return scan_part_rows(root, part, symbol).with_columns(
        segment=segment.cast(pl.Int32)).select(EVENT_COLUMNS)


def scan_part_rows(root: Path, part: dict, symbol: str) -> pl.LazyFrame:
    """One file's stored events with its patched head, its symbol and no segment ids (see
    ``ShardSet._rows``: global ids need every earlier row, so a slice would read them all)."""
    events = pl.scan_parquet(root / part["events"])
    if part.get("head"):
        head = pl.scan_parquet(root / part["head"])
        events = pl.concat([head, events.slice(part["head_rows"])])
    return events.with_columns(symbol=pl.lit(symbol, dtype=pl.Utf8)).select(
        [c for c in EVENT_COLUMNS if c != "segment"])


@dataclass(frozen=True)
class WindowAnchor:
    """Where a window's continuation starts: its last real trade (price, time) and the
    notional level the next event's size is measured against."""

    trade_id: int
    price: float
    time_us: int
    size_level: float


def next_size_level(event: pl.DataFrame, size_window: int) -> float:
    """Notional level (quote currency) the event after `event` (one row) is measured
    against: the causal rolling mean of log notionals of ``data.events``, moved one trade on."""
    ln_q = math.log(float(event["quote_qty"][0]))
    level = ln_q - float(event["log_size"][0])
    return math.exp(level + (ln_q - level) / size_window)


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
        scan = scan_part if global_segments else scan_part_rows
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

    @property
    def size_window(self) -> int:
        """Trades in the causal size level (``EventConfig.size_window``) this data used."""
        events_cfg = self.manifest.get("config", {}).get("events", {})
        return int(events_cfg.get("size_window", EventConfig().size_window))

    def window(self, split: str, symbol: str, start: int, length: int,
               seg_positions: np.ndarray | None = None) -> tuple[np.ndarray, WindowAnchor]:
        """Tokens [start, start + length) of a shard and their anchor: the last real trade at
        or before the window's end, read alone (never the whole split). The one rule for
        every prompt taken from the data (generate's prompts, the rollout service's windows)."""
        tokens = self.tokens(split, symbol)
        if start < 0 or length < 1 or start + length > len(tokens):
            raise DataError(f"window [{start}, {start + length}) does not fit in the {split} "
                            f"shard of {symbol} ({len(tokens)} tokens)", self.root)
        last = self.event_at_token(split, symbol, start + length - 1, seg_positions)
        anchor = WindowAnchor(trade_id=int(last["trade_id"][0]), price=float(last["price"][0]),
                              time_us=int(last["time_us"][0]),
                              size_level=next_size_level(last, self.size_window))
        return np.asarray(tokens[start:start + length], dtype=np.int64), anchor

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

