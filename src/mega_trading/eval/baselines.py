"""Reference predictors the model must beat, fitted on TRAIN token shards only.

Every baseline gives a full next-token distribution over the whole vocabulary from a
fixed-length *context*: the ``context_len`` tokens before the target, oldest first. The
shared scoring path (``scoring.score_baseline``) turns those distributions into metrics
exactly as it does for the model, so every number in a backtest is computed one way.

Contexts (``context_matrix``):

* never cross a shard boundary (each shard is processed on its own);
* never cross a segment start: the ``seg_id`` token itself is kept (it tells a predictor
  "a segment just began"), anything before it is replaced by ``NONE`` (-1), like the
  ``<s>`` padding of a sentence-level language model. The start of a shard counts as a
  segment start even without a ``seg_id`` token.

Baselines (``fit_baselines`` builds all five):

* ``uniform``        1/V for every token.
* ``unigram``        add-k smoothed training frequencies (every token but ``pad_id``).
* ``copy_previous``  p(previous token) = 1 - eps, every other token eps / (V - 1); eps is
                     the maximum-likelihood miss rate of copying on training event pairs
                     (add-half smoothed). After a special token (segment start) it has
                     nothing to copy and predicts uniform.
* ``markov1``/``markov3``  interpolated Kneser-Ney n-gram models conditioning on 1 / 3
                     previous tokens (2-grams / 4-grams), counts hashed into sorted int64
                     keys so fitting and scoring are numpy-vectorized.

``MarkovModel.generate`` / ``generate_batch`` sample from the chain (the facts stage uses
it as a baseline generator).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mega_trading.core.config import PositiveFloat, PositiveInt, config_dataclass

NONE = -1  # a context slot before the segment (or shard) start


# --- contexts -------------------------------------------------------------------------------

def segment_floor(tokens: np.ndarray, seg_id: int) -> np.ndarray:
    """For each index i, the index of the latest ``seg_id`` at or before i (0 if none)."""
    tokens = np.asarray(tokens)
    idx = np.arange(len(tokens), dtype=np.int64)
    return np.maximum.accumulate(np.where(tokens == seg_id, idx, 0)) if len(tokens) else idx


def context_matrix(
    tokens: np.ndarray, positions: np.ndarray, context_len: int, seg_id: int,
    floor: np.ndarray | None = None,
) -> np.ndarray:
    """Contexts ``[len(positions), context_len]`` (oldest first) of the targets at `positions`.

    A position may equal ``len(tokens)`` (the next, not yet generated token). Slots before
    the latest segment start at or before ``position - 1`` are ``NONE``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    out = np.full((len(positions), context_len), NONE, dtype=np.int64)
    if context_len == 0 or len(positions) == 0:
        return out
    if floor is None:
        floor = segment_floor(tokens, seg_id)
    has_past = positions >= 1
    start = np.zeros(len(positions), dtype=np.int64)
    start[has_past] = floor[positions[has_past] - 1]
    for back in range(1, context_len + 1):
        src = positions - back
        ok = has_past & (src >= start)
        out[ok, context_len - back] = tokens[src[ok]]
    return out


def tail_contexts(seqs: np.ndarray, context_len: int, seg_id: int) -> np.ndarray:
    """Contexts of the token after each row of ``seqs [B, L]`` (same rule as context_matrix).

    Only the last ``context_len`` tokens matter: a segment start further back cannot
    truncate them.
    """
    seqs = np.atleast_2d(np.asarray(seqs, dtype=np.int64))
    out = np.full((len(seqs), context_len), NONE, dtype=np.int64)
    if context_len == 0 or seqs.shape[1] == 0:
        return out
    tail = seqs[:, -context_len:]
    width = tail.shape[1]
    is_seg = tail == seg_id
    last_seg = np.where(is_seg.any(axis=1), width - 1 - np.argmax(is_seg[:, ::-1], axis=1), 0)
    valid = np.arange(width)[None, :] >= last_seg[:, None]
    out[:, context_len - width:] = np.where(valid, tail, NONE)
    return out


FIT_CHUNK_TOKENS = 1 << 20


