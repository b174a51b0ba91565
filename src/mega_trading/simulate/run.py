"""The `mega-trading simulate` core: data + run + scenario + policies -> simulate.json."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mega_trading.core.config import from_dict, to_dict
from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import provenance, write_json_atomic
from mega_trading.data.shards import ShardSet
from mega_trading.generation.sampling import resolve_sampling
from mega_trading.model.checkpoint import load_model
from mega_trading.simulate.config import POLICY_KINDS, SIM_SAMPLING_BASE, PolicyConfig, SimConfig
from mega_trading.simulate.engine import SimResult, simulate_episodes
from mega_trading.simulate.metrics import bootstrap_mean_ci
from mega_trading.simulate.sources import (
    ModelSourceFactory,
    NoStartError,
    ReplaySourceFactory,
    pick_starts,
)

FORMAT = "mega-trading/simulate@1"


def policy_configs(kinds: str | Sequence[str], **params) -> dict[str, PolicyConfig]:
    """'twap,immediate' + shared parameters -> {name: PolicyConfig} in the given order."""

    names = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no policy given; choose from {', '.join(POLICY_KINDS)}")
    out: dict[str, PolicyConfig] = {}
    for name in names:
        if name not in POLICY_KINDS:
            raise ConfigError(f"unknown policy {name!r}; choose from {', '.join(POLICY_KINDS)}")
        if name in out:
            raise ConfigError(f"policy {name!r} is given twice")
        out[name] = from_dict(PolicyConfig, {**params, "kind": name})
    return out


def paired_shortfall(results: dict[str, SimResult], samples: int, seed: int) -> dict:
    """Each policy's shortfall minus the first policy's, episode by episode: the episodes
    share starts and random streams (common random numbers), so the pairing is tight."""
    names = list(results)
    if len(names) < 2:
        return {}
    base = np.array([r["shortfall_bps"] for r in results[names[0]].episodes])
    out: dict = {"baseline": names[0]}
    for name in names[1:]:
        diff = np.array([r["shortfall_bps"] for r in results[name].episodes]) - base
        out[name] = {"mean_bps": float(diff.mean()), "ci95": bootstrap_mean_ci(diff, samples, seed)}
    return out


def run_simulation(data_dir: str | Path, policies: dict[str, PolicyConfig], cfg: SimConfig,
                   seed: int = 0, run_dir: str | Path | None = None, device: str = "cpu",
                   step: int | None = None, out: str | Path | None = None,
                   scenario_file: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Simulate every policy on the same seeded starts; write `out` (if given), return it."""

    log = log or (lambda _msg: None)
    if cfg.source == "model" and run_dir is None:
        raise ConfigError("the model source needs --run (or use --source replay)")
    shards = ShardSet.open(data_dir)
    horizon_s = max(p.horizon_s for p in policies.values())
    try:
        tapes, starts = pick_starts(shards, cfg, horizon_s, seed)
    except NoStartError:
        if cfg.source != "model" or not cfg.replayable_starts:
            raise
        # the model needs no real continuation; the output's config records the change
        log(f"no start of the {cfg.split} split has {horizon_s:g} s of real continuation: "
            "starting anywhere (replayable_starts=false)")
        cfg = dataclasses.replace(cfg, replayable_starts=False)
        tapes, starts = pick_starts(shards, cfg, horizon_s, seed)
    lineage_extra: dict = {}
    sampling_info = None
    if cfg.source == "model":

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise DataError("run folder does not exist", run_dir)
        model, state = load_model(run_dir, step=step, device=device,
                                  expect_tokenizer_hash=shards.tokenizer_hash,
                                  expect_manifest_hash=shards.model_manifest_hash)
        sampling, sampling_info = resolve_sampling(cfg.sampling, run_dir, SIM_SAMPLING_BASE)
        sampling_info["decode"] = cfg.decode
        log(f"simulate: sampling {sampling_info['label']} ({sampling_info['source']}), "
            f"{cfg.decode} decoding")
        factory = ModelSourceFactory(model, shards, tapes, starts, cfg, sampling)
        lineage_extra = {"checkpoint_step": state.get("step"), "device": device}
    else:
        factory = ReplaySourceFactory(tapes, starts)
    results: dict[str, SimResult] = {}
    timing: dict[str, float] = {}
    for name, policy in policies.items():
        began = time.perf_counter()
        results[name] = simulate_episodes(
            factory, policy, cfg, seed, shards.size_window,
            on_batch=lambda done, total, name=name: log(f"{name}: {done}/{total} episodes"))
        timing[name] = time.perf_counter() - began
    first = next(iter(results.values()))
    doc = {
        "format": FORMAT,
        "scenario": cfg.name,
        "description": cfg.description,
        "source": cfg.source,
        "closed_loop": first.closed_loop,
        "seed": seed,
        "episodes": cfg.episodes,
        "policy_order": list(results),  # the JSON is written key-sorted
        "policies": {name: r.to_dict() for name, r in results.items()},
        "paired_shortfall": paired_shortfall(results, cfg.bootstrap_samples, seed),
        "sampling": sampling_info,  # which sampling produced the market (null: replay)
        "timing_s": timing,
        "config": to_dict(cfg),
        "lineage": provenance(
            stage="simulate", run_dir=str(run_dir) if run_dir else None,
            data_dir=str(Path(data_dir)),
            scenario_file=str(scenario_file) if scenario_file else None,
            tokenizer_hash=shards.tokenizer_hash, manifest_hash=shards.manifest_hash,
            seed=seed, **lineage_extra),
    }
    if out is not None:
        write_json_atomic(out, doc)
    return doc
