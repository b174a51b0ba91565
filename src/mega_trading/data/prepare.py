"""Raw trade files -> a prepared data directory: chronological per-symbol splits with
gaps, a tokenizer fitted on training events only, token shards, and the manifest.

The split contract (per symbol, in time order)::

    | train ............ | gap | validation ... | gap | backtest ... |

* Boundaries are cut by event-count fractions (``splits``) or explicit UTC timestamps
  (``split_times``) and recorded as timestamps in the manifest.
* ``gap_events`` events (default: one block) are dropped after each boundary, so the
  held-out stretch starts well after the last training event.
* Each (split, symbol) is its own shard file: a window lies wholly inside one shard, so no
  window ever straddles a split boundary.
* The tokenizer is fitted on training events only, on a bounded sample."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
from pydantic import Field, model_validator

from mega_trading.core.config import NonNegativeInt, PositiveInt, config_dataclass, to_dict
from mega_trading.core.errors import DataError
from mega_trading.core.lineage import (
    atomic_dir,
    json_hash,
    provenance,
    write_json_atomic,
)
from mega_trading.data.events import EventConfig
from mega_trading.data.parts import (
    Workers,
    encode_part,
    expand_inputs,
    name_parts,
    patch_heads,
    read_input,
)
from mega_trading.data.shards import MANIFEST_FORMAT, SPLITS, TOKEN_DTYPE, scan_part
from mega_trading.data.tokenizer import Tokenizer, TokenizerConfig
from mega_trading.data.tokenizer_reuse import (
    ReusedTokenizer,
    outlier_counts,
    resolve_reused_tokenizer,
)
from mega_trading.data.windows import n_windows


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
    pool = Workers(cfg.workers, show_progress)
    try:
        return _prepare(files, inputs, out_dir, cfg, pool, reused)
    finally:
        pool.close()


def _held_out(stream: str, cfg: PrepareConfig) -> bool:
    return stream in cfg.holdout_symbols or stream.partition(".")[0] in cfg.holdout_symbols


def _prepare(files: list[Path], inputs: Sequence, out_dir: Path, cfg: PrepareConfig, pool: Workers,
             reused: ReusedTokenizer | None = None) -> dict:
    with atomic_dir(out_dir) as tmp:
        work = tmp / "_work"
        work.mkdir()
        jobs = [(f, cfg.kind, tmp, work, cfg.events, i, cfg.market) for i, f in enumerate(files)]
        read = pool.map(read_input, jobs, "reading + events")
        used = [r for r in read if "stem" in r and (not cfg.symbols or r["symbol"] in cfg.symbols)]
        if not used:
            raise DataError(f"no {cfg.kind} trades found in the inputs", ", ".join(map(str, inputs)))
        parts = _order_parts(used)
        kept = {id(m) for metas in parts.values() for m in metas}
        for r in read:  # other symbols, repeated files
            if "events" in r and id(r) not in kept:
                Path(tmp, r["events"]).unlink()
        name_parts(tmp, parts)
        patch_heads(tmp, parts, cfg.events)
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
        encoded = pool.map(encode_part, encode_jobs, "tokenizing")
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
                frame = (scan_part(root, entry, symbol)
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
