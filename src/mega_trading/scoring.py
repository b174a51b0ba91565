"""One scoring path for the model and every baseline: next-token distributions -> metrics.

Each scorer (``score_model``, ``score_baseline``) walks a token shard, produces the full
next-token distribution at every scored position in small batches, and immediately
reduces each batch (``reduce_log_probs``) to a few numbers per position. No ``[N, V]``
array of a whole split is ever held. ``summarize`` turns those per-position numbers into
the reported metrics.

What is scored (``FieldSpec.scored_positions``): every target position ``t >= 1`` of a
shard whose token is an EVENT token. Targets equal to the segment-start (``seg_id``) or
pad token are not scored: they mark data boundaries, not trades, and the first token of a
shard has no context at all. The model and every baseline score exactly the same
positions, so their numbers (and paired differences) compare like with like.

Per position:

* ``logp``      log p(target) under the full-vocabulary distribution (mass a predictor
                puts on special tokens counts against it);
* ``top1_prob`` the largest probability (the confidence the calibration check uses);
* ``top1_hit`` / ``top5_hit``  whether the target is among the k most probable tokens.
                Ties are shared: with g tokens strictly more probable than the target and
                e tokens (target included) exactly as probable, the hit is
                clip((k - g) / e, 0, 1), the expected hit under random tie-breaking. A
                uniform predictor thus scores top-5 = 5 / V instead of an arbitrary 0 or 1;
* ``field_logp[name]``  log p(field value of the target), the distribution over EVENT
                tokens renormalized (conditioning on "the next token is a trade") and
                marginalized over the other fields through the tokenizer's mixed radix
                ``token = ((side * n_move + move) * n_size + size) * n_dt + dt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from mega_trading.config import NonNegativeInt, PositiveInt, config_dataclass

TOP_KS = (1, 5)


# --- vocabulary layout ----------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    """The vocabulary layout scoring needs (built from any tokenizer-like object)."""

    vocab_size: int
    n_event_tokens: int
    field_names: tuple[str, ...]
    field_sizes: tuple[int, ...]
    seg_id: int
    pad_id: int

    def __post_init__(self) -> None:
        if math.prod(self.field_sizes) != self.n_event_tokens:
            raise ValueError(f"field sizes {self.field_sizes} do not multiply to "
                             f"n_event_tokens={self.n_event_tokens}")

    @classmethod
    def from_tokenizer(cls, tok: Any) -> FieldSpec:
        names = tuple(tok.field_names)
        sizes = tok.field_sizes
        return cls(int(tok.vocab_size), int(tok.n_event_tokens), names,
                   tuple(int(sizes[n]) for n in names), int(tok.seg_id), int(tok.pad_id))

    def field_indices(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Mixed-radix digits of EVENT tokens (side most significant)."""
        rest = np.asarray(tokens, dtype=np.int64).copy()
        out: dict[str, np.ndarray] = {}
        for name, size in zip(reversed(self.field_names), reversed(self.field_sizes)):
            out[name] = rest % size
            rest //= size
        return {name: out[name] for name in self.field_names}

    def scored_positions(self, tokens: np.ndarray) -> np.ndarray:
        """Target positions scored in a shard: t >= 1 with an event token at t."""
        tokens = np.asarray(tokens)
        pos = np.arange(1, len(tokens), dtype=np.int64)
        return pos[tokens[1:] < self.n_event_tokens]


# --- per-position scores ----------------------------------------------------------------------

