"""How the next token is drawn: one config, one function, and the run's measured choice.

* ``SamplingConfig``: temperature, top-k, top-p (nucleus), min-p, tick support (only
  tokens a market of the row's tick class made in training: ``support.py``), and which
  special tokens are forbidden. The built-in default is plain ancestral sampling (temperature 1, no
  truncation): a calibrated model should reproduce the market without truncation.
* ``sample_next(logits, temperature, top_k, top_p, min_p, generator)``: THE sampling
  function (generate, serve and the simulator's model source all call it). Order as in
  Hugging Face: temperature -> top-k -> top-p -> min-p.
* ``RUN/sampling.json``: the settings the ``sampling`` pipeline stage chose by a realism
  score on the VALIDATION split (``sampling_search.py``). ``resolve_sampling`` gives
  generate, facts, simulate and serve their settings: what the user set explicitly, else
  the run's measured choice, else the built-in default; and a ``sampling_info`` block that
  every output records so one can tell which sampling produced it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from mega_trading.core.config import (
    NonNegativeFloat,
    NonNegativeInt,
    UnitFraction,
    config_dataclass,
)
from mega_trading.core.errors import DataError
from mega_trading.core.lineage import read_json

SAMPLING_FILE = "sampling.json"
SAMPLING_FORMAT = "mega-trading/sampling@1"
CHOSEN_FIELDS = ("temperature", "top_k", "top_p", "min_p", "tick_support")


@config_dataclass
class SamplingConfig:
    temperature: NonNegativeFloat = 1.0  # 0 = greedy (argmax)
    top_k: NonNegativeInt = 0  # keep the k most likely tokens; 0 = off
    top_p: UnitFraction = 1.0  # nucleus: the smallest set whose probability reaches p; 1 = off
    # keep tokens with p >= min_p * (the most likely token's p); 0 = off
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # only tokens a market of the row's tick class made in training (generation/support.py)
    tick_support: bool = False
    forbid_pad: bool = True
    forbid_seg: bool = False

    @property
    def label(self) -> str:
        """Short human description, e.g. 'T=0.93, min-p 0.05' or 'T=1, full'."""
        parts = [f"T={self.temperature:.3g}"]
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.min_p > 0:
            parts.append(f"min-p {self.min_p:g}")
        if len(parts) == 1:
            parts.append("full")
        if self.tick_support:
            parts.append("tick support")
        return ", ".join(parts)


def top_p_keep(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask of the nucleus on probabilities sorted in descending order: a token stays while
    the tokens before it have not yet reached top_p, so the most likely one always does."""
    before = sorted_probs.cumsum(-1) - sorted_probs
    return before < top_p


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, min_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of logits [B, V]: temperature, top-k, top-p, then min-p.

    temperature 0 is greedy argmax. The draw is an exponential race, argmax(p / E) with
    E ~ Exp(1), which picks index i with probability p_i without a host sync and with every
    random number taken from `generator`.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs, indices = race_probs(logits, temperature, top_k, top_p, min_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return race_winner(probs, race, indices)


def race_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample_next`'s probabilities (temperature > 0) of float logits [B, V]: [B, K] and the
    vocabulary ids of their columns (None: all V, in order)."""
    if temperature != 1:  # dividing by 1 changes nothing: skip a [B, V] pass per step
        logits = logits / temperature
    indices = None
    if 0 < top_k < logits.shape[-1]:
        logits, indices = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    elif top_p < 1:
        logits, indices = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        probs = probs * top_p_keep(probs, top_p)
    if min_p > 0:  # relative to the most likely token, which therefore always stays
        probs = probs * (probs >= min_p * probs.amax(-1, keepdim=True))
    return probs, indices


def race_winner(probs: torch.Tensor, race: torch.Tensor,
                indices: torch.Tensor | None) -> torch.Tensor:
    """The token of each row that wins the race argmax(probs / race), race ~ Exp(1)."""
    choice = (probs / race).argmax(-1)
    if indices is None:
        return choice
    return indices.gather(-1, choice[:, None]).squeeze(-1)


# --- the run's measured choice ----------------------------------------------------------------

def read_measured(run_dir: str | Path | None) -> dict[str, Any] | None:
    """RUN/sampling.json, or None when the run has none."""
    if run_dir is None:
        return None
    path = Path(run_dir) / SAMPLING_FILE
    if not path.is_file():
        return None
    doc = read_json(path)
    if doc.get("format") != SAMPLING_FORMAT or "chosen" not in doc:
        raise DataError(f"not a {SAMPLING_FORMAT} file", path)
    return doc


def resolve_sampling(explicit: SamplingConfig | None, run_dir: str | Path | None,
                     base: SamplingConfig | None = None) -> tuple[SamplingConfig, dict[str, Any]]:
    """(settings, sampling_info): ``explicit`` when the user set sampling, else the run's
    measured choice (its four chosen fields on top of ``base``, which keeps the caller's
    forbid flags), else ``base`` / the built-in default.

    sampling_info = {"source": "explicit" | "measured" | "default", "label", "settings",
    and for "measured": "file", "score", "split"}: what every output records.
    """
    base = base or SamplingConfig()
    if explicit is not None:
        return explicit, _info("explicit", explicit)
    doc = read_measured(run_dir)
    if doc is None:
        return base, _info("default", base)
    chosen = {k: doc["chosen"][k] for k in CHOSEN_FIELDS if k in doc["chosen"]}
    settings = dataclasses.replace(base, **chosen)
    return settings, _info("measured", settings, file=str(Path(run_dir) / SAMPLING_FILE),
                           score=doc.get("score"), split=doc.get("split"))


def _info(source: str, settings: SamplingConfig, **extra: Any) -> dict[str, Any]:
    return {"source": source, "label": settings.label, "settings": dataclasses.asdict(settings),
            **extra}
