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

import datetime as dt
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mega_trading.config import to_dict
from mega_trading.errors import DataError
from mega_trading.events import EventConfig, compute_events
from mega_trading.lineage import (
    atomic_dir,
    json_hash,
    provenance,
    read_json,
    sha256_file,
    write_json_atomic,
)
from mega_trading.tokenizer import Tokenizer, TokenizerConfig

SPLITS = ("train", "validation", "backtest")
MANIFEST_FORMAT = "mega-trading/shards@1"
TOKEN_DTYPE = np.uint16


@dataclass(frozen=True)
class PrepareConfig:
    block_size: int = 512
    stride: int = 256
    splits: tuple[float, ...] = (0.8, 0.1, 0.1)
    split_times: tuple[str, ...] = ()  # two ISO UTC timestamps: validation start, backtest start
    gap_events: int | None = None  # events dropped after each boundary; default block_size
    kind: str = "trades"  # trades or aggTrades: one event grammar per data set
    symbols: tuple[str, ...] = ()  # empty: every symbol found
    workers: int = 2
    events: EventConfig = field(default_factory=EventConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        if len(self.splits) != 3 or abs(sum(self.splits) - 1.0) > 1e-6 or min(self.splits) < 0:
            raise DataError(f"splits must be three non-negative fractions summing to 1, got {self.splits}")
        if self.split_times and len(self.split_times) != 2:
            raise DataError("split_times takes two timestamps: validation start, backtest start")
        if self.block_size < 2 or self.stride < 1:
            raise DataError("block_size must be >= 2 and stride >= 1")

    @property
    def gap(self) -> int:
        return self.block_size if self.gap_events is None else self.gap_events


# --- windows ------------------------------------------------------------------------------

def window_starts(n_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """Starts of the windows of block_size + 1 tokens (inputs + shifted targets) in a shard."""
    last = n_tokens - (block_size + 1)
    if last < 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, last + 1, stride, dtype=np.int64)


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
        if manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"unknown manifest format {manifest.get('format')!r}", manifest_path)
        tokenizer = Tokenizer.load(root / "tokenizer.json")
        if tokenizer.hash != manifest["tokenizer_hash"]:
            raise DataError("tokenizer.json does not match the manifest's tokenizer hash", root)
        return cls(root, manifest, tokenizer)

    @property
    def manifest_hash(self) -> str:
        return self.manifest["manifest_hash"]

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.hash

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def symbols(self, split: str) -> list[str]:
        return sorted(self.manifest["shards"].get(split, {}))

    def n_tokens(self, split: str, symbol: str) -> int:
        return int(self.manifest["shards"][split][symbol]["n_tokens"])

    def tokens(self, split: str, symbol: str) -> np.ndarray:
        info = self.manifest["shards"][split][symbol]
        if info["n_tokens"] == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.memmap(self.root / info["tokens"], dtype=TOKEN_DTYPE, mode="r")

    def events(self, split: str, symbol: str) -> pl.DataFrame:
        """The shard's event rows; ``token_pos`` indexes ``tokens(split, symbol)``."""
        parts = self.manifest["shards"][split][symbol]["parts"]
        return pl.concat([
            pl.read_parquet(self.root / part["events"]).with_columns(pl.col("token_pos") + part["token_offset"])
            for part in parts
        ])

    def all_events(self, split: str) -> pl.DataFrame:
        frames = [self.events(split, s) for s in self.symbols(split)]
        return pl.concat(frames) if frames else pl.DataFrame()


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
        self.symbols = [s for s in shards.symbols(split)
                        if len(window_starts(shards.n_tokens(split, s), block_size, stride))]
        if not self.symbols:
            raise DataError(
                f"no {split} window of {block_size + 1} tokens fits in any shard; "
                f"use a smaller block_size", shards.root)
        self._tokens = {s: shards.tokens(split, s) for s in self.symbols}
        self._starts = [window_starts(len(self._tokens[s]), block_size, stride) for s in self.symbols]
        counts = np.array([len(st) for st in self._starts], dtype=np.float64)
        self._weights = counts / counts.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.seen = {s: 0 for s in self.symbols}
        self.batches_drawn = 0

    @property
    def windows_per_symbol(self) -> dict[str, int]:
        return {s: len(st) for s, st in zip(self.symbols, self._starts)}

    def next_batch(self):
        import torch

        global_batch = self.batch_size * self.world_size
        which = self.rng.choice(len(self.symbols), size=global_batch, p=self._weights)
        picks = [int(self.rng.integers(len(self._starts[i]))) for i in which]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows, names = [], []
        for i, pick in zip(which[lo:hi], picks[lo:hi]):
            symbol = self.symbols[i]
            start = int(self._starts[i][pick])
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


