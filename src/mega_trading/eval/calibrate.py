"""Temperature calibration: one scalar T fitted on the VALIDATION split by minimum NLL.

A model whose next-event probabilities are right reproduces the market under plain
ancestral sampling; an over-confident one (sharp, overfit) needs T > 1, an under-confident
one T < 1. The fit: the model's logits z of every validation target (each scored once with
maximal past context, as the backtest scores), then the T in [min_t, max_t] minimizing
mean(logsumexp(z / T) - z_target / T) (bounded scalar search on log T). Reported before
and after: NLL (nats/event) and the expected calibration error of the top-1 probability
(``scoring.reliability``, the backtest's ECE). The backtest split is never looked at.

``RUN/calibration.json``::

    {"format": "mega-trading/calibration@1", "split": "validation", "n_positions",
     "temperature", "before": {"nll_nats", "ece"}, "after": {"nll_nats", "ece"},
     "lineage": {...}}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mega_trading.core.config import config_dataclass, to_dict
from mega_trading.core.errors import ConfigError, DataError
from mega_trading.core.lineage import provenance, write_json_atomic
from mega_trading.data.shards import ShardSet
from mega_trading.data.windows import sequential_windows
from mega_trading.eval.scoring import reliability
from mega_trading.model.checkpoint import load_model

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = "mega-trading/calibration@1"


@config_dataclass
class CalibrateConfig:
    enabled: bool = True
    split: str = "validation"
    max_positions: int = 50_000  # validation targets used (the first ones of each shard)
    min_t: float = 0.25
    max_t: float = 4.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.split == "backtest":
            raise ConfigError("calibrate.split must not be the backtest split (fit on validation)")
        if not 0 < self.min_t < 1 < self.max_t:
            raise ConfigError("calibrate: need 0 < min_t < 1 < max_t")
        if self.max_positions < 100 or self.batch_size < 1:
            raise ConfigError("calibrate: need max_positions >= 100 and batch_size >= 1")


@torch.inference_mode()
def collect_logits(model, shards, split: str, max_positions: int,
                   batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] float32, targets [N]) of the event targets of `split`, each scored
    once with maximal past context (``dataset.sequential_windows``)."""

    n_event = shards.tokenizer.n_event_tokens
    rows: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    per_symbol = max(1, max_positions // max(1, len(shards.symbols(split))))
    model.eval()
    for symbol in shards.symbols(split):
        tokens = np.asarray(shards.tokens(split, symbol))[:per_symbol + 1]
        pending: list[tuple[np.ndarray, int]] = []
        for _, window, score_from in sequential_windows(tokens, model.cfg.block_size):
            if pending and (len(pending) == batch_size or len(window) != len(pending[0][0])):
                _score_batch(model, pending, n_event, rows, targets)
                pending = []
            pending.append((window, score_from))
        if pending:
            _score_batch(model, pending, n_event, rows, targets)
    if not rows:
        raise DataError(f"the {split} split has no event targets to calibrate on", shards.root)
    return torch.cat(rows), torch.cat(targets)


def _score_batch(model, pending: list[tuple[np.ndarray, int]], n_event: int,
                 rows: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """Append the logits and targets of the new event targets of equal-length windows."""
    device = model.tok_embeddings.weight.device
    batch = np.stack([w for w, _ in pending])
    inputs, tgt = batch[:, :-1], batch[:, 1:]
    steps = np.arange(tgt.shape[1])
    keep = np.stack([steps >= s for _, s in pending]) & (tgt < n_event)
    logits = model(torch.from_numpy(inputs).to(device))
    rows.append(logits[torch.from_numpy(keep).to(device)].float().cpu())
    targets.append(torch.from_numpy(tgt[keep]))


def nll_at(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    z = logits / temperature
    return float((torch.logsumexp(z, -1) - z.gather(1, targets[:, None])[:, 0]).mean())


def ece_at(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:

    probs = torch.softmax(logits / temperature, -1)
    top = probs.max(-1)
    hit = (top.indices == targets).double().numpy()
    return reliability(top.values.double().numpy(), hit)[0]


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, min_t: float = 0.25,
                    max_t: float = 4.0) -> float:
    """argmin over T of the mean NLL (convex in 1/T: a bounded scalar search is exact)."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: nll_at(logits, targets, math.exp(log_t)),
                             bounds=(math.log(min_t), math.log(max_t)), method="bounded",
                             options={"xatol": 1e-4})
    return float(math.exp(result.x))


def calibrate(model, shards, cfg: CalibrateConfig = CalibrateConfig()) -> dict[str, Any]:
    """Fit T on cfg.split; NLL and ECE before (T = 1) and after."""
    logits, targets = collect_logits(model, shards, cfg.split, cfg.max_positions, cfg.batch_size)
    temperature = fit_temperature(logits, targets, cfg.min_t, cfg.max_t)
    return {
        "format": CALIBRATION_FORMAT, "split": cfg.split, "n_positions": len(targets),
        "temperature": temperature,
        "before": {"nll_nats": nll_at(logits, targets, 1.0), "ece": ece_at(logits, targets, 1.0)},
        "after": {"nll_nats": nll_at(logits, targets, temperature),
                  "ece": ece_at(logits, targets, temperature)},
    }


def run_calibration(run_dir: str | Path, data_dir: str | Path, cfg: CalibrateConfig = CalibrateConfig(),
                    device: str = "cpu", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load the run's model, calibrate, write RUN/calibration.json."""

    shards = ShardSet.open(data_dir)
    model, state = load_model(run_dir, device=device, expect_tokenizer_hash=shards.tokenizer_hash,
                              expect_manifest_hash=shards.model_manifest_hash)
    doc = calibrate(model, shards, cfg)
    doc["lineage"] = provenance(stage="calibrate", run_dir=str(run_dir), data_dir=str(data_dir),
                                checkpoint_step=state.get("step"), config=to_dict(cfg),
                                tokenizer_hash=shards.tokenizer_hash)
    write_json_atomic(Path(run_dir) / CALIBRATION_FILE, doc)
    if log:
        log(f"calibrate: T = {doc['temperature']:.3f} on {doc['n_positions']:,} {cfg.split} "
            f"targets; NLL {doc['before']['nll_nats']:.4f} -> {doc['after']['nll_nats']:.4f}, "
            f"ECE {doc['before']['ece']:.4f} -> {doc['after']['ece']:.4f}")
    return doc
