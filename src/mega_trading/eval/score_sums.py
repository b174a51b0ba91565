"""Every backtest metric from running sums, so scoring a split holds no per-position array.

``ScoreSums`` takes the per-position scores of one batch at a time (``scoring.PositionScores``)
and keeps only what the reported metrics need:

* per bootstrap block (``bootstrap_block`` consecutive positions of one shard): the NLL sum
  and the count; the block bootstrap resamples these, exactly as it would resample the
  positions' blocks, so its interval is the one the per-position computation gives;
* totals of the top-k hits and of each field's log-probability;
* the reliability histogram (count, confidence sum, hit sum per bin) and a label histogram.

Memory is one float per block (256 positions by default) plus fixed-size tables: 100M
scored positions keep ~400k block sums (~6 MB) per scorer instead of ~9 GB of arrays.
Two scorers on the same positions pair block by block (``paired``), which is the paired
block bootstrap of ``NLL(a) - NLL(b)``. A fingerprint of the positions and targets seen
makes a pairing of different positions an error instead of a silent wrong number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: position and target mix apart


@dataclass
class _Shard:
    """Block sums of one shard; blocks are `position // block` (they grow in one pass)."""

    nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    count: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, block_index: np.ndarray, nll: np.ndarray) -> None:
        size = int(block_index.max()) + 1
        if size > len(self.nll):
            self.nll = np.concatenate([self.nll, np.zeros(size - len(self.nll))])
            self.count = np.concatenate([self.count, np.zeros(size - len(self.count))])
        self.nll[:size] += np.bincount(block_index, weights=nll, minlength=size)
        self.count[:size] += np.bincount(block_index, minlength=size)


class ScoreSums:
    """Running sums of one scorer's per-position scores (see the module docstring)."""

    def __init__(self, field_names: tuple[str, ...] | list[str], vocab_size: int = 0,
                 n_bins: int = 15, bootstrap_block: int = 256):
        self.field_names = tuple(field_names)
        self.n_bins = n_bins
        self.block = bootstrap_block
        self.shards: dict[int, _Shard] = {}
        self.n = 0
        self.nll_sum = 0.0
        self.top1_sum = 0.0
        self.top5_sum = 0.0
        self.field_logp_sum = {name: 0.0 for name in self.field_names}
        self.bin_count = np.zeros(n_bins)
        self.bin_confidence = np.zeros(n_bins)
        self.bin_hits = np.zeros(n_bins)
        self.labels = np.zeros(vocab_size, dtype=np.int64)
        self.fingerprint = np.uint64(0)

    def add(self, scores, shard_id: int = 0) -> ScoreSums:
        """Fold in one batch of ``PositionScores`` from shard `shard_id` (any order)."""
        n = len(scores)
        if n == 0:
            return self
        nll = -np.asarray(scores.logp, dtype=np.float64)
        positions = np.asarray(scores.positions, dtype=np.int64)
        targets = np.asarray(scores.targets, dtype=np.int64)
        self.shards.setdefault(shard_id, _Shard()).add(positions // self.block, nll)
        self.n += n
        self.nll_sum += float(nll.sum())
        self.top1_sum += float(np.sum(scores.top1_hit))
        self.top5_sum += float(np.sum(scores.top5_hit))
        for name in self.field_names:
            self.field_logp_sum[name] += float(np.sum(scores.field_logp[name]))
        confidence = np.asarray(scores.top1_prob, dtype=np.float64)
        which = np.minimum((confidence * self.n_bins).astype(np.int64), self.n_bins - 1)
        self.bin_count += np.bincount(which, minlength=self.n_bins)
        self.bin_confidence += np.bincount(which, weights=confidence, minlength=self.n_bins)
        self.bin_hits += np.bincount(which, weights=scores.top1_hit, minlength=self.n_bins)
        labels = np.bincount(targets, minlength=len(self.labels))
        labels[: len(self.labels)] += self.labels
        self.labels = labels
        with np.errstate(over="ignore"):
            keys = (positions.astype(np.uint64) * _MIX) ^ (targets.astype(np.uint64)
                                                         + np.uint64(shard_id) * _MIX * _MIX)
            self.fingerprint += keys.sum(dtype=np.uint64)
        return self

    def merged(self, others: list[ScoreSums]) -> ScoreSums:
        """The sums of several disjoint shards' scorers together (the 'overall' row)."""
        out = ScoreSums(self.field_names, len(self.labels), self.n_bins, self.block)
        for part in [self, *others]:
            for shard_id, shard in part.shards.items():
                if shard_id in out.shards:
                    raise ValueError(f"shard {shard_id} appears in two parts being merged")
                out.shards[shard_id] = shard
            out.n += part.n
            out.nll_sum += part.nll_sum
            out.top1_sum += part.top1_sum
            out.top5_sum += part.top5_sum
            for name in self.field_names:
                out.field_logp_sum[name] += part.field_logp_sum[name]
            out.bin_count += part.bin_count
            out.bin_confidence += part.bin_confidence
            out.bin_hits += part.bin_hits
            out.labels = _add_padded(out.labels, part.labels)
            with np.errstate(over="ignore"):
                out.fingerprint += part.fingerprint
        return out

    # --- reading the sums ---------------------------------------------------------------------

    def block_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """NLL sum and count of every non-empty block, ordered by (shard, block)."""
        if not self.shards:
            return np.zeros(0), np.zeros(0)
        nll = np.concatenate([self.shards[s].nll for s in sorted(self.shards)])
        count = np.concatenate([self.shards[s].count for s in sorted(self.shards)])
        keep = count > 0
        return nll[keep], count[keep]

    def reliability(self) -> tuple[float, list[dict]]:
        """Expected calibration error of the top-1 probability, and its bin table."""
        bins, ece = [], 0.0
        for b in range(self.n_bins):
            n = int(self.bin_count[b])
            conf = self.bin_confidence[b] / n if n else None
            acc = self.bin_hits[b] / n if n else None
            if n:
                ece += n / self.n * abs(acc - conf)
            bins.append({"lo": b / self.n_bins, "hi": (b + 1) / self.n_bins, "count": n,
                         "confidence": conf, "accuracy": acc})
        return float(ece), bins

    def label_stats(self) -> dict:
        """Effective vocabulary exp(H) of the scored labels and how many distinct ones occur."""
        if self.n == 0:
            return {"effective_vocab": 0.0, "n_distinct_labels": 0}
        p = self.labels[self.labels > 0] / self.n
        return {"effective_vocab": float(np.exp(-(p * np.log(p)).sum())),
                "n_distinct_labels": int((self.labels > 0).sum())}

    def summary(self, samples: int = 1000, seed: int = 0,
                max_log_perplexity: float = 700.0) -> dict:
        """Every reported metric of this scorer (the fields of ``scoring.summarize``)."""
        if self.n == 0:
            return {"n_scored": 0}
        mean_nll = self.nll_sum / self.n
        ece, bins = self.reliability()
        sums, counts = self.block_sums()
        return {
            "n_scored": self.n,
            "nll_nats": mean_nll,
            "nll_nats_ci95": bootstrap_mean_ci(sums, counts, samples, seed),
            "bits_per_event": mean_nll / math.log(2),
            "perplexity": math.exp(min(mean_nll, max_log_perplexity))
            if math.isfinite(mean_nll) else math.exp(max_log_perplexity),
            "top1": self.top1_sum / self.n,
            "top5": self.top5_sum / self.n,
            "ece": ece,
            "reliability": bins,
            "per_field": {name: {"nll_nats": -s / self.n, "bits": -s / self.n / math.log(2)}
                          for name, s in self.field_logp_sum.items()},
            **self.label_stats(),
        }

    def paired(self, other: ScoreSums, samples: int = 1000, seed: int = 0) -> dict:
        """NLL(self) - NLL(other) on the same positions, with the paired block-bootstrap CI."""
        if self.n != other.n or self.fingerprint != other.fingerprint:
            raise ValueError("paired comparison needs two scorers on exactly the same positions")
        if self.n == 0:
            return {"delta_nll_nats": None, "ci95": [None, None]}
        mine, counts = self.block_sums()
        theirs, _ = other.block_sums()
        return {"delta_nll_nats": (self.nll_sum - other.nll_sum) / self.n,
                "ci95": bootstrap_mean_ci(mine - theirs, counts, samples, seed)}


def _add_padded(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), dtype=np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def bootstrap_mean_ci(sums: np.ndarray, counts: np.ndarray, samples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> list[float | None]:
    """Percentile CI of a mean, resampling whole blocks (their sums and counts) with replacement.

    Blocks keep the serial dependence of order flow inside each resampled unit, so the
    interval is not falsely narrow the way a per-position bootstrap would be.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    n_blocks = len(sums)
    if n_blocks == 0:
        return [None, None]
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