def iter_targets_and_contexts(
    shards: Sequence[np.ndarray], context_len: int, seg_id: int, pad_id: int,
    chunk_tokens: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training (target, context) pairs of positions >= 1 of every shard, pad excluded, a
    chunk of positions at a time. A chunk reads its own tokens and the `context_len` before
    them only (an earlier segment start cannot reach into the context), so a memory-mapped
    shard of any size is fitted in bounded memory."""
    chunk_tokens = chunk_tokens or FIT_CHUNK_TOKENS
    for raw in shards:
        for lo in range(1, len(raw), chunk_tokens):
            hi = min(lo + chunk_tokens, len(raw))
            start = max(0, lo - context_len - 1)
            local = np.asarray(raw[start:hi], dtype=np.int64)
            positions = np.arange(lo - start, hi - start, dtype=np.int64)
            positions = positions[local[positions] != pad_id]
            yield local[positions], context_matrix(local, positions, context_len, seg_id)


# --- the common interface -------------------------------------------------------------------

class Baseline:
    """A next-token distribution from a fixed-length context.

    Subclasses set ``name``, ``vocab_size``, ``context_len`` and implement ``probs``.
    """

    name: str = "baseline"
    vocab_size: int
    context_len: int
    seg_id: int
    pad_id: int

    def probs(self, contexts: np.ndarray) -> np.ndarray:
        """``[m, vocab_size]`` float64 probabilities (rows sum to 1) for ``[m, context_len]``."""
        raise NotImplementedError

    def log_probs(self, contexts: np.ndarray) -> np.ndarray:
        return np.log(self.probs(contexts))

    def contexts_for(self, tokens: np.ndarray, positions: np.ndarray,
                     floor: np.ndarray | None = None) -> np.ndarray:
        return context_matrix(tokens, positions, self.context_len, self.seg_id, floor)

    def state(self) -> dict:
        """The fitted parameters (for equality checks and lineage)."""
        return {}

    # --- sampling -----------------------------------------------------------------------
    def generate_batch(self, prompts: np.ndarray, n_new: int, rng: np.random.Generator,
                       allow_specials: bool = True) -> np.ndarray:
        """Extend each row of ``prompts [B, L]`` by ``n_new`` sampled tokens -> ``[B, L+n_new]``.

        ``pad_id`` is never sampled; with ``allow_specials=False`` neither is ``seg_id``.
        """
        prompts = np.atleast_2d(np.asarray(prompts, dtype=np.int64))
        seqs = np.zeros((prompts.shape[0], prompts.shape[1] + n_new), dtype=np.int64)
        seqs[:, : prompts.shape[1]] = prompts
        banned = [self.pad_id] + ([] if allow_specials else [self.seg_id])
        for step in range(prompts.shape[1], seqs.shape[1]):
            p = self.probs(tail_contexts(seqs[:, :step], self.context_len, self.seg_id))
            p[:, banned] = 0.0
            seqs[:, step] = _sample_rows(p, rng)
        return seqs

    def generate(self, prompt: np.ndarray, n_new: int, rng: np.random.Generator,
                 allow_specials: bool = True) -> np.ndarray:
        """``prompt`` followed by ``n_new`` sampled tokens (1-D)."""
        return self.generate_batch(np.asarray(prompt)[None, :], n_new, rng, allow_specials)[0]

    def sample(self, context: np.ndarray, rng: np.random.Generator) -> int:
        """One token drawn after the 1-D token history ``context``."""
        context = np.asarray(context, dtype=np.int64)
        return int(self.generate(context, 1, rng)[-1])


def _sample_rows(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One inverse-CDF draw per row of a non-negative (unnormalized) matrix."""
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)


# --- simple baselines -----------------------------------------------------------------------

@dataclass
class UniformBaseline(Baseline):
    vocab_size: int
    seg_id: int
    pad_id: int
    name: str = "uniform"
    context_len: int = 0

    def probs(self, contexts: np.ndarray) -> np.ndarray:
        return np.full((len(contexts), self.vocab_size), 1.0 / self.vocab_size)


@dataclass
class UnigramBaseline(Baseline):
    vocab_size: int
    seg_id: int
    pad_id: int
    p: np.ndarray
    name: str = "unigram"
    context_len: int = 0

    @classmethod
    def fit(cls, shards: Sequence[np.ndarray], vocab_size: int, seg_id: int, pad_id: int,
            add_k: float = 0.5) -> UnigramBaseline:
        counts = np.zeros(vocab_size)
        for targets, _ in iter_targets_and_contexts(shards, 0, seg_id, pad_id):
            counts += np.bincount(targets, minlength=vocab_size)[:vocab_size]
        smoothed = counts + add_k
        return cls(vocab_size, seg_id, pad_id, smoothed / smoothed.sum())

    def probs(self, contexts: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.p, (len(contexts), self.vocab_size)).copy()

    def state(self) -> dict:
        return {"p": self.p}


