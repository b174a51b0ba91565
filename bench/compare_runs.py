"""Are two pipeline runs numerically identical? (issue 18: refactors must not change the demo.)

    .venv/bin/python bench/compare_runs.py RUN_BEFORE RUN_AFTER

Compares every leaf of backtest.json, facts.json and simulate.json except lineage,
provenance and timing fields; the checkpoints' tensors and safetensors metadata (the
files' bytes may differ: the header's key order is not fixed); and rollouts.parquet row by
row. Exit code 0 only when everything matches.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load_file

SKIP = {"lineage", "provenance", "timing_s", "created_utc", "git_commit", "run_dir", "data_dir"}


def leaves(value, prefix=""):
    if isinstance(value, dict):
        for key, child in value.items():
            if key not in SKIP:
                yield from leaves(child, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from leaves(child, f"{prefix}[{i}]")
    else:
        yield prefix, value


def safetensors_metadata(path: Path) -> dict:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]).get("__metadata__", {})


def main(before: Path, after: Path) -> bool:
    same = True
    for name in ("backtest.json", "facts.json", "simulate.json"):
        if not (before / name).is_file():
            continue
        a = dict(leaves(json.loads((before / name).read_text())))
        b = dict(leaves(json.loads((after / name).read_text())))
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k, "<missing>") != b.get(k, "<missing>"))
        numbers = sum(isinstance(v, (int, float)) for v in a.values())
        print(f"{name}: {len(a)} leaves ({numbers} numbers) compared, {len(differ)} differ"
              + (f": {differ[:10]}" if differ else ": identical"))
        same &= not differ
    for path in sorted((before / "checkpoints").glob("step_*/model.safetensors")):
        other = after / path.relative_to(before)
        ta, tb = load_file(path), load_file(other)
        equal = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        equal &= safetensors_metadata(path) == safetensors_metadata(other)
        print(f"{path.parent.name}: {len(ta)} tensors and metadata {'identical' if equal else 'DIFFER'}")
        same &= equal
    if (before / "rollouts.parquet").is_file():
        equal = pl.read_parquet(before / "rollouts.parquet").equals(pl.read_parquet(after / "rollouts.parquet"))
        print(f"rollouts.parquet: {'identical' if equal else 'DIFFER'}")
        same &= equal
    return same


if __name__ == "__main__":
    sys.exit(0 if main(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
