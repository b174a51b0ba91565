"""One episode's market state and the agent's execution rules (see the package docstring).

The tape price is the last traded price; there is no book. A market order pays the
impact rule of `ImpactConfig`; a resting limit order fills at its own price when a market
trade goes through it (``queue="through"``) or reaches it (``queue="touch"``). In closed
loop every agent fill is also a print on the tape: it moves the state and is queued as a
token (`pending`) for the engine to insert into the model's context.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from mega_trading.simulate.config import ImpactConfig

# prices within this relative distance count as equal (a touch, not a trade through)
PRICE_RTOL = 1e-9
# a parent order with less than this fraction left is complete (float slice sums)
QTY_RTOL = 1e-9

Encoder = Callable[[int, float, float, int], int]  # (side, move_bps, log_size, dt_us) -> token


@dataclass(frozen=True)
class StartState:
    """Where an episode starts: the last real event before it and its recent history."""

    symbol: str
    price: float
    time_us: int
    log_level: float  # ln quote-notional level the NEXT event's log_size is measured against
    recent_notional: tuple[float, ...]  # quote notional of the last events, oldest first
    row: int = -1  # the event's row in its split's table (-1: hand-built)
    vol_bps: float = float("nan")  # RMS move (bps per event) of the window before the start


@dataclass(frozen=True)
class MarketOrder:
    qty: float


@dataclass(frozen=True)
class LimitOrder:
    qty: float
    price: float


@dataclass(frozen=True)
class CancelAll:
    pass


Order = MarketOrder | LimitOrder | CancelAll


@dataclass
class Resting:
    qty: float
    price: float


@dataclass(frozen=True)
class Fill:
    time_us: int
    qty: float
    price: float
    kind: str  # "market" or "limit"
    market_volume: float  # base units the market traded since the start, at this fill


@dataclass(frozen=True)
class Print:
    """An agent fill as a tape event (closed loop): what the tokenizer encodes."""

    side: int
    move_bps: float
    log_size: float
    dt_us: int


def impact_bps(cfg: ImpactConfig, order_notional: float, recent_notional: float) -> float:
    ratio = order_notional / max(recent_notional, cfg.min_recent_notional)
    return cfg.coef_bps * (math.sqrt(ratio) if cfg.model == "sqrt" else ratio)


def crosses(trade_price: float, limit_price: float, side: int, queue: str) -> bool:
    """Does a market trade at trade_price fill a resting `side` limit at limit_price?"""
    gap = side * (limit_price - trade_price) / limit_price  # > 0: traded through
    if gap > PRICE_RTOL:
        return True
    return queue == "touch" and gap >= -PRICE_RTOL


@dataclass
class Episode:
    """Mutable state of one parent order in one simulated market."""

    start: StartState
    side: int
    target: float
    horizon_us: int
    impact: ImpactConfig
    queue: str
    lags: int
    size_window: int
    encode: Encoder | None = None  # set: closed loop, fills become tokens
    last_price: float = field(init=False)
    last_event_us: int = field(init=False)  # time of the last tape event
    now_us: int = field(init=False)  # the agent's clock (>= last_event_us)
    log_level: float = field(init=False)
    recent: collections.deque = field(init=False)
    executed: float = 0.0
    market_volume: float = 0.0  # base units of market (non-agent) trades since the start
    market_events: int = 0  # market events seen before completion
    fills: list[Fill] = field(default_factory=list)
    prints: list[Print] = field(default_factory=list)
    resting: list[Resting] = field(default_factory=list)
    pending: collections.deque = field(default_factory=collections.deque)  # tokens to insert
    completed_us: int | None = None
    end_price: float | None = None
    lag_prices: list[float] = field(default_factory=list)
    truncated: str | None = None

    def __post_init__(self) -> None:
        self.last_price = self.start.price
        self.last_event_us = self.now_us = self.start.time_us
        self.log_level = self.start.log_level
        self.recent = collections.deque(self.start.recent_notional,
                                        maxlen=self.impact.window_events)

    # --- clock and status ------------------------------------------------------------------
    @property
    def arrival_price(self) -> float:
        return self.start.price

    @property
    def start_us(self) -> int:
        return self.start.time_us

    @property
    def end_us(self) -> int:
        return self.start.time_us + self.horizon_us

    @property
    def remaining(self) -> float:
        left = self.target - self.executed
        return 0.0 if left <= QTY_RTOL * self.target else left

    @property
    def completed(self) -> bool:
        return self.completed_us is not None

    @property
    def done(self) -> bool:
        return self.truncated is not None or (self.completed and len(self.lag_prices) > self.lags)

    def complete(self) -> None:
        self.resting.clear()
        self.completed_us = self.now_us
        self.end_price = self.last_price
        self.lag_prices.append(self.last_price)

    def truncate(self, why: str) -> None:
        if self.end_price is None:
            self.end_price = self.last_price
        self.truncated = why

    # --- the agent's orders --------------------------------------------------------------
    def execute(self, orders: list[Order], at_us: int) -> None:
        self.now_us = max(self.now_us, at_us)
        for order in orders:
            if isinstance(order, CancelAll):
                self.resting.clear()
            elif isinstance(order, LimitOrder):
                if order.qty > QTY_RTOL * self.target:
                    self.resting.append(Resting(order.qty, order.price))
            elif order.qty > QTY_RTOL * self.target:
                self._market_fill(min(order.qty, self.target - self.executed))

    def _market_fill(self, qty: float) -> None:
        cost = impact_bps(self.impact, qty * self.last_price, math.fsum(self.recent))
        price = self.last_price * (1.0 + self.side * cost / 1e4)
        self._record(qty, price, "market")
        if self.encode is not None:  # the agent is the taker: its print moves the price
            move = 1e4 * (price / self.last_price - 1.0)
            self._print(self.side, move, qty * price, self.now_us - self.last_event_us)
            self.last_price = price
            self.last_event_us = self.now_us

    def _record(self, qty: float, price: float, kind: str) -> None:
        self.executed += qty
        self.fills.append(Fill(self.now_us, qty, price, kind, self.market_volume))

    def _print(self, side: int, move_bps: float, notional: float, dt_us: int) -> None:
        log_size = math.log(notional) - self.log_level
        event = Print(side, move_bps, log_size, dt_us)
        self.prints.append(event)
        self.pending.append(self.encode(event.side, event.move_bps, event.log_size, event.dt_us))
        self._observe_size(notional, log_size)

    def _observe_size(self, notional: float, log_size: float) -> None:
        self.recent.append(notional)
        # the causal level is a rolling mean of ln notional; one step of it, as generate.py
        self.log_level += log_size / self.size_window

    # --- the market's trades ---------------------------------------------------------------
    def on_market_trade(self, price: float, notional: float, time_us: int) -> None:
        """A market (non-agent) trade printed: update the tape, then fill resting orders."""
        self.last_price = price
        self.last_event_us = time_us
        self.now_us = max(self.now_us, time_us)
        self._observe_size(notional, math.log(notional) - self.log_level)
        if self.completed:
            self.lag_prices.append(price)
            return
        self.market_events += 1
        self.market_volume += notional / price
        self._fill_resting(price, notional / price)

    def _fill_resting(self, trade_price: float, trade_qty: float) -> None:
        for order in list(self.resting):
            if not crosses(trade_price, order.price, self.side, self.queue):
                continue
            through = self.side * (order.price - trade_price) / order.price > PRICE_RTOL
            # through: the whole level traded, so all of it; touch: at most the print
            qty = order.qty if through else min(order.qty, trade_qty)
            qty = min(qty, self.target - self.executed)
            order.qty -= qty
            if order.qty <= QTY_RTOL * self.target:
                self.resting.remove(order)
            if qty <= 0:  # the parent order is already complete (float slack)
                continue
            self._record(qty, order.price, "limit")
            if self.encode is not None:  # the market's taker swept us too, same instant
                self._print(-self.side, 0.0, qty * order.price, 0)