@dataclass
class CopyPreviousBaseline(Baseline):
    vocab_size: int
    seg_id: int
    pad_id: int
    n_event_tokens: int
    eps: float
    name: str = "copy_previous"
    context_len: int = 1

    @classmethod
    def fit(cls, shards: Sequence[np.ndarray], vocab_size: int, seg_id: int, pad_id: int,
            n_event_tokens: int) -> CopyPreviousBaseline:
        n = misses = 0
        for targets, ctx in iter_targets_and_contexts(shards, 1, seg_id, pad_id):
            prev = ctx[:, 0]
            copying = (prev >= 0) & (prev < n_event_tokens) & (targets < n_event_tokens)
            n += int(copying.sum())
            misses += int((targets[copying] != prev[copying]).sum())
        # Maximum likelihood eps = misses / n; the add-half keeps it inside (0, 1).
        eps = (misses + 0.5) / (n + 1.0)
        return cls(vocab_size, seg_id, pad_id, n_event_tokens, float(eps))

    def probs(self, contexts: np.ndarray) -> np.ndarray:
        prev = np.asarray(contexts)[:, 0]
        p = np.full((len(prev), self.vocab_size), self.eps / (self.vocab_size - 1))
        can_copy = (prev >= 0) & (prev < self.n_event_tokens)
        rows = np.flatnonzero(can_copy)
        p[rows, prev[rows]] = 1.0 - self.eps
        p[~can_copy] = 1.0 / self.vocab_size
        return p

    def state(self) -> dict:
        return {"eps": self.eps}


# --- Kneser-Ney Markov chain ----------------------------------------------------------------

@dataclass
class _Level:
    """One n-gram order: hashed n-gram counts and their context totals."""

    gram_keys: np.ndarray  # sorted unique (context, token) keys
    gram_counts: np.ndarray  # raw counts (highest order) or continuation counts (lower)
    ctx_keys: np.ndarray  # sorted unique context keys
    ctx_total: np.ndarray  # sum of gram_counts per context
    ctx_types: np.ndarray  # distinct continuations per context
    discount: float


def _fold(symbols: np.ndarray, base: int) -> np.ndarray:
    """Hash rows of symbols in [0, base) into int64 keys (base-`base` digits, oldest first)."""
    key = np.zeros(len(symbols), dtype=np.int64)
    for col in range(symbols.shape[1]):
        key = key * base + symbols[:, col]
    return key


def _kn_discount(counts: np.ndarray) -> float:
    """Ney's estimate n1 / (n1 + 2 n2), kept inside [0.05, 0.95] so no mass is ever 0."""
    n1 = float((counts == 1).sum())
    n2 = float((counts == 2).sum())
    d = n1 / (n1 + 2.0 * n2) if n1 + n2 > 0 else 0.5
    return float(np.clip(d, 0.05, 0.95))


def _level(gram_keys: np.ndarray, gram_counts: np.ndarray, base: int) -> _Level:
    ctx_of_gram = gram_keys // base
    ctx_keys, first = np.unique(ctx_of_gram, return_index=True)
    ctx_total = np.add.reduceat(gram_counts, first) if len(first) else np.zeros(0)
    ctx_types = np.diff(np.append(first, len(gram_keys)))
    return _Level(gram_keys, gram_counts.astype(np.float64), ctx_keys,
                  ctx_total.astype(np.float64), ctx_types.astype(np.float64),
                  _kn_discount(gram_counts))