@dataclass
class PositionScores:
    """Per scored position: the few numbers every metric is computed from."""

    positions: np.ndarray  # target index in its shard
    targets: np.ndarray
    logp: np.ndarray  # float64
    top1_prob: np.ndarray
    top1_hit: np.ndarray  # expected hit in [0, 1] (ties shared)
    top5_hit: np.ndarray
    field_logp: dict[str, np.ndarray] = field(default_factory=dict)
    shard_ids: np.ndarray | None = None  # which shard (symbol) each position came from

    def __len__(self) -> int:
        return len(self.logp)

    def with_shard(self, shard_id: int) -> PositionScores:
        ids = np.full(len(self), shard_id, dtype=np.int64)
        return PositionScores(self.positions, self.targets, self.logp, self.top1_prob,
                              self.top1_hit, self.top5_hit, self.field_logp, ids)

    @classmethod
    def concat(cls, parts: Sequence[PositionScores],
               field_names: Iterable[str] = ()) -> PositionScores:
        parts = list(parts)
        names = list(field_names) or (list(parts[0].field_logp) if parts else [])

        def cat(get: Callable[[PositionScores], np.ndarray], dtype) -> np.ndarray:
            arrays = [get(p) for p in parts]
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

        shard_ids = None
        if parts and all(p.shard_ids is not None for p in parts):
            shard_ids = cat(lambda p: p.shard_ids, np.int64)
        return cls(
            positions=cat(lambda p: p.positions, np.int64),
            targets=cat(lambda p: p.targets, np.int64),
            logp=cat(lambda p: p.logp, np.float64),
            top1_prob=cat(lambda p: p.top1_prob, np.float64),
            top1_hit=cat(lambda p: p.top1_hit, np.float64),
            top5_hit=cat(lambda p: p.top5_hit, np.float64),
            field_logp={n: cat(lambda p, n=n: p.field_logp[n], np.float64) for n in names},
            shard_ids=shard_ids,
        )


def reduce_log_probs(scores, targets, positions: np.ndarray, spec: FieldSpec) -> PositionScores:
    """Reduce a batch of next-token distributions to per-position scores.

    ``scores``: ``[m, V]`` logits or log-probabilities (torch tensor on any device, or numpy);
    they are normalized here with log_softmax, so every scorer is judged on a proper
    distribution. ``targets``: ``[m]`` event-token ids. The one reduction every scorer uses.
    """
    import torch

    lp = torch.as_tensor(scores)
    if not lp.is_floating_point():
        raise TypeError("scores must be floating point")
    # float32 for everyone (the model's logits are float32): same arithmetic, same ties.
    lp = torch.log_softmax(lp.float(), dim=-1)
    tgt = torch.as_tensor(np.asarray(targets, dtype=np.int64)).to(lp.device)
    if lp.ndim != 2 or lp.shape[1] != spec.vocab_size or lp.shape[0] != tgt.shape[0]:
        raise ValueError(f"expected [{tgt.shape[0]}, {spec.vocab_size}] scores, "
                         f"got {tuple(lp.shape)}")
    if bool(((tgt < 0) | (tgt >= spec.n_event_tokens)).any()):
        raise ValueError("only event tokens are scored (special targets must be filtered out)")
    lp_t = lp.gather(1, tgt[:, None])
    greater = (lp > lp_t).sum(1).to(lp.dtype)
    ties = (lp == lp_t).sum(1).to(lp.dtype)
    hits = {k: ((k - greater) / ties).clamp(0.0, 1.0) for k in TOP_KS}
    return PositionScores(
        positions=np.asarray(positions, dtype=np.int64),
        targets=np.asarray(targets, dtype=np.int64),
        logp=_to_numpy(lp_t[:, 0]),
        top1_prob=_to_numpy(lp.max(1).values.exp()),
        top1_hit=_to_numpy(hits[1]),
        top5_hit=_to_numpy(hits[5]),
        field_logp={n: _to_numpy(v) for n, v in _field_log_probs(lp, tgt, spec).items()},
    )


def _to_numpy(t) -> np.ndarray:
    import torch

    return t.detach().to("cpu", torch.float64).numpy()


def _field_log_probs(lp, tgt, spec: FieldSpec) -> dict:
    """log p(field value | next token is an event), per field, by marginalizing the grid."""
    import torch

    m = lp.shape[0]
    # Probabilities relative to the row's most probable event: sums of them cannot
    # overflow, and float64 keeps even a 1e-300 marginal finite in log space.
    events = lp[:, : spec.n_event_tokens].double()
    grid = torch.exp(events - events.max(1, keepdim=True).values).reshape(m, *spec.field_sizes)
    log_total = torch.log(grid.reshape(m, -1).sum(1))
    digits = spec.field_indices(tgt.cpu().numpy())
    out = {}
    for axis, name in enumerate(spec.field_names, start=1):
        others = tuple(d for d in range(1, grid.ndim) if d != axis)
        marginal = grid.sum(dim=others)  # [m, n_field]
        idx = torch.as_tensor(digits[name], device=lp.device)[:, None]
        picked = marginal.gather(1, idx)[:, 0].clamp_min(1e-300)
        out[name] = torch.log(picked) - log_total
    return out