def _read_input(path: Path, kind: str, work: Path, event_cfg: EventConfig) -> dict:
    """Worker: one raw file -> its events (computed without context) and edge rows.

    Fusing read and feature computation avoids a scratch copy of the trades. The first
    ``size_window`` events of a file depend on the previous file's last trades; they are
    recomputed later from the saved edge rows (``_patch_heads``), which is exact.
    """
    from mega_trading.ingest.reader import read_trades_with_report

    trades, report = read_trades_with_report(path)
    found_kind = trades["kind"][0] if trades.height else kind
    info = {"path": str(path), "name": Path(path).name,
            "sha256": report.source_sha256 or sha256_file(path),
            "time_unit": report.time_unit, "id_gaps": report.n_gaps,
            "rows": trades.height, "kind": found_kind}
    if trades.height == 0 or found_kind != kind:
        return {**info, "skipped": f"kind {found_kind} (preparing {kind})" if found_kind != kind else "empty"}
    symbol = trades["symbol"][0]
    stem = work / "parts" / symbol / f"{trades['time_us'][0]:020d}_{info['sha256'][:8]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    events = compute_events(trades, event_cfg)
    events.write_parquet(f"{stem}.events.parquet", compression="uncompressed")  # scratch: speed over size
    edge = event_cfg.size_window + 1
    trades.head(edge).write_parquet(f"{stem}.head.parquet")
    trades.tail(edge).write_parquet(f"{stem}.tail.parquet")
    return {**info, "symbol": symbol, "stem": str(stem), "n": events.height,
            "n_segment_starts": int(events["segment_start"].sum()),
            "first_time_us": int(trades["time_us"][0]), "last_time_us": int(trades["time_us"][-1]),
            "first_id": int(trades["trade_id"][0]), "last_id": int(trades["trade_id"][-1])}


def _patch_heads(parts: dict[str, list[dict]], event_cfg: EventConfig) -> None:
    """Recompute each file's first events with the previous file's tail as causal context.

    Writes ``<stem>.patch.parquet`` and updates the part's segment-start count; then numbers
    segments across a symbol's files (``segment_offset``).
    """
    for metas in parts.values():
        offset = 0
        for i, meta in enumerate(metas):
            if i:
                head = pl.read_parquet(meta["stem"] + ".head.parquet")
                context = pl.read_parquet(metas[i - 1]["stem"] + ".tail.parquet")
                patch = compute_events(head, event_cfg, context=context).head(event_cfg.size_window)
                unpatched = pl.read_parquet(meta["stem"] + ".events.parquet", n_rows=patch.height)
                meta["n_segment_starts"] += int(patch["segment_start"].sum()) - int(unpatched["segment_start"].sum())
                patch.write_parquet(meta["stem"] + ".patch.parquet")
            meta["segment_offset"] = offset
            offset += meta["n_segment_starts"]


def _load_part_events(meta: dict) -> pl.DataFrame:
    events = pl.read_parquet(meta["stem"] + ".events.parquet")
    patch_path = Path(meta["stem"] + ".patch.parquet")
    if patch_path.exists():
        patch = pl.read_parquet(patch_path)
        events = pl.concat([patch, events.slice(patch.height)])
    # Global segment ids: starts counted across the symbol's earlier files.
    return events.with_columns(
        segment=(pl.col("segment_start").cast(pl.Int32).cum_sum() - 1 + meta["segment_offset"]).cast(pl.Int32))


