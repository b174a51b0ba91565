"""Execution policies: when to act, and which orders to send (rules in `PolicyConfig`).

A policy is a small per-episode object. The engine asks `next_action_us(ep)` for the time
it wants to act next (None: never again) and, once the market clock reaches that time,
calls `act(ep, now_us)` for its orders. `finished` turns True after its last action.
"""

from __future__ import annotations

from mega_trading.simulate.config import PolicyConfig
from mega_trading.simulate.market import CancelAll, Episode, LimitOrder, MarketOrder, Order


class Policy:
    finished: bool = False

    def next_action_us(self, ep: Episode) -> int | None:
        raise NotImplementedError

    def act(self, ep: Episode, now_us: int) -> list[Order]:
        raise NotImplementedError

    def _finish(self, ep: Episode, finish: bool) -> list[Order]:
        self.finished = True
        orders: list[Order] = [CancelAll()]
        if finish and ep.remaining > 0:
            orders.append(MarketOrder(ep.remaining))
        return orders


class Immediate(Policy):
    def next_action_us(self, ep: Episode) -> int | None:
        return None if self.finished else ep.start_us

    def act(self, ep: Episode, now_us: int) -> list[Order]:
        self.finished = True
        return [MarketOrder(ep.remaining)]


class Twap(Policy):
    """Slice k at start + k * horizon / n buys up to schedule(k + 1) = target * (k + 1) / n."""

    def __init__(self, slices: int, limit_offset_bps: float | None, finish: bool):
        self.slices, self.offset, self.finish = slices, limit_offset_bps, finish
        self.next_slice = 0

    def slice_time_us(self, ep: Episode, k: int) -> int:
        return ep.start_us + (k * ep.horizon_us) // self.slices

    def schedule(self, ep: Episode, k: int) -> float:
        """Quantity due by the end of slice k - 1 (exactly the target for k = n)."""
        return ep.target if k >= self.slices else ep.target * k / self.slices

    def next_action_us(self, ep: Episode) -> int | None:
        if self.finished:
            return None
        if self.next_slice < self.slices:
            return self.slice_time_us(ep, self.next_slice)
        return ep.end_us

    def act(self, ep: Episode, now_us: int) -> list[Order]:
        k = self.next_slice
        if k >= self.slices:
            return self._finish(ep, self.finish)
        self.next_slice += 1
        if self.offset is None:  # market slices catch up to the schedule exactly
            return [MarketOrder(self.schedule(ep, k + 1) - ep.executed)]
        orders: list[Order] = [CancelAll()]
        behind = self.schedule(ep, k) - ep.executed
        if behind > 0:  # the previous slice's unfilled rest: limit-then-market
            orders.append(MarketOrder(behind))
        price = ep.last_price * (1.0 - ep.side * self.offset / 1e4)
        # once `behind` is bought, exactly schedule(k) is done: rest this slice's share
        done = max(ep.executed, self.schedule(ep, k))
        orders.append(LimitOrder(self.schedule(ep, k + 1) - done, price))
        return orders


class Participation(Policy):
    """Trade `rate` of the market volume seen since the start, in capped child orders."""

    def __init__(self, rate: float, max_child_fraction: float, min_child_fraction: float,
                 finish: bool):
        self.rate, self.finish = rate, finish
        self.max_child_fraction, self.min_child_fraction = max_child_fraction, min_child_fraction

    def deficit(self, ep: Episode) -> float:
        return min(self.rate * ep.market_volume - ep.executed, ep.remaining)

    def next_action_us(self, ep: Episode) -> int | None:
        if self.finished:
            return None
        if ep.now_us < ep.end_us:
            deficit = self.deficit(ep)
            if deficit > 0 and deficit >= min(self.min_child_fraction * ep.target, ep.remaining):
                return ep.now_us
        return ep.end_us

    def act(self, ep: Episode, now_us: int) -> list[Order]:
        if now_us >= ep.end_us:
            return self._finish(ep, self.finish)
        return [MarketOrder(min(self.deficit(ep), self.max_child_fraction * ep.target))]


def make_policy(cfg: PolicyConfig) -> Policy:
    if cfg.kind == "immediate":
        return Immediate()
    if cfg.kind in ("twap", "twap_limit"):
        offset = cfg.limit_offset_bps if cfg.kind == "twap_limit" else None
        return Twap(cfg.slices, offset, cfg.finish)
    return Participation(cfg.rate, cfg.max_child_fraction, cfg.min_child_fraction, cfg.finish)
