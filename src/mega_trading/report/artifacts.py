"""Read a run's artifacts for the report, tolerating the optional ones that are missing.

The report never recomputes a metric: everything it shows comes from these files.
A missing artifact is ``None`` (the section says "not produced in this run"); a file that
exists but cannot be parsed is recorded in ``problems`` and shown as an error note, so a
broken stage is visible in the report rather than hidden by a crash or a blank.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mega_trading.core.errors import DataError
from mega_trading.data.shards import ShardSet

ROLLOUT_NAMES = ("rollouts.parquet", "rollouts.csv")
LINEAGE_KEY = b"mega_trading"  # generate.py stores the rollouts' lineage under this key


@dataclass
class Artifacts:
    run_dir: Path
    data_dir: Path | None
    config: dict | None = None  # RUN/config.json
    train_summary: dict | None = None  # RUN/train_summary.json
    metrics: list[dict] = field(default_factory=list)  # RUN/metrics.jsonl
    manifest: dict | None = None  # DATA/manifest.json
    tokenizer: dict | None = None  # DATA/tokenizer.json (or RUN/tokenizer.json)
    backtest: dict | None = None
    rollouts: Any = None  # polars DataFrame
    rollouts_path: Path | None = None
    rollouts_lineage: dict = field(default_factory=dict)
    facts: dict | None = None
    simulate: dict | None = None
    sampling: dict | None = None  # RUN/sampling.json (the measured sampling choice)
    calibration: dict | None = None  # RUN/calibration.json
    checkpoint_state: dict | None = None
    checkpoint_params: int | None = None  # counted from the safetensors header
    problems: dict[str, str] = field(default_factory=dict)  # artifact -> why it was unreadable

    _shards: Any = None

    def shards(self):
        """ShardSet of the data dir (real events for the charts), or None."""
        if self._shards is None and self.data_dir is not None and self.manifest is not None:

            try:
                self._shards = ShardSet.open(self.data_dir)
            except DataError as exc:
                self.problems.setdefault("data events", str(exc))
        return self._shards


def recorded_data_dir(run_dir: str | Path) -> Path | None:
    """The data directory a run was trained on, as recorded in RUN/config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()).get("data_dir")
    except (OSError, ValueError):
        return None
    return Path(recorded) if recorded else None


def _json(path: Path, name: str, problems: dict[str, str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems[name] = f"{path}: {exc}"
        return None


def read_metrics(path: Path, problems: dict[str, str]) -> list[dict]:
    """metrics.jsonl records; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if bad:
        problems["metrics.jsonl"] = f"{bad} unreadable line(s) skipped in {path}"
    return sorted(records, key=lambda r: r["step"])


def read_rollouts(run_dir: Path, problems: dict[str, str]) -> tuple[Any, Path | None, dict]:
    """(frame, path, lineage) of RUN/rollouts.parquet (or .csv + sidecar); Nones if absent."""
    import polars as pl

    for name in ROLLOUT_NAMES:
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".csv":
                sidecar = path.with_name(path.name + ".lineage.json")
                lineage = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
                return pl.read_csv(path), path, lineage
            import pyarrow.parquet as pq

            metadata = pq.read_schema(path).metadata or {}
            lineage = json.loads(metadata[LINEAGE_KEY]) if LINEAGE_KEY in metadata else {}
            return pl.read_parquet(path), path, lineage
        except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
            problems[name] = f"{path}: {exc}"
            return None, path, {}
    return None, None, {}


def safetensors_param_count(path: Path) -> int | None:
    """Number of stored parameters, from the safetensors JSON header (no tensor is read)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def _latest_checkpoint(run_dir: Path, problems: dict[str, str]) -> tuple[dict | None, int | None]:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None, None
    folder = run_dir / "checkpoints" / pointer.read_text().strip()
    state = _json(folder / "state.json", "checkpoint state.json", problems)
    if state:
        state = {k: v for k, v in state.items() if k not in ("rng", "sampler")}  # bulky, unused
    return state, safetensors_param_count(folder / "model.safetensors")


def load_artifacts(run_dir: str | Path, data_dir: str | Path | None = None) -> Artifacts:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError("run folder does not exist", run_dir)
    problems: dict[str, str] = {}
    data = Path(data_dir) if data_dir is not None else recorded_data_dir(run_dir)
    art = Artifacts(run_dir=run_dir, data_dir=data, problems=problems)
    art.config = _json(run_dir / "config.json", "config.json", problems)
    art.train_summary = _json(run_dir / "train_summary.json", "train_summary.json", problems)
    art.metrics = read_metrics(run_dir / "metrics.jsonl", problems)
    art.backtest = _json(run_dir / "backtest.json", "backtest.json", problems)
    art.facts = _json(run_dir / "facts.json", "facts.json", problems)
    art.simulate = _json(run_dir / "simulate.json", "simulate.json", problems)
    art.sampling = _json(run_dir / "sampling.json", "sampling.json", problems)
    art.calibration = _json(run_dir / "calibration.json", "calibration.json", problems)
    art.rollouts, art.rollouts_path, art.rollouts_lineage = read_rollouts(run_dir, problems)
    art.checkpoint_state, art.checkpoint_params = _latest_checkpoint(run_dir, problems)
    if data is not None and data.is_dir():
        art.manifest = _json(data / "manifest.json", "manifest.json", problems)
        art.tokenizer = _json(data / "tokenizer.json", "tokenizer.json", problems)
    if art.tokenizer is None:
        art.tokenizer = _json(run_dir / "tokenizer.json", "run tokenizer.json", problems)
    return art