def _encode_part(meta: dict, tokenizer_path: str, offset: int, cuts: dict, out_root: str, index: int) -> dict:
    """Worker: one file's events -> per-split token arrays (SEG inserted) and event rows.

    ``cuts`` maps split -> (lo, hi) global event indices of that split for this symbol;
    ``offset`` is the global index of this file's first event. Event rows are written
    straight into their final place, ``events/<split>/<SYMBOL>/part-<index>.parquet``, with
    ``token_pos`` relative to this part (the manifest records each part's token offset).
    """
    tokenizer = Tokenizer.load(tokenizer_path)
    events = _load_part_events(meta)
    tokens = tokenizer.encode(events)
    global_index = np.arange(offset, offset + events.height)
    symbol, result = meta["symbol"], {}
    for split, (lo, hi) in cuts.items():
        mask = (global_index >= lo) & (global_index < hi)
        if not mask.any():
            continue
        split_events = events.filter(pl.Series(mask))
        split_tokens = tokens[mask]
        # A segment-start token opens every shard and every segment inside it.
        opens = split_events["segment_start"].to_numpy().copy()
        if offset + int(np.flatnonzero(mask)[0]) == lo:
            opens[0] = True
        with_seg = np.insert(split_tokens, np.flatnonzero(opens), tokenizer.seg_id).astype(TOKEN_DTYPE)
        local_pos = np.arange(len(split_tokens)) + np.cumsum(opens)
        split_events = split_events.with_columns(token=pl.Series(split_tokens, dtype=pl.Int32),
                                                 token_pos=pl.Series(local_pos, dtype=pl.Int64))
        rel = f"events/{split}/{symbol}/part-{index:05d}.parquet"
        Path(out_root, rel).parent.mkdir(parents=True, exist_ok=True)
        split_events.write_parquet(Path(out_root, rel), compression="lz4")
        bin_path = Path(meta["stem"] + f".{split}.bin")
        with_seg.tofile(bin_path)
        result[split] = {"bin": str(bin_path), "events": rel, "n_tokens": len(with_seg),
                         "n_events": len(split_tokens),
                         "first_time_us": int(split_events["time_us"][0]),
                         "last_time_us": int(split_events["time_us"][-1])}
    return result


def _parse_time_us(text: str) -> int:
    stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return int(stamp.timestamp() * 1_000_000)


def _split_cuts(times: np.ndarray, cfg: PrepareConfig) -> tuple[dict, dict]:
    """Global (lo, hi) event indices per split and the boundary timestamps, for one symbol."""
    n = len(times)
    if cfg.split_times:
        i_val, i_bt = (int(np.searchsorted(times, _parse_time_us(t), side="left")) for t in cfg.split_times)
    else:
        i_val = int(n * cfg.splits[0])
        i_bt = int(n * (cfg.splits[0] + cfg.splits[1]))
    gap = cfg.gap
    cuts = {"train": (0, i_val), "validation": (min(i_val + gap, i_bt), i_bt),
            "backtest": (min(i_bt + gap, n), n)}

    def stamp(i: int) -> int | None:
        return int(times[i]) if 0 <= i < n else None

    bounds = {}
    for split, (lo, hi) in cuts.items():
        bounds[f"{split}_start_us"] = stamp(lo) if hi > lo else None
        bounds[f"{split}_end_us"] = stamp(hi - 1) if hi > lo else None
    bounds["gap_events"] = gap
    return cuts, bounds


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, cfg: PrepareConfig = PrepareConfig(),
            show_progress: bool = False) -> dict:
    """Raw trade files -> OUT/{manifest.json, tokenizer.json, shards/, events/}, atomically."""
    files = expand_inputs(inputs)
    out_dir = Path(out_dir)
    pool = _Workers(cfg.workers, show_progress)
    try:
        return _prepare(files, inputs, out_dir, cfg, pool)
    finally:
        pool.close()


