"""Skip-if-done stage runner: a stage reruns only when its inputs or config changed.

Each stage records a stamp ``RUN/.stages/<name>.json`` holding the hash of its *key* (its
config section plus the identities of its inputs). A stage is skipped when the stamp's
hash matches and every declared output exists, so a pipeline re-run after a crash
continues where it stopped, and ``force=True`` redoes everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mega_trading.lineage import json_hash, provenance, read_json, write_json_atomic


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], Any]
    outputs: tuple[Path, ...]
    key: Callable[[], dict]  # evaluated when the stage is reached: it may read earlier outputs


def stamp_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / ".stages" / f"{name}.json"


def is_done(run_dir: Path, stage: Stage, key: dict) -> bool:
    stamp = stamp_path(run_dir, stage.name)
    if not stamp.is_file() or not all(Path(p).exists() for p in stage.outputs):
        return False
    return read_json(stamp).get("key_hash") == json_hash(key)


def run_stages(run_dir: Path, stages: list[Stage], force: bool = False,
               console: Console | None = None) -> dict[str, dict]:
    """Run stages in order, skipping finished ones; returns name -> {status, seconds}."""
    console = console or Console(stderr=True)
    summary: dict[str, dict] = {}
    for stage in stages:
        key = stage.key()
        if not force and is_done(run_dir, stage, key):
            console.print(f"[dim]• {stage.name}: up to date, skipped[/]")
            summary[stage.name] = {"status": "skipped", "seconds": 0.0}
            continue
        console.rule(f"[bold]{stage.name}")
        start = time.perf_counter()
        stage.run()
        seconds = time.perf_counter() - start
        write_json_atomic(stamp_path(run_dir, stage.name), {
            "stage": stage.name, "key_hash": json_hash(key), "key": key,
            "seconds": seconds, "outputs": [str(p) for p in stage.outputs],
            "provenance": provenance(stage=stage.name),
        })
        console.print(f"[green]✓ {stage.name}[/] in {seconds:.1f} s")
        summary[stage.name] = {"status": "ran", "seconds": seconds}
    return summary