# --- scorers ----------------------------------------------------------------------------------

def score_baseline(baseline, tokens: np.ndarray, spec: FieldSpec,
                   chunk_size: int = 2048) -> PositionScores:
    """Score every event target of one shard with a baseline (``baselines.Baseline``)."""
    from mega_trading.baselines import segment_floor

    tokens = np.asarray(tokens, dtype=np.int64)
    positions = spec.scored_positions(tokens)
    floor = segment_floor(tokens, spec.seg_id)
    parts = []
    for lo in range(0, len(positions), chunk_size):
        pos = positions[lo:lo + chunk_size]
        ctx = baseline.contexts_for(tokens, pos, floor)
        parts.append(reduce_log_probs(baseline.log_probs(ctx), tokens[pos], pos, spec))
    return PositionScores.concat(parts, spec.field_names) if parts else _empty(spec)


def _empty(spec: FieldSpec) -> PositionScores:
    z = np.zeros(0)
    return PositionScores(z.astype(np.int64), z.astype(np.int64), z, z, z, z,
                          {n: z for n in spec.field_names})


def score_model(
    model: Callable, tokens: np.ndarray, spec: FieldSpec, block_size: int | None = None,
    batch_size: int = 16, device: Any = None, stride: int | None = None,
) -> PositionScores:
    """Score every event target of one shard exactly once, each with maximal past context.

    ``model`` maps ``LongTensor[B, T] -> logits[B, T, V]`` (a ``Transformer`` or any causal
    callable). Windows of ``block_size + 1`` tokens slide with ``stride`` (default half a
    block): the first window scores all its targets, each later one only the targets no
    earlier window scored, so every target but the first ``stride``-ish ones sees at least
    ``block_size - stride`` tokens of past. Batches are reduced on the device as they come.
    """
    import torch

    from mega_trading.dataset import sequential_windows

    tokens = np.asarray(tokens, dtype=np.int64)
    block_size = block_size or model.cfg.block_size
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(iter(params()), None) if params else None
        device = first.device if first is not None else torch.device("cpu")
    if hasattr(model, "eval"):
        model.eval()
    parts: list[PositionScores] = []
    pending: list[tuple[int, np.ndarray, int]] = []

    def flush() -> None:
        if pending:
            parts.append(_score_windows(model, pending, spec, device))
            pending.clear()

    with torch.inference_mode():
        for start, window, score_from in sequential_windows(tokens, block_size, stride):
            if pending and (len(pending) == batch_size or len(window) != len(pending[0][1])):
                flush()
            pending.append((start, window, score_from))
        flush()
    return PositionScores.concat(parts, spec.field_names) if parts else _empty(spec)


def _score_windows(model: Callable, windows: list, spec: FieldSpec, device: Any) -> PositionScores:
    import torch

    batch = np.stack([w for _, w, _ in windows])
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = np.arange(targets.shape[1])
    new = np.stack([steps >= score_from for _, _, score_from in windows])
    keep = new & (targets < spec.n_event_tokens)
    positions = (np.array([s for s, _, _ in windows])[:, None] + 1 + steps[None, :])[keep]
    logits = model(torch.from_numpy(inputs).to(device))
    rows = logits[torch.from_numpy(keep).to(logits.device)]
    return reduce_log_probs(rows, targets[keep], positions, spec)


# --- metrics ----------------------------------------------------------------------------------

@config_dataclass
class SummaryConfig:
    n_bins: PositiveInt = 15  # reliability bins of equal width on [0, 1]
    bootstrap_samples: NonNegativeInt = 1000
    bootstrap_block: PositiveInt = 256  # positions per bootstrap block (contiguous in one shard)
    seed: int = 0
    # exp() stays a finite float (JSON has no inf)
    max_log_perplexity: Annotated[float, Field(gt=0, le=709)] = 700.0


def perplexity(mean_nll: float, cap: float = SummaryConfig.max_log_perplexity) -> float:
    """exp(mean NLL), clipped so the result is always a finite float."""
    if not math.isfinite(mean_nll):
        return math.exp(cap)
    return math.exp(min(mean_nll, cap))