def _prepare(files: list[Path], inputs: Sequence, out_dir: Path, cfg: PrepareConfig, pool: _Workers) -> dict:
    with atomic_dir(out_dir) as tmp:
        work = tmp / "_work"
        work.mkdir()
        jobs = [(f, cfg.kind, work, cfg.events) for f in files]
        read = pool.map(_read_input, jobs, "reading + events")
        used = [r for r in read if "stem" in r and (not cfg.symbols or r["symbol"] in cfg.symbols)]
        if not used:
            raise DataError(f"no {cfg.kind} trades found in the inputs", ", ".join(map(str, inputs)))
        parts = _order_parts(used)
        _patch_heads(parts, cfg.events)

        cuts, boundaries = {}, {}
        for symbol, metas in parts.items():
            times = np.concatenate([pl.read_parquet(m["stem"] + ".events.parquet", columns=["time_us"])
                                    ["time_us"].to_numpy() for m in metas])
            cuts[symbol], boundaries[symbol] = _split_cuts(times, cfg)

        tokenizer = Tokenizer.fit(_training_sample(parts, cuts, cfg), cfg.tokenizer)
        tokenizer_path = tmp / "tokenizer.json"
        tokenizer.save(tokenizer_path, fitted_on="train split only", inputs=[r["sha256"] for r in used])

        encode_jobs = []
        for symbol, metas in parts.items():
            offset = 0
            for i, meta in enumerate(metas):
                encode_jobs.append((meta, str(tokenizer_path), offset, cuts[symbol], str(tmp), i))
                offset += meta["n"]
        encoded = pool.map(_encode_part, encode_jobs, "tokenizing")
        shards = _assemble_shards(tmp, encode_jobs, encoded, cfg)
        shutil.rmtree(work)

        inputs_info = [{k: v for k, v in r.items() if k not in ("stem", "segment_offset")} for r in read]
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": cfg.kind,
            "tokenizer_hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "config": to_dict(cfg),
            "inputs": inputs_info,
            "boundaries": boundaries,
            "shards": shards,
            "token_stats": _token_stats(tmp, shards, tokenizer),
        }
        manifest["manifest_hash"] = _content_hash(manifest)
        manifest["provenance"] = provenance(stage="prepare")
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


def _training_sample(parts: dict, cuts: dict, cfg: PrepareConfig) -> pl.DataFrame:
    """A bounded, seeded sample of TRAINING events (never a held-out row) to fit bins on."""
    n_train = sum(cuts[s]["train"][1] for s in cuts)
    keep = min(1.0, cfg.tokenizer.fit_sample / max(n_train, 1))
    frames = []
    for symbol, metas in parts.items():
        offset, (lo, hi) = 0, cuts[symbol]["train"]
        for meta in metas:
            take_lo, take_hi = max(lo - offset, 0), min(hi - offset, meta["n"])
            if take_hi > take_lo:
                frame = _load_part_events(meta).select("move_bps", "log_size", "dt_us", "side")
                frame = frame.slice(take_lo, take_hi - take_lo)
                if keep < 1.0:
                    frame = frame.sample(fraction=keep, seed=len(frames))
                frames.append(frame)
            offset += meta["n"]
    if not frames:
        raise DataError("the train split is empty; give more data or change `splits`")
    return pl.concat(frames)


def _assemble_shards(tmp: Path, jobs: list, encoded: list, cfg: PrepareConfig) -> dict:
    """Concatenate each file's token arrays, in time order, into one shard per (split, symbol)."""
    shards: dict[str, dict] = {split: {} for split in SPLITS}
    for job, result in zip(jobs, encoded):
        symbol = job[0]["symbol"]
        for split, info in result.items():
            shard = shards[split].setdefault(symbol, {
                "tokens": f"shards/{split}/{symbol}.bin", "events": f"events/{split}/{symbol}",
                "parts": [], "n_tokens": 0, "n_events": 0,
                "start_time_us": info["first_time_us"], "end_time_us": None})
            path = tmp / shard["tokens"]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as handle:
                handle.write(Path(info["bin"]).read_bytes())
            shard["parts"].append({"events": info["events"], "token_offset": shard["n_tokens"]})
            shard["n_tokens"] += info["n_tokens"]
            shard["n_events"] += info["n_events"]
            shard["end_time_us"] = info["last_time_us"]
    for by_symbol in shards.values():
        for shard in by_symbol.values():
            shard["n_windows"] = len(window_starts(shard["n_tokens"], cfg.block_size, cfg.stride))
    return shards


def _token_stats(root: Path, shards: dict, tokenizer: Tokenizer, chunk: int = 1 << 24) -> dict:
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
