"""THE decoder engine: one object owns a batch's decoding, in the spirit of nanochat's Engine.

``DecodeEngine(model, cache_len, keep, specials, support)`` holds the model, its KV cache,
the sliding window, the banned ids of each sampling config, the rows' tick-support state
(``support.TickSupport``: used by a sampling config with ``tick_support``) and the fused
decode weights, fetched ONCE per engine (parameters do not change while sampling). Its
step API:

* ``start(prompts)``: prefill prompts [B, T] (cut to their last ``cache_len`` tokens); an
  engine may start again, on a new batch: the cache of the last one is zeroed and reused
  when the batch size is the same (the rollout service's batches, the simulator's);
* ``logits``: the logits the next token is drawn from, [B, V];
* ``sample(sampling, generator, rows=None)``: draw the next token of every row (or of a
  slice of rows, each caller's own generator: the rollout service's requests);
* ``sample_each(draws)``: the same, each slice of rows with its own settings and generator
  in one pass per distinct settings (the rollout service's batches);
* ``feed(tokens)``: append one token per row [B] and compute the next logits: one fused
  decode step, or, when the cache is full, the window slides (below).

``generate.generate`` (batch rollouts), the rollout service (``serve.RolloutEngine``, its
batched requests) and the simulator's ``ModelSource`` (propose = sample, commit = feed,
where an agent fill may replace the proposal) all decode through it.

Sliding window. RoPE tables (and the cache) stop at ``cache_len <= block_size``
positions. When a token arrives and the cache is full, the engine keeps the newest
``keep`` tokens (default ``cache_len // 2``, the new one included), re-prefills them at
positions ``0 .. keep-1`` and carries on decoding, so positions never pass the model's
range and the context always holds between ``keep`` and ``cache_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mega_trading.core.errors import ConfigError
from mega_trading.generation.sampling import SamplingConfig, race_probs, race_winner, sample_next
from mega_trading.generation.support import TickSupport, restrict
from mega_trading.model.decode import clear_cache, decode_step, decode_weights
from mega_trading.model.transformer import Transformer


def special_ids(vocab_size: int) -> tuple[int, int]:
    """(PAD, SEG) for a vocabulary laid out as the tokenizer contract says."""
    return vocab_size - 2, vocab_size - 1


def banned_ids(cfg: SamplingConfig, pad_id: int, seg_id: int) -> tuple[int, ...]:
    return tuple(i for i, banned in ((pad_id, cfg.forbid_pad), (seg_id, cfg.forbid_seg)) if banned)


def prefill(model, cache, prompt: torch.Tensor) -> torch.Tensor:
    """Run prompt [B, T] from position 0, filling the cache; logits of its last token [B, V]."""
    if hasattr(model, "last_logits"):  # the head on the last position only
        return model.last_logits(prompt, cache=cache, start_pos=0)
    return model(prompt, cache=cache, start_pos=0)[:, -1]


def decode_one(model, cache, token: torch.Tensor, pos: int, weights=None) -> torch.Tensor:
    """Feed token [B, 1] at cache position pos; logits for the next token [B, V].
    `weights`: the model's `decode.decode_weights`, fetched once per engine."""
    return decode_step(model, token, cache, pos, weights)  # fused weights, far fewer ops


def sample_step(logits: torch.Tensor, cfg: SamplingConfig, banned: Sequence[int] | torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """Banned ids to -inf, then `sampling.sample_next` with cfg's settings."""
    if len(banned):  # out of place: the caller (and on_logits) may still hold these logits
        ids = torch.as_tensor(banned, dtype=torch.long, device=logits.device)
        logits = logits.index_fill(-1, ids, float("-inf"))
    return sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, generator)


def window_sizes(model, cache_len: int | None, keep: int | None) -> tuple[int, int]:
    """(cache_len, keep) checked against the model's block size (defaults: block, half)."""
    block = model.cfg.block_size
    cache_len = cache_len or block
    if not 1 <= cache_len <= block:
        raise ConfigError(f"cache_len must be in [1, block_size={block}], got {cache_len}")
    keep = cache_len // 2 if keep is None else keep
    if not 1 <= keep <= cache_len:
        raise ConfigError(f"keep must be in [1, cache_len={cache_len}], got {keep}")
    return cache_len, keep