def reliability(confidence: np.ndarray, correct: np.ndarray,
                n_bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-1 probability, and the bin table behind it."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(which, weights=correct, minlength=n_bins)
    bins, ece = [], 0.0
    for b in range(n_bins):
        n = int(count[b])
        conf = conf_sum[b] / n if n else None
        acc = hit_sum[b] / n if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                     "confidence": conf, "accuracy": acc})
    return float(ece), bins


def block_ids(scores: PositionScores, block: int) -> np.ndarray:
    """Contiguous chunks of `block` positions within one shard (the bootstrap unit)."""
    shard = scores.shard_ids if scores.shard_ids is not None else np.zeros(len(scores), np.int64)
    _, ids = np.unique(np.stack([shard, scores.positions // block]), axis=1, return_inverse=True)
    return ids.reshape(-1)


def block_bootstrap_ci(values: np.ndarray, blocks: np.ndarray, samples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile CI of the mean of `values`, resampling whole blocks with replacement.

    Blocks keep the serial dependence of order flow inside each resampled unit, so the
    interval is not falsely narrow the way a per-position bootstrap would be.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [None, None]
    sums = np.bincount(blocks, weights=values)
    counts = np.bincount(blocks).astype(np.float64)
    n_blocks = len(sums)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    per_round = max(1, 4_000_000 // n_blocks)  # bounded memory for many blocks
    for lo in range(0, samples, per_round):
        hi = min(samples, lo + per_round)
        pick = rng.integers(0, n_blocks, size=(hi - lo, n_blocks))
        means[lo:hi] = sums[pick].sum(1) / counts[pick].sum(1)
    alpha = (1.0 - level) / 2
    lo_q, hi_q = np.quantile(means, [alpha, 1 - alpha])
    return [float(lo_q), float(hi_q)]


def label_stats(targets: np.ndarray) -> dict:
    """Effective vocabulary exp(H) of the scored labels and how many distinct ones occur."""
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return {"effective_vocab": 0.0, "n_distinct_labels": 0}
    counts = np.bincount(targets)
    p = counts[counts > 0] / len(targets)
    return {"effective_vocab": float(np.exp(-(p * np.log(p)).sum())),
            "n_distinct_labels": int((counts > 0).sum())}


def summarize(scores: PositionScores, cfg: SummaryConfig = SummaryConfig()) -> dict:
    """Every reported metric of one scorer on one set of positions."""
    n = len(scores)
    if n == 0:
        return {"n_scored": 0}
    nll = -scores.logp
    mean_nll = float(nll.mean())
    ece, bins = reliability(scores.top1_prob, scores.top1_hit, cfg.n_bins)
    blocks = block_ids(scores, cfg.bootstrap_block)
    return {
        "n_scored": n,
        "nll_nats": mean_nll,
        "nll_nats_ci95": block_bootstrap_ci(nll, blocks, cfg.bootstrap_samples, cfg.seed),
        "bits_per_event": float(nll.sum() / n / math.log(2)),
        "perplexity": perplexity(mean_nll, cfg.max_log_perplexity),
        "top1": float(scores.top1_hit.mean()),
        "top5": float(scores.top5_hit.mean()),
        "ece": ece,
        "reliability": bins,
        "per_field": {name: {"nll_nats": float(-lp.mean()),
                             "bits": float(-lp.mean() / math.log(2))}
                      for name, lp in scores.field_logp.items()},
        **label_stats(scores.targets),
    }


def paired_difference(a: PositionScores, b: PositionScores,
                      cfg: SummaryConfig = SummaryConfig()) -> dict:
    """NLL(a) - NLL(b) on the same positions, with a paired block-bootstrap 95% CI.

    Negative means `a` predicts better. Pairing cancels the shared difficulty of each
    stretch of data, so this interval is much tighter than comparing two separate CIs.
    """
    if not (np.array_equal(a.positions, b.positions) and np.array_equal(a.targets, b.targets)):
        raise ValueError("paired comparison needs two scorers on exactly the same positions")
    if len(a) == 0:
        return {"delta_nll_nats": None, "ci95": [None, None]}
    diff = b.logp - a.logp  # = nll_a - nll_b
    blocks = block_ids(a, cfg.bootstrap_block)
    return {"delta_nll_nats": float(diff.mean()),
            "ci95": block_bootstrap_ci(diff, blocks, cfg.bootstrap_samples, cfg.seed)}
