"""Training and scoring windows over token shards: counts, starts, the sequential cover
used for scoring, stratified window plans for bounded samples, and the seeded sampler.

A window is ``block_size + 1`` tokens (inputs + shifted targets) inside ONE (split, symbol)
shard, so no window ever straddles a split boundary; the sampler draws across every
symbol and the whole time range, never in storage order."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from mega_trading.core.errors import DataError

if TYPE_CHECKING:  # the shard set reads windows plans from here
    from mega_trading.data.shards import ShardSet


def n_windows(n_tokens: int, block_size: int, stride: int) -> int:
    """How many windows of block_size + 1 tokens (inputs + shifted targets) a shard holds;
    window i starts at token i * stride."""
    last = n_tokens - (block_size + 1)
    return 0 if last < 0 else last // stride + 1


def window_starts(n_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """Starts of the windows of block_size + 1 tokens (inputs + shifted targets) in a shard."""
    return np.arange(n_windows(n_tokens, block_size, stride), dtype=np.int64) * stride


def sequential_windows(
    tokens: np.ndarray, block_size: int, stride: int | None = None
) -> Iterator[tuple[int, np.ndarray, int]]:
    """Cover every target of a shard exactly once, each with as much past context as fits.

    Yields ``(start, window, score_from)``: ``window = tokens[start:start + block_size + 1]``
    (inputs ``window[:-1]``, targets ``window[1:]``); only targets with index
    ``>= score_from`` within the window are new and should be scored.
    """
    stride = min(stride or max(1, block_size // 2), block_size)
    n_targets = len(tokens) - 1
    start, scored = 0, 0  # targets [0, scored) of the shard are already covered
    while scored < n_targets:
        end = min(start + block_size, n_targets)  # this window's targets: [start, end)
        yield start, np.asarray(tokens[start:end + 1], dtype=np.int64), scored - start
        scored = end
        start = min(start + stride, max(0, n_targets - block_size))




def allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """n items split over the entries of ``weights`` in proportion to them (largest
    remainder: each entry gets floor(n * share) or one more; ties go to the earlier entry).

    Sources compared on pooled statistics must hold the markets in the same mix: a random
    draw of 32 prompts puts 1 to 6 of them on a market that holds 6 % of the events, and a
    thin market's large moves alone move the pooled kurtosis several-fold."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def stratified_starts(n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """n starts in [lo, hi): one drawn uniformly inside each of n equal strata of the range
    (so the draws cover the whole time range), or with replacement when n > hi - lo."""
    if n > hi - lo:
        return np.sort(rng.integers(lo, hi, size=n))
    edges = np.linspace(lo, hi, n + 1).astype(np.int64)
    return np.array([int(rng.integers(a, max(a + 1, b))) for a, b in itertools.pairwise(edges)],
                    dtype=np.int64)


def window_plan(ranges: dict[str, tuple[int, int]], max_events: int, window: int,
                seed: int = 0) -> list[tuple[str, int, int]]:
    """(symbol, first row, end row) of ~`max_events // window` windows of `window` rows:
    each symbol gets windows in proportion to its rows (at least one), one drawn uniformly
    inside each of that many equal strata of its row range, so the sample covers the
    whole time range and never overlaps itself."""
    rng = np.random.default_rng(seed)
    total = sum(hi - lo for lo, hi in ranges.values())
    n_total = max(1, max_events // window)
    plan = []
    for symbol, (lo, hi) in ranges.items():
        share = max(1, round(n_total * (hi - lo) / total))
        n_strata = min(share, max(1, (hi - lo) // window))
        edges = np.linspace(lo, hi, n_strata + 1).astype(np.int64)
        for a, b in itertools.pairwise(edges):
            start = int(rng.integers(a, max(a, b - window) + 1))
            plan.append((symbol, start, min(start + window, int(b))))
    return plan


class WindowSampler:
    """Seeded random training windows across every symbol and the whole time range.

    Windows are drawn with replacement, each symbol weighted by its number of windows, so
    a run never reads storage order (the prototype saw one symbol). Every rank draws the
    same global batch of ``batch_size * world_size`` windows and keeps its own slice, so
    N ranks see exactly the windows one process with the global batch would see.
    """

    def __init__(self, shards: ShardSet, split: str, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, stride: int | None = None):
        self.shards, self.split = shards, split
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        stride = stride or shards.manifest["config"]["stride"]
        self.stride = stride
        self.symbols = [s for s in shards.symbols(split)
                        if n_windows(shards.n_tokens(split, s), block_size, stride)]
        if not self.symbols:
            raise DataError(
                f"no {split} window of {block_size + 1} tokens fits in any shard; "
                f"use a smaller block_size", shards.root)
        # Memory-mapped shards, read one window at a time: nothing grows with the data.
        self._tokens = {s: shards.tokens(split, s) for s in self.symbols}
        self._n_windows = [n_windows(len(self._tokens[s]), block_size, stride) for s in self.symbols]
        counts = np.array(self._n_windows, dtype=np.float64)
        self._weights = counts / counts.sum()
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.seen = {s: 0 for s in self.symbols}
        self.batches_drawn = 0

    @property
    def windows_per_symbol(self) -> dict[str, int]:
        return dict(zip(self.symbols, self._n_windows))

    def next_batch(self):
        import torch

        global_batch = self.batch_size * self.world_size
        which = self.rng.choice(len(self.symbols), size=global_batch, p=self._weights)
        picks = [int(self.rng.integers(self._n_windows[i])) for i in which]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows, names = [], []
        for i, pick in zip(which[lo:hi], picks[lo:hi]):
            symbol = self.symbols[i]
            start = pick * self.stride
            rows.append(np.asarray(self._tokens[symbol][start:start + self.block_size + 1], dtype=np.int64))
            names.append(symbol)
        for i in which:
            self.seen[self.symbols[i]] += 1
        self.batches_drawn += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), names

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seen": dict(self.seen),
                "batches_drawn": self.batches_drawn, "symbols": list(self.symbols)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["symbols"]) != self.symbols:
            raise DataError(f"sampler state was saved for symbols {state['symbols']}, data has {self.symbols}")
        self.rng.bit_generator.state = state["rng"]
        self.seen = {s: int(v) for s, v in state["seen"].items()}
        self.batches_drawn = int(state["batches_drawn"])


