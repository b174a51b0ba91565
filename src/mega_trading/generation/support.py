"""Tick-consistent sampling: draw only tokens a market of the row's tick class ever made.

One vocabulary serves every market, but markets differ by orders of magnitude: a BTCUSDT
tick is 0.002 bps and a NEXOUSDT tick about 8 bps; BTCUSDT trades many times a second,
NEXOUSDT every few seconds. A small model spreads a little probability over tokens that
only another market makes, and plain sampling draws them: on the demo, BTC and ETH
rollouts carried 8-16 bps moves and 4-51 s gaps (NEXO's) that their real flow never has,
and those few draws alone set the rollouts' |return| autocorrelation and kurtosis.

The row's tick class is the one the decoder uses (``binning.MoveMemory.tick_classes``): the
smallest non-zero move bin among the stream's last ``tick_window`` tokens (a SEG token
starts afresh; 0 = none seen yet). The tokenizer counts, per tick class, the TRAINING
events of every move and gap bin (``Tokenizer.tick_support``); with
``SamplingConfig.tick_support`` a token whose move or gap bin never occurred at the row's
class gets probability 0 (class 0: no restriction). It is a sampling setting like top-k,
chosen or refused by the realism score on the validation split (``sampling_search``); the
model and its likelihood are untouched.

``TickSupport`` keeps each row's last ``tick_window`` move ranks on the engine's device, so
the mask costs one gather and one fill per step.
"""

from __future__ import annotations

import numpy as np
import torch

from mega_trading.core.errors import ConfigError
from mega_trading.data.binning import move_ranks


class TickSupport:
    """The allowed tokens per tick class and the per-row state that picks the class."""

    def __init__(self, allowed: np.ndarray, ranks: np.ndarray, seg_id: int, window: int,
                 device: torch.device | str = "cpu"):
        self.allowed = torch.as_tensor(allowed, dtype=torch.bool, device=device)  # [C+1, V]
        self.ranks = torch.as_tensor(ranks, dtype=torch.long, device=device)  # [V]
        self.seg_id, self.window = seg_id, max(1, int(window))
        self.n_classes = self.allowed.shape[0] - 1

    @classmethod
    def from_tokenizer(cls, tokenizer, device: torch.device | str = "cpu") -> TickSupport:
        """From a tokenizer artifact; the specials (PAD, SEG) are allowed in every class
        (the engine's banned ids govern them)."""
        n_classes = int(tokenizer.config.get("tick_classes", 1))
        allowed = np.ones((n_classes + 1, tokenizer.vocab_size), dtype=bool)
        allowed[:, :tokenizer.n_event_tokens] = tokenizer.tick_support()
        ranks = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        move = tokenizer.field_indices(np.arange(tokenizer.n_event_tokens))["move"]
        ranks[:tokenizer.n_event_tokens] = move_ranks(move, tokenizer.move.n_neg, n_classes)
        return cls(allowed, ranks, tokenizer.seg_id,
                   int(tokenizer.config.get("tick_window", 0)), device)

    @classmethod
    def for_sampling(cls, tokenizer, tick_support: bool,
                     device: torch.device | str = "cpu") -> TickSupport | None:
        """``from_tokenizer`` when the sampling asks for tick support, else None."""
        return cls.from_tokenizer(tokenizer, device) if tick_support else None

    def start(self, prompts: torch.Tensor) -> torch.Tensor:
        """Per-row state after the prompts [B, T]: the move ranks of the last ``window``
        tokens since the last SEG, [B, window] (0 = no move, or before the SEG)."""
        tokens = prompts.to(self.ranks.device)
        width = tokens.shape[1]
        position = torch.arange(width, device=tokens.device)
        last_seg = torch.where(tokens == self.seg_id, position, -1).amax(1, keepdim=True)
        ranks = torch.where(position > last_seg, self.ranks[tokens], 0)
        if width >= self.window:
            return ranks[:, width - self.window:].clone()
        return torch.cat([ranks.new_zeros(ranks.shape[0], self.window - width), ranks], 1)

    def push(self, recent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The state after one more token per row [B]."""
        tokens = tokens.to(recent.device).view(-1)
        pushed = torch.cat([recent[:, 1:], self.ranks[tokens][:, None]], 1)
        return pushed.masked_fill((tokens == self.seg_id)[:, None], 0)

    def classes(self, recent: torch.Tensor) -> torch.Tensor:
        """Tick class per row [B]: the smallest non-zero rank in its state (0: none)."""
        big = self.n_classes + 1
        smallest = torch.where(recent > 0, recent, big).amin(1)
        return torch.where(smallest == big, 0, smallest)

    def disallowed(self, recent: torch.Tensor) -> torch.Tensor:
        """[B, V] True where a row's tick class never showed the token's bins in training."""
        return ~self.allowed[self.classes(recent)]


def restrict(logits: torch.Tensor, support: TickSupport | None,
             recent: torch.Tensor) -> torch.Tensor:
    """The logits [B, V] with each row's unsupported tokens at -inf (out of place)."""
    if support is None:
        raise ConfigError("tick_support sampling needs a TickSupport (the tokenizer's counts)")
    return logits.masked_fill(support.disallowed(recent), float("-inf"))