@dataclass
class MarkovModel(Baseline):
    """Interpolated Kneser-Ney chain of order ``context_len`` (an n-gram of n = order + 1).

    P_j(w | h) = max(a_j(h w) - D_j, 0) / A_j(h) + D_j T_j(h) / A_j(h) * P_{j-1}(w | h')

    with a_n the raw counts, a_j (j < n) the continuation counts N1+(. h w), A_j(h) their
    sum over w, T_j(h) the number of distinct w with a_j(h w) > 0, h' = h without its
    oldest token; an unseen context (A_j(h) = 0) backs off entirely. The recursion ends in
    the continuation unigram interpolated with uniform 1/V, so every token has mass > 0.
    NONE context slots are one extra symbol (id V) in the hashed keys.
    """

    vocab_size: int
    seg_id: int
    pad_id: int
    context_len: int
    levels: list  # _Level per order 1..n
    name: str = "markov"

    @property
    def base(self) -> int:
        return self.vocab_size + 1

    @classmethod
    def fit(cls, shards: Sequence[np.ndarray], vocab_size: int, seg_id: int, pad_id: int,
            order: int) -> MarkovModel:
        base = vocab_size + 1
        n = order + 1
        if float(base) ** n >= 2.0 ** 62:
            raise ValueError(f"a {n}-gram over {vocab_size} tokens does not fit an int64 key")
        # n-gram counts merged chunk by chunk: memory follows the distinct n-grams, not the data
        keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for targets, ctx in iter_targets_and_contexts(shards, order, seg_id, pad_id):
            grams = np.concatenate([np.where(ctx < 0, vocab_size, ctx), targets[:, None]], axis=1)
            chunk_keys, chunk_counts = np.unique(_fold(grams, base), return_counts=True)
            keys, inverse = np.unique(np.concatenate([keys, chunk_keys]), return_inverse=True)
            counts = np.bincount(inverse, weights=np.concatenate([counts, chunk_counts]),
                                 minlength=len(keys)).astype(np.int64)
        levels = [_level(keys, counts, base)]
        for j in range(n - 1, 0, -1):
            # Continuation count of a j-gram: distinct tokens seen before it, i.e. the
            # number of distinct (j+1)-gram types that end with it.
            lower_keys, lower_counts = np.unique(keys % base ** j, return_counts=True)
            levels.append(_level(lower_keys, lower_counts, base))
            keys = lower_keys
        levels.reverse()
        model = cls(vocab_size, seg_id, pad_id, order, levels)
        model.name = f"markov{order}"
        return model

    def probs(self, contexts: np.ndarray) -> np.ndarray:
        contexts = np.asarray(contexts, dtype=np.int64)
        m, V, base = len(contexts), self.vocab_size, self.base
        symbols = np.where(contexts < 0, V, contexts)
        unigram = self.levels[0]
        p1 = np.zeros(V)
        if len(unigram.gram_keys):
            total = unigram.ctx_total[0]
            p1[unigram.gram_keys] = np.maximum(unigram.gram_counts - unigram.discount, 0) / total
            p1 += unigram.discount * unigram.ctx_types[0] / total / V
        else:
            p1[:] = 1.0 / V
        p = np.broadcast_to(p1, (m, V)).copy()
        for j, level in enumerate(self.levels[1:], start=1):
            hkey = _fold(symbols[:, self.context_len - j:], base)
            self._interpolate(p, hkey, level)
        return p

    def _interpolate(self, p: np.ndarray, hkey: np.ndarray, level: _Level) -> None:
        """In place: p <- discounted counts of context h + back-off weight * p."""
        if len(level.ctx_keys) == 0:
            return
        base = self.base
        where = np.minimum(np.searchsorted(level.ctx_keys, hkey), len(level.ctx_keys) - 1)
        seen = level.ctx_keys[where] == hkey
        total = np.where(seen, level.ctx_total[where], 1.0)
        backoff = np.where(seen, level.discount * level.ctx_types[where] / total, 1.0)
        p *= backoff[:, None]
        lo = np.searchsorted(level.gram_keys, hkey * base)
        hi = np.searchsorted(level.gram_keys, hkey * base + base)
        n_per_row = np.where(seen, hi - lo, 0)
        if n_per_row.sum() == 0:
            return
        rows = np.repeat(np.arange(len(hkey)), n_per_row)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(n_per_row) - n_per_row, n_per_row)
        entries = np.repeat(lo, n_per_row) + offsets
        tokens = level.gram_keys[entries] % base
        p[rows, tokens] += np.maximum(level.gram_counts[entries] - level.discount, 0) / total[rows]

    def state(self) -> dict:
        out = {}
        for j, level in enumerate(self.levels, start=1):
            out[f"order{j}_keys"] = level.gram_keys
            out[f"order{j}_counts"] = level.gram_counts
            out[f"order{j}_discount"] = level.discount
        return out

    def summary(self) -> dict:
        return {f"order{j}": {"n_grams": len(lv.gram_keys), "n_contexts": len(lv.ctx_keys),
                              "discount": lv.discount}
                for j, lv in enumerate(self.levels, start=1)}


# --- all of them ----------------------------------------------------------------------------

@config_dataclass
class BaselineConfig:
    unigram_add_k: PositiveFloat = 0.5
    markov_orders: tuple[PositiveInt, ...] = (1, 3)
    # An n-gram table grows with the distinct n-grams of its training data (markov3: 0.8M
    # 4-grams at 1M synthetic events, 3.2M at 4M). Above this many train tokens the
    # baselines are fitted on the most recent ones (each symbol's tail, in proportion),
    # which keeps backtest and facts in bounded memory; backtest.json records the count.
    max_fit_tokens: PositiveInt = 2_000_000


def fit_baselines(
    train_shards: Sequence[np.ndarray], vocab_size: int, seg_id: int, pad_id: int,
    n_event_tokens: int, cfg: BaselineConfig = BaselineConfig(),
) -> dict[str, Baseline]:
    """Every baseline, fitted on the given TRAINING shards (one 1-D token array per shard)."""
    shards = list(train_shards)  # memory-mapped shards stay on disk: fitting reads chunks
    out: dict[str, Baseline] = {
        "uniform": UniformBaseline(vocab_size, seg_id, pad_id),
        "unigram": UnigramBaseline.fit(shards, vocab_size, seg_id, pad_id, cfg.unigram_add_k),
        "copy_previous": CopyPreviousBaseline.fit(shards, vocab_size, seg_id, pad_id,
                                                  n_event_tokens),
    }
    for order in cfg.markov_orders:
        out[f"markov{order}"] = MarkovModel.fit(shards, vocab_size, seg_id, pad_id, order)
    return out