class DecodeEngine:
    """A batch of rows decoded together on one KV cache with a sliding window."""

    def __init__(self, model, cache_len: int | None = None, keep: int | None = None,
                 specials: tuple[int, int] | None = None, support: TickSupport | None = None):
        self.model = model
        self.cache_len, self.keep = window_sizes(model, cache_len, keep)
        self.pad_id, self.seg_id = specials or special_ids(model.cfg.vocab_size)
        self.device = model.tok_embeddings.weight.device
        # Parameters do not change while sampling: fetch the fused weights once.
        self.weights = decode_weights(model) if isinstance(model, Transformer) else None
        self._banned: dict[tuple[bool, bool], torch.Tensor] = {}
        self.cache = None
        self.context: torch.Tensor | None = None  # [B, cache_len]: the tokens in the cache
        self.length = 0  # tokens in the cache (positions 0 .. length-1)
        self.logits: torch.Tensor | None = None
        self.support = support
        self.recent: torch.Tensor | None = None  # [B, tick_window] move ranks (support)

    @torch.inference_mode()
    def start(self, prompts: torch.Tensor) -> torch.Tensor:
        """Prefill prompts [B, T] (their last cache_len tokens) -> logits [B, V]."""
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ConfigError(f"prompt must be a non-empty [B, T] tensor, got {tuple(prompts.shape)}")
        kept = prompts[:, -self.cache_len:].to(self.device)
        batch, self.length = kept.shape
        if self.cache is None or self.context.shape[0] != batch:
            self.cache = self.model.new_cache(batch, self.cache_len)
            self.context = torch.empty(batch, self.cache_len, dtype=torch.long, device=self.device)
        else:  # a new batch on the same rows: exactly a new cache's state, no allocation
            clear_cache(self.cache)
        self.context[:, :self.length] = kept
        if self.support is not None:  # from the whole prompt: it may be longer than the cache
            self.recent = self.support.start(prompts)
        self.logits = prefill(self.model, self.cache, self.context[:, :self.length])
        return self.logits

    def banned(self, sampling: SamplingConfig) -> torch.Tensor:
        flags = (sampling.forbid_pad, sampling.forbid_seg)
        if flags not in self._banned:
            ids = banned_ids(sampling, self.pad_id, self.seg_id)
            self._banned[flags] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._banned[flags]

    def supported_logits(self, sampling: SamplingConfig) -> torch.Tensor:
        """The logits with tokens outside each row's tick support at -inf when `sampling`
        asks for it (out of place), else the logits themselves."""
        if not sampling.tick_support:
            return self.logits
        return restrict(self.logits, self.support, self.recent)

    @torch.inference_mode()
    def sample(self, sampling: SamplingConfig, generator: torch.Generator | None = None,
               rows: slice | None = None) -> torch.Tensor:
        """The next token of every row [B] (or of `rows`), drawn from `generator`."""
        logits = self.supported_logits(sampling)
        logits = logits if rows is None else logits[rows]
        return sample_step(logits, sampling, self.banned(sampling), generator)

    @torch.inference_mode()
    def sample_each(self, draws: Sequence[tuple[SamplingConfig, torch.Generator, slice]]
                    ) -> torch.Tensor:
        """The next token of every row [B]; each slice of rows drawn with its own settings
        and generator (the rollout service's requests). The same tokens as ``sample`` on each
        slice, with one pass over all B rows per distinct settings instead of one per slice:
        every op but the random draw runs on all rows (a row's arithmetic does not depend on
        the others, and the shape does not depend on the slices); each slice draws its race
        from its own generator, as ``sample`` would. Rows in no slice give PAD."""
        tokens = torch.full((self.logits.shape[0],), self.pad_id, dtype=torch.long,
                            device=self.device)
        by_settings: dict[SamplingConfig, list[tuple[torch.Generator, slice]]] = {}
        for sampling, generator, rows in draws:
            by_settings.setdefault(sampling, []).append((generator, rows))
        for sampling, slices in by_settings.items():
            banned = self.banned(sampling)
            logits = self.supported_logits(sampling)
            logits = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
            logits = logits.float()
            if sampling.temperature == 0:
                choice = logits.argmax(-1)
            else:
                probs, indices = race_probs(logits, sampling.temperature, sampling.top_k,
                                            sampling.top_p, sampling.min_p)
                race = torch.ones_like(probs)
                for generator, rows in slices:
                    race[rows].exponential_(1.0, generator=generator)
                choice = race_winner(probs, race, indices)
            for _, rows in slices:
                tokens[rows] = choice[rows]
        return tokens

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row [B]; slide the window when the cache is full -> logits."""
        new = tokens.to(self.device).view(-1, 1)
        if self.support is not None:
            self.recent = self.support.push(self.recent, new[:, 0])
        if self.length < self.cache_len:
            self.context[:, self.length] = new[:, 0]
            self.logits = decode_one(self.model, self.cache, new, self.length, self.weights)
            self.length += 1
        else:  # no free slot: keep the newest `keep` tokens (this one too), re-prefill them
            kept = torch.cat([self.context[:, self.cache_len - self.keep + 1:], new], dim=1)
            self.context[:, :self.keep] = kept
            self.length = self.keep
            self.logits = prefill(self.model, self.cache, self.context[:, :self.keep])
        return self.logits
