"""Encoding new trades with a tokenizer fitted elsewhere (`prepare --tokenizer PATH`).

PATH is a tokenizer.json, a run folder or a prepared data dir. The tokenizer is loaded as
it is, never refitted, so the run's token ids keep their meaning; what it was fitted on
(its data dir, manifest hash and training streams) is recorded so the scored data can be
tied back to the run: baselines and zero-shot tags come from that training data. Features
outside the training range fall into the outlier bins, counted by `outlier_counts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mega_trading.core.errors import DataError
from mega_trading.core.lineage import read_json
from mega_trading.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class ReusedTokenizer:
    """A fitted tokenizer found at a user's PATH, and the training data it came from."""

    tokenizer: Tokenizer
    source: Path
    train_data_dir: Path | None  # the prepared data it was fitted on, when known
    train_manifest_hash: str | None
    train_streams: tuple[str, ...] | None  # streams with training tokens there


def resolve_reused_tokenizer(path: str | Path) -> ReusedTokenizer:
    """PATH = a tokenizer.json, a run folder (RUN/tokenizer.json, its data dir from
    RUN/config.json) or a prepared data dir (DIR/tokenizer.json, itself the training data)."""
    path = Path(path)
    data_dir, manifest_hash = None, None
    if path.is_dir() and (path / "config.json").is_file():  # a run folder
        config = read_json(path / "config.json")
        data_dir, manifest_hash = config.get("data_dir"), config.get("manifest_hash")
        path = path / "tokenizer.json"
    elif path.is_dir():
        path = path / "tokenizer.json"
        data_dir = str(path.parent)
    elif (path.parent / "manifest.json").is_file():  # DIR/tokenizer.json of a data dir
        data_dir = str(path.parent)
    if not path.is_file():
        raise DataError("no tokenizer.json here: give a tokenizer.json, a run folder or a "
                        "prepared data dir", path)
    tokenizer = Tokenizer.load(path)
    streams = None
    manifest_path = Path(data_dir) / "manifest.json" if data_dir else None
    if manifest_path is not None and manifest_path.is_file():
        manifest = read_json(manifest_path)
        if manifest.get("tokenizer_hash") == tokenizer.hash:
            manifest_hash = manifest_hash or manifest.get("manifest_hash")
            streams = tuple(sorted(s for s, info in manifest["shards"].get("train", {}).items()
                                   if info["n_tokens"] > 0))
    return ReusedTokenizer(tokenizer, path.resolve(), Path(data_dir).resolve() if data_dir else None,
                           manifest_hash, streams)


def outlier_counts(root: Path, shards: dict, tokenizer: Tokenizer) -> dict:
    """Per (split, stream): events whose move, size or dt fell in an outlier bin (beyond
    the tokenizer's tail quantiles). New data outside the training range lands there,
    never in an error; these counts say how much of it did."""
    tails = {"move": {0, tokenizer.move.n_bins - 1}, "size": {0, tokenizer.size.n_bins - 1},
             "dt": {tokenizer.dt.n_bins - 1}}
    out: dict[str, dict] = {}
    for split, by_symbol in shards.items():
        for symbol, info in by_symbol.items():
            if not info["n_tokens"]:
                continue
            # uint16 shards (dataset.TOKEN_DTYPE; that module imports this one), a million
            # tokens at a time: the field arrays of a whole shard would grow with the data
            shard = np.memmap(root / info["tokens"], dtype=np.uint16, mode="r")
            counts = dict.fromkeys([*tails, "any", "n_events"], 0)
            for lo in range(0, len(shard), 1 << 20):
                tokens = np.asarray(shard[lo:lo + (1 << 20)])
                idx = tokenizer.field_indices(tokens[tokens < tokenizer.n_event_tokens])
                hits = {name: np.isin(idx[name], sorted(bins)) for name, bins in tails.items()}
                for name, hit in hits.items():
                    counts[name] += int(hit.sum())
                counts["any"] += int(np.logical_or.reduce(list(hits.values())).sum())
                counts["n_events"] += len(idx["move"])
            out.setdefault(split, {})[symbol] = counts
    return out
