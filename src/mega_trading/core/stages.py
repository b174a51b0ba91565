"""Skip-if-done stage runner: a stage reruns only when its inputs, config or code changed.

Each stage records a stamp ``RUN/.stages/<name>.json`` holding the hash of its *key* (its
config section, the identities of its inputs, the package version and a hash of the source
of the modules that implement it, so an upgrade that changes a stage's code reruns it). A
stage is skipped when the stamp's hash matches and every declared output exists, so a
pipeline re-run after a crash continues where it stopped, and ``force=True`` redoes
everything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mega_trading import __version__
from mega_trading.core.lineage import json_hash, provenance, read_json, write_json_atomic


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], Any]
    outputs: tuple[Path, ...]
    key: Callable[[], dict]  # evaluated when the stage is reached: it may read earlier outputs
    sources: tuple[str, ...] = ()  # modules / packages implementing it (their code is keyed)


SOURCE_SUFFIXES = (".py", ".c", ".h")  # what a package's behaviour is built from


def _source_files(module: str) -> list[tuple[str, Path]]:
    """(name relative to the module, path) of a module's file, or of every source file of a
    package; found, not imported."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"stage source {module!r} is not an importable module")
    if not spec.submodule_search_locations:
        return [(Path(spec.origin).name, Path(spec.origin))]
    return sorted((p.relative_to(root).as_posix(), p)
                  for root in map(Path, spec.submodule_search_locations) for p in root.rglob("*")
                  if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)


def code_identity(sources: tuple[str, ...]) -> dict:
    """The package version and one sha256 over the source of `sources` (names and bytes):
    equal code gives an equal identity, whatever the checkout's path."""
    digest = hashlib.sha256()
    for module in sorted(sources):
        for name, path in _source_files(module):
            digest.update(f"{module}:{name}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return {"package_version": __version__, "sources": sorted(sources),
            "sources_sha256": digest.hexdigest()}


def stage_key(stage: Stage) -> dict:
    """What a stage's output depends on: its own key plus its code."""
    return {**stage.key(), "code": code_identity(stage.sources)}


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
        key = stage_key(stage)
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
