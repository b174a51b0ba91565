"""Prepare's per-file work, run in worker processes: read one input file into an events
part, patch part heads so causal features continue across files, and encode a part into
per-split token arrays. Every input file is processed on its own, so memory stays bounded
however large the input."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from mega_trading.core.errors import DataError
from mega_trading.core.lineage import (
    sha256_file,
)
from mega_trading.data.events import EventConfig, compute_events
from mega_trading.data.ingest.reader import read_trades_with_report
from mega_trading.data.ingest.schema import stream_key
from mega_trading.data.shards import TOKEN_DTYPE, scan_part
from mega_trading.data.tokenizer import Tokenizer

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


class Workers:
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


def read_input(path: Path, kind: str, out_root: Path, work: Path, event_cfg: EventConfig,
                index: int, market: str | None = None) -> dict:
    """Worker: one raw file -> its events, written once, where they stay, plus edge rows.

    Fusing read and feature computation avoids a scratch copy of the trades. The first
    ``size_window`` events of a file depend on the previous file's last trades; they are
    recomputed later from the saved edge rows (``patch_heads``, exact) and stored beside
    the file's events as its head, which readers put in place of the first rows.
    """

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


def name_parts(root: Path, parts: dict[str, list[dict]]) -> None:
    """Rename each symbol's event files part-00000, part-00001, ... in time order."""
    for symbol, metas in parts.items():
        for i, meta in enumerate(metas):
            final = f"events/{symbol}/part-{i:05d}.parquet"
            Path(root, meta["events"]).rename(root / final)
            meta["events"] = final


def patch_heads(root: Path, parts: dict[str, list[dict]], event_cfg: EventConfig) -> None:
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



def encode_part(root: str, symbol: str, part: dict, tokenizer_path: str, offset: int,
                 cuts: dict, bin_stem: str) -> dict:
    """Worker: one file's events -> per-split token arrays, a SEG token before each segment.

    ``cuts`` maps split -> (lo, hi) global event indices of that split for this symbol;
    ``offset`` is the global index of this file's first event.
    """
    tokenizer = Tokenizer.load(tokenizer_path)
    columns = ["time_us", "side", "move_bps", "log_size", "dt_us", "segment_start"]
    events = scan_part(Path(root), part, symbol).select(columns).collect()
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


