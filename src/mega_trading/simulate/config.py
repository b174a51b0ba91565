"""Simulator configs: the market/scenario (`SimConfig`), the execution rule for market
orders (`ImpactConfig`) and the parent order with its execution policy (`PolicyConfig`).

A named scenario (``configs/scenarios/<name>.yaml``) mirrors `SimConfig` exactly: unknown
keys are an error (`mega_trading.core.config.load_config`).
"""

from __future__ import annotations

import math
import re
from dataclasses import field
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from mega_trading.core.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitFraction,
    config_dataclass,
    load_yaml,
)
from mega_trading.core.errors import ConfigError
from mega_trading.generation.sampling import SamplingConfig

SIDES = {"buy": 1, "sell": -1}
POLICY_KINDS = ("immediate", "twap", "twap_limit", "participation")
SCENARIO_DIR = Path("configs") / "scenarios"


@config_dataclass
class ImpactConfig:
    """Cost of a market order of notional Q against the recent traded notional V.

    ``impact_bps = coef_bps * (Q / V) ** 0.5`` (``model: sqrt``) or ``coef_bps * Q / V``
    (``model: linear``); the whole order fills at ``last * (1 + side * impact_bps / 1e4)``.
    V is the quote notional of the last ``window_events`` tape events, floored at
    ``min_recent_notional``.
    """

    model: Literal["sqrt", "linear"] = "sqrt"
    coef_bps: NonNegativeFloat = 10.0  # impact when Q equals the recent notional V
    window_events: PositiveInt = 200
    min_recent_notional: PositiveFloat = 1.0


# SEG means "a hole in the data or a pause > 60 s": no use to a continuous market.
SIM_SAMPLING_BASE = SamplingConfig(forbid_seg=True)


@config_dataclass
class SimConfig:
    name: str = "default"
    description: str = ""
    source: Literal["model", "replay"] = "model"
    closed_loop: bool = True  # insert agent fills into the model's context (model source only)
    split: str = "backtest"  # where episodes start (prompts / replayed flow)
    symbol: str | None = None  # None: every symbol of the split
    prompt_length: PositiveInt = 128  # real tokens of context before the start (<= model block_size)
    selection: Literal["random", "high_vol"] = "random"  # which real windows start episodes
    vol_top_fraction: UnitFraction = 0.1  # high_vol: draw from this top fraction by realized vol
    replayable_starts: bool = True  # only starts whose real continuation covers the episode
    episodes: PositiveInt = 16
    batch_size: PositiveInt = 16  # episodes decoded together (model source: one row each)
    impact_lags: NonNegativeInt = 32  # market events after completion on the impact path
    max_events: PositiveInt = 20_000  # per episode; an episode still running then is truncated
    queue: Literal["through", "touch"] = "through"  # when a resting limit order fills
    keep: int | None = None  # tokens kept when the context window slides; None: half
    bootstrap_samples: PositiveInt = 1000
    # Real tape held per split: all of it up to max_tape_events, else a seeded stratified
    # sample of windows of tape_window_events (memory does not grow with the data).
    max_tape_events: PositiveInt = 200_000
    tape_window_events: PositiveInt = 20_000
    impact: ImpactConfig = field(default_factory=ImpactConfig)
    # None: the run's measured choice (RUN/sampling.json) with SEG forbidden, else plain
    # sampling with SEG forbidden; a sampling block chooses by hand
    sampling: SamplingConfig | None = None
    decode: Literal["in_bin", "median"] = "in_bin"  # event features: drawn in-bin or bin medians


@config_dataclass
class PolicyConfig:
    """A parent order (side, qty in base units, horizon) and how to execute it.

    * ``immediate``: one market order at the start.
    * ``twap``: ``slices`` market orders at start + k * horizon / slices, k = 0..slices-1;
      each buys up to the schedule (target * (k + 1) / slices), so the slices sum to qty.
    * ``twap_limit``: each slice rests as a limit order ``limit_offset_bps`` inside the
      last price (a buy below, a sell above); whatever is unfilled when the next slice
      starts is sent as a market order (limit-then-market).
    * ``participation``: after each market trade, buy ``rate`` x the market volume seen
      since the start minus what is done already, once that deficit reaches
      ``min_child_fraction`` x qty; a child order is at most ``max_child_fraction`` x qty.

    At the horizon every policy cancels its resting orders and, with ``finish``, sends the
    remainder as a market order (without it the remainder stays unfilled).
    """

    kind: Literal["immediate", "twap", "twap_limit", "participation"] = "twap"
    side: Literal["buy", "sell"] = "buy"
    qty: PositiveFloat = 1.0  # base units, e.g. BTC
    horizon_s: NonNegativeFloat = 60.0
    slices: PositiveInt = 10
    limit_offset_bps: NonNegativeFloat = 1.0  # a limit rests inside the last price
    rate: UnitFraction = 0.1
    max_child_fraction: UnitFraction = 0.1
    min_child_fraction: NonNegativeFloat = 0.01
    finish: bool = True

    @model_validator(mode="after")
    def _check_child_fractions(self) -> PolicyConfig:
        if self.min_child_fraction > self.max_child_fraction:
            raise ValueError(f"min_child_fraction={self.min_child_fraction} must be <= "
                             f"max_child_fraction={self.max_child_fraction}")
        return self

    @property
    def sign(self) -> int:
        return SIDES[self.side]

    @property
    def horizon_us(self) -> int:
        return round(self.horizon_s * 1e6)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h)?\s*$", re.IGNORECASE)
_UNIT_S = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """'300s', '5m', '1.5h', '250ms' or a bare number of seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ConfigError(f"cannot read duration {text!r}; use e.g. 300s, 5m, 1h")
        unit = match.group(2).lower() if match.group(2) else None
        seconds = float(match.group(1)) * _UNIT_S[unit]
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ConfigError(f"duration must be >= 0, got {text!r}")
    return seconds


def scenario_path(name: str, search: tuple[Path, ...] | None = None) -> Path:
    """A scenario YAML: `name` itself when it is a file, else <root>/configs/scenarios/
    <name>.yaml under the working directory or the source checkout."""
    direct = Path(name)
    if direct.suffix in (".yaml", ".yml") and direct.is_file():
        return direct
    roots = search or (Path.cwd(), Path(__file__).resolve().parents[3])
    for root in roots:
        candidate = root / SCENARIO_DIR / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for root in roots for p in (root / SCENARIO_DIR).glob("*.yaml")})
    raise ConfigError(f"unknown scenario {name!r}; known: {', '.join(known) or 'none found'}")


def load_scenario(name: str, overrides: tuple[str, ...] | list[str] = ()) -> SimConfig:

    return load_yaml(SimConfig, scenario_path(name), overrides)
