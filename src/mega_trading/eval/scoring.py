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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from mega_trading.core.config import NonNegativeInt, PositiveInt, config_dataclass
from mega_trading.data.windows import sequential_windows
from mega_trading.eval.baselines import segment_floor
from mega_trading.eval.score_sums import ScoreSums, bootstrap_mean_ci

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

    def subset(self, keep: np.ndarray) -> PositionScores:
        return PositionScores(
            self.positions[keep], self.targets[keep], self.logp[keep], self.top1_prob[keep],
            self.top1_hit[keep], self.top5_hit[keep],
            {n: v[keep] for n, v in self.field_logp.items()},
            None if self.shard_ids is None else self.shard_ids[keep])

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

def iter_baseline_scores(baseline, tokens: np.ndarray, spec: FieldSpec,
                         chunk_size: int = 2048) -> Iterator[PositionScores]:
    """Score every event target of one shard with a baseline (``baselines.Baseline``), a
    chunk of `chunk_size` token positions at a time.

    Each chunk reads only its own tokens and the `context_len` before them: a segment start
    further back cannot matter (every context slot lies inside that stretch), so memory does
    not grow with the shard (which may be a memory-mapped file of any size).
    """

    reach = baseline.context_len + 1
    for lo in range(1, len(tokens), chunk_size):
        hi = min(lo + chunk_size, len(tokens))
        start = max(0, lo - reach)
        local = np.asarray(tokens[start:hi], dtype=np.int64)
        local_pos = np.arange(lo - start, hi - start, dtype=np.int64)
        local_pos = local_pos[local[local_pos] < spec.n_event_tokens]
        if len(local_pos) == 0:
            continue
        ctx = baseline.contexts_for(local, local_pos, segment_floor(local, spec.seg_id))
        yield reduce_log_probs(baseline.log_probs(ctx), local[local_pos], local_pos + start, spec)


def score_baseline(baseline, tokens: np.ndarray, spec: FieldSpec,
                   chunk_size: int = 2048) -> PositionScores:
    """All of ``iter_baseline_scores`` at once (small shards; tests)."""
    parts = list(iter_baseline_scores(baseline, tokens, spec, chunk_size))
    return PositionScores.concat(parts, spec.field_names) if parts else _empty(spec)


def _empty(spec: FieldSpec) -> PositionScores:
    z = np.zeros(0)
    return PositionScores(z.astype(np.int64), z.astype(np.int64), z, z, z, z,
                          {n: z for n in spec.field_names})


def iter_model_scores(
    model: Callable, tokens: np.ndarray, spec: FieldSpec, block_size: int | None = None,
    batch_size: int = 16, device: Any = None, stride: int | None = None,
) -> Iterator[PositionScores]:
    """Score every event target of one shard exactly once, each with maximal past context;
    yields one batch of windows' scores at a time.

    ``model`` maps ``LongTensor[B, T] -> logits[B, T, V]`` (a ``Transformer`` or any causal
    callable). Windows of ``block_size + 1`` tokens slide with ``stride`` (default half a
    block): the first window scores all its targets, each later one only the targets no
    earlier window scored, so every target but the first ``stride``-ish ones sees at least
    ``block_size - stride`` tokens of past. Batches are reduced on the device as they come.
    """
    import torch


    block_size = block_size or model.cfg.block_size
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(iter(params()), None) if params else None
        device = first.device if first is not None else torch.device("cpu")
    if hasattr(model, "eval"):
        model.eval()
    pending: list[tuple[int, np.ndarray, int]] = []
    with torch.inference_mode():
        for start, window, score_from in sequential_windows(tokens, block_size, stride):
            if pending and (len(pending) == batch_size or len(window) != len(pending[0][1])):
                yield _score_windows(model, pending, spec, device)
                pending = []
            pending.append((start, window, score_from))
        if pending:
            yield _score_windows(model, pending, spec, device)


def score_model(
    model: Callable, tokens: np.ndarray, spec: FieldSpec, block_size: int | None = None,
    batch_size: int = 16, device: Any = None, stride: int | None = None,
) -> PositionScores:
    """All of ``iter_model_scores`` at once (small shards; tests)."""
    parts = list(iter_model_scores(model, np.asarray(tokens, dtype=np.int64), spec, block_size,
                                   batch_size, device, stride))
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
    n = len(confidence)
    scores = PositionScores(np.arange(n), np.zeros(n, np.int64), np.zeros(n), confidence,
                            np.asarray(correct, dtype=np.float64), np.zeros(n))
    return ScoreSums((), n_bins=n_bins).add(scores).reliability()


def block_ids(scores: PositionScores, block: int) -> np.ndarray:
    """Contiguous chunks of `block` positions within one shard (the bootstrap unit)."""
    shard = scores.shard_ids if scores.shard_ids is not None else np.zeros(len(scores), np.int64)
    _, ids = np.unique(np.stack([shard, scores.positions // block]), axis=1, return_inverse=True)
    return ids.reshape(-1)


def block_bootstrap_ci(values: np.ndarray, blocks: np.ndarray, samples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile CI of the mean of `values`, resampling whole blocks with replacement
    (``score_sums.bootstrap_mean_ci`` on the blocks' sums)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [None, None]
    return bootstrap_mean_ci(np.bincount(blocks, weights=values),
                             np.bincount(blocks).astype(np.float64), samples, seed, level)


def label_stats(targets: np.ndarray) -> dict:
    """Effective vocabulary exp(H) of the scored labels and how many distinct ones occur."""
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return {"effective_vocab": 0.0, "n_distinct_labels": 0}
    counts = np.bincount(targets)
    p = counts[counts > 0] / len(targets)
    return {"effective_vocab": float(np.exp(-(p * np.log(p)).sum())),
            "n_distinct_labels": int((counts > 0).sum())}


def sums_of(scores: PositionScores, cfg: SummaryConfig = SummaryConfig()) -> ScoreSums:
    """The running sums of a whole ``PositionScores`` (shard by shard)."""
    sums = ScoreSums(tuple(scores.field_logp), n_bins=cfg.n_bins,
                     bootstrap_block=cfg.bootstrap_block)
    if scores.shard_ids is None:
        return sums.add(scores)
    for shard_id in np.unique(scores.shard_ids):
        sums.add(scores.subset(scores.shard_ids == shard_id), int(shard_id))
    return sums


def summarize(scores: PositionScores, cfg: SummaryConfig = SummaryConfig()) -> dict:
    """Every reported metric of one scorer on one set of positions."""
    return sums_of(scores, cfg).summary(cfg.bootstrap_samples, cfg.seed, cfg.max_log_perplexity)


def paired_difference(a: PositionScores, b: PositionScores,
                      cfg: SummaryConfig = SummaryConfig()) -> dict:
    """NLL(a) - NLL(b) on the same positions, with a paired block-bootstrap 95% CI.

    Negative means `a` predicts better. Pairing cancels the shared difficulty of each
    stretch of data, so this interval is much tighter than comparing two separate CIs.
    """
    if not (np.array_equal(a.positions, b.positions) and np.array_equal(a.targets, b.targets)):
        raise ValueError("paired comparison needs two scorers on exactly the same positions")
    return sums_of(a, cfg).paired(sums_of(b, cfg), cfg.bootstrap_samples, cfg.seed)
