"""The event loop: episodes of a batch advance in lockstep, one market event (or one
inserted agent fill) per row per step.

Each step, for each row:

1. a fill queued for insertion (closed loop) takes the step: its token is committed in
   place of the proposal, which is discarded;
2. otherwise the proposed market event is due at ``t_next`` (last tape time + its dt, or
   the replayed time); every policy action due at or before ``t_next`` runs first, at its
   own time, against the current tape. In closed loop the first action that trades takes
   the step (its fill is inserted, the proposal discarded) and the model proposes again;
3. otherwise the market event prints: the tape moves and resting limit orders may fill.

An episode completes when its parent order is filled or its policy has finished (at the
horizon); it then records the tape price after each of `impact_lags` further market
events and stops. Finished rows idle until the whole batch is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mega_trading.core.config import to_dict
from mega_trading.simulate.config import PolicyConfig, SimConfig
from mega_trading.simulate.market import Episode
from mega_trading.simulate.metrics import episode_row, impact_curve, summarize
from mega_trading.simulate.policies import Policy, make_policy
from mega_trading.simulate.sources import EventSource, Proposal

SourceFactory = Callable[[Sequence[int], int], EventSource]  # (episode ids, seed) -> source
MAX_ACTIONS_PER_STEP = 10_000  # a policy acting more often than this without time passing is a bug


@dataclass
class SimResult:
    """Everything one policy's episodes produced (`to_dict` is its JSON section)."""

    policy: PolicyConfig
    config: SimConfig
    seed: int
    source: str
    closed_loop: bool  # effective: a replay source never takes fills into its flow
    episodes: list[dict]
    summary: dict
    impact_curve: dict

    def to_dict(self) -> dict:
        return {"policy": to_dict(self.policy), "source": self.source,
                "closed_loop": self.closed_loop, "seed": self.seed, "summary": self.summary,
                "impact_curve": self.impact_curve, "episodes": self.episodes}


def batch_seed(seed: int, first_episode: int) -> int:
    """Seed of one batch's generator: a function of (seed, first episode) only."""
    return int(np.random.SeedSequence([seed, first_episode]).generate_state(1)[0])


def simulate_episodes(source_factory: SourceFactory, policy: PolicyConfig, cfg: SimConfig,
                      seed: int = 0, size_window: int = 1000,
                      on_batch: Callable[[int, int], None] | None = None) -> SimResult:
    """Run cfg.episodes episodes of `policy`, cfg.batch_size at a time -> SimResult.

    Deterministic in (seed, cfg, policy): batch b's source is built with
    `batch_seed(seed, first episode of b)`. `size_window` is the events' rolling size
    window (the level agent fills are sized against in closed loop).
    """
    rows: list[dict] = []
    source_kind, closed = "", False
    for lo in range(0, cfg.episodes, cfg.batch_size):
        ids = list(range(lo, min(lo + cfg.batch_size, cfg.episodes)))
        source = source_factory(ids, batch_seed(seed, lo))
        closed = cfg.closed_loop and source.reacts_to_fills
        source_kind = source.kind
        episodes = [Episode(start, policy.sign, policy.qty, policy.horizon_us, cfg.impact,
                            cfg.queue, cfg.impact_lags, size_window,
                            source.encode if closed else None) for start in source.starts]
        run_batch(source, episodes, [make_policy(policy) for _ in ids], cfg.max_events)
        rows += [episode_row(ep, i) for i, ep in zip(ids, episodes)]
        if on_batch is not None:
            on_batch(ids[-1] + 1, cfg.episodes)
    return SimResult(policy, cfg, seed, source_kind, closed, rows,
                     summarize(rows, cfg.bootstrap_samples, seed),
                     impact_curve(rows, cfg.impact_lags, cfg.bootstrap_samples, seed))


def run_batch(source: EventSource, episodes: list[Episode], policies: list[Policy],
              max_events: int) -> int:
    """Step every episode until all are done or max_events steps passed; returns steps."""
    steps = 0
    while steps < max_events and not all(ep.done for ep in episodes):
        proposal = source.propose()
        tokens = proposal.token.copy()
        consumed = np.ones(len(episodes), dtype=bool)
        for b, (ep, policy) in enumerate(zip(episodes, policies)):
            inserted = step_episode(ep, policy, proposal, b)
            if inserted is not None:
                tokens[b], consumed[b] = inserted, False
        source.commit(tokens, consumed)
        steps += 1
    for ep in episodes:
        if not ep.done:  # say how far it got: a flow too fast for the budget, or too slow
            reached_s = (ep.now_us - ep.start.time_us) / 1e6
            ep.truncate(f"max_events={max_events} reached {reached_s:.1f} s into the "
                        f"episode ({max_events / max(reached_s, 1e-6):.0f} events/s)")
    return steps


def _market_event(ep: Episode, p: Proposal, b: int) -> tuple[float, float, int]:
    """(price, quote notional, time) of row b's proposed event on this episode's tape."""
    if p.price is not None:
        return float(p.price[b]), float(p.quote_qty[b]), int(p.time_us[b])
    price = ep.last_price * (1.0 + float(p.move_bps[b]) / 1e4)
    notional = float(np.exp(ep.log_level + float(p.log_size[b])))
    return price, notional, ep.last_event_us + int(p.dt_us[b])


def step_episode(ep: Episode, policy: Policy, p: Proposal, b: int) -> int | None:
    """Advance one episode by one step; returns the token inserted in place of the
    proposal (closed loop), or None when the proposal was consumed."""
    if ep.done:
        return None
    if ep.pending:
        return ep.pending.popleft()
    if p.exhausted is not None and p.exhausted[b]:
        ep.truncate("the replayed tape ended")
        return None
    is_event = bool(p.is_event[b])
    price, notional, t_next = _market_event(ep, p, b) if is_event else (0.0, 0.0, ep.last_event_us)
    for _ in range(MAX_ACTIONS_PER_STEP):
        if ep.completed:
            break
        due = policy.next_action_us(ep)
        if due is None or due > t_next:
            break
        ep.execute(policy.act(ep, max(due, ep.now_us)), max(due, ep.now_us))
        if policy.finished or ep.remaining == 0:
            ep.complete()
        if ep.pending:  # closed loop: the fill is the event of this step
            return ep.pending.popleft()
    else:
        raise RuntimeError(f"policy {type(policy).__name__} acted {MAX_ACTIONS_PER_STEP} times "
                           "without the market moving")
    if is_event:
        ep.on_market_trade(price, notional, t_next)
        if not ep.completed and ep.remaining == 0:
            ep.complete()
    return None
