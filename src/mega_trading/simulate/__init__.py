"""Closed-loop market simulator: execute a parent order against model-generated (or
replayed real) trade flow and measure what it costs.

Market. Trades only: the state is the tape (last traded price, time, the causal size
level of `events.py`, the notional of recent trades). Its next events come from

* the model (``source: model``): a real prompt window of ``prompt_length`` tokens, then
  tokens sampled with `mega_trading.generation.sampling.sample_next` (through the decoder engine) from one seeded ``torch.Generator``
  per batch of episodes (KV cache, sliding window like `generate.generate`). A token
  decodes to representative (side, move_bps, log_size, dt_us), integrated on the
  episode's own tape: price *= 1 + move_bps / 1e4, notional = exp(level + log_size),
  time += dt_us. SEG (if allowed) is a marker: nothing trades.
* the real tape (``source: replay``): the split's events after the same start points,
  with their real prices, notionals and times.

Starts. Episode i starts after the last event of a real window of the split (seeded, the
same points for every policy and for both sources). ``selection: random`` draws windows
uniformly; ``high_vol`` only from the top ``vol_top_fraction`` by realized volatility
(RMS move in bps per event over the window). ``replayable_starts`` keeps only starts
whose real continuation spans the horizon plus the impact lags within one segment, so a
replay never runs dry and model and replay episodes start from identical points.

Orders and fills (`market.py`):

* market order of q base units at tape price P, recent notional V (quote notional of the
  last ``impact.window_events`` tape events, floored at ``impact.min_recent_notional``):
  ``impact_bps = coef_bps * sqrt(q P / V)`` (``impact.model: sqrt``) or
  ``coef_bps * q P / V`` (``linear``); the whole order fills at
  ``P * (1 + side * impact_bps / 1e4)``.
* limit order at price L (a buy rests below the tape, a sell above): a market trade at
  price p (of either taker side: a trade-only market shows prices, not the book) fills
  it at L when it trades THROUGH L (buy: p < L, sell: p > L), the whole
  resting quantity, since the whole level traded (``queue: through``, the conservative
  default: a trade exactly at L does not fill). ``queue: touch`` also fills at p == L, at
  most the printed trade's quantity (optimistic: front of the queue). Prices within a
  relative 1e-9 count as equal. Agent prints never fill the agent's own orders.

Closed loop (model source, ``closed_loop: true``). Every agent fill is also a print on
the tape, encoded with the tokenizer and inserted into the model's context in place of
that step's proposal (which is discarded), so the flow generated after it reacts to it:

* market fill: side = the agent's, move_bps = 1e4 (fill / P - 1) (the tape moves to the
  fill price), log_size = ln(q * fill) - level, dt_us = time since the last tape event;
* limit fill: the market's taker swept the agent's order too: side = -agent side, move 0,
  log_size = ln(q * L) - level, dt_us 0, inserted right after that market trade.

Agent prints update the tape (price, level, recent notional) but never count as market
volume. Open loop: fills are recorded but neither inserted nor printed, and the market
never sees the agent. Sampling draws the same random numbers at every step whatever is
committed, so with one seed open- and closed-loop contexts are identical up to the first
inserted fill (and throughout when nothing fills). Replay flow never reacts to fills:
a replay run is open loop whatever ``closed_loop`` says (``closed_loop`` in the output is
the effective mode).

Time. Events arrive at their own times; a policy action due at time a runs before the
next market event if a <= that event's time (a tie goes to the agent), against the tape
as it is then. Policies
(`PolicyConfig`): immediate, twap (market slices), twap_limit (limit-then-market slices),
participation (rate x observed market volume, capped child orders, market order at the
horizon). Quantities are in base units (pick one ``symbol`` to keep them comparable).

Determinism: same (seed, SimConfig, PolicyConfig) -> same result. Batch b's generator is
seeded from (seed, first episode of b), so results also depend on ``batch_size``.

Output (``simulate.json``, `run.run_simulation`; JSON layout)::

    format            "mega-trading/simulate@1"
    scenario, description, source ("model"|"replay"), closed_loop (effective), seed,
    episodes          number of episodes per policy
    policy_order      policy names in the order given (the file's keys are sorted)
    policies.<name>   one per policy, <name> in immediate|twap|twap_limit|participation:
      policy          the PolicyConfig (kind, side, qty, horizon_s, slices, ...)
      summary         per metric in shortfall_bps, fill_ratio, time_to_complete_s, n_fills,
                      final_impact_bps: {n, mean, ci95: [lo, hi], std, p05, p25, median,
                      p75, p95}; plus episodes and truncated (counts)
      impact_curve    {lags: [0..L], mean_bps, ci95_lo_bps, ci95_hi_bps, n}: mean over
                      episodes of side * 1e4 * (p_k / p_arrival - 1), p_k the tape price
                      k market events after completion (lag 0 = at completion)
      episodes        one row per episode: episode, symbol, start_row, start_time_us,
                      start_vol_bps, side, target_qty, arrival_price, filled_qty,
                      fill_ratio, avg_fill_price, end_price, shortfall_bps, completed,
                      time_to_complete_s (last fill; null unless fully filled),
                      ended_after_s, market_events, n_fills, n_market_fills,
                      n_limit_fills, n_inserted, final_impact_bps, impact_bps [L+1],
                      truncated (null or why), fills [{t_s, qty, price, kind,
                      market_volume}]
    paired_shortfall  {baseline: first policy, <name>: {mean_bps, ci95}}: per-episode
                      shortfall differences vs the first policy (common random numbers)
    timing_s          seconds per policy
    config            the SimConfig (impact, sampling, queue, ...)
    lineage           provenance(): stage, run_dir, checkpoint_step, data_dir,
                      scenario_file, tokenizer_hash, manifest_hash, seed, device, ...

Metric definitions (shortfall, impact path, bootstrap) are in `metrics.py`.
"""

from mega_trading.simulate.config import (
    ImpactConfig,
    PolicyConfig,
    SimConfig,
    load_scenario,
    parse_duration,
    scenario_path,
)
from mega_trading.simulate.engine import SimResult, batch_seed, run_batch, simulate_episodes
from mega_trading.simulate.market import Episode, StartState
from mega_trading.simulate.run import FORMAT, paired_shortfall, policy_configs, run_simulation
from mega_trading.simulate.sources import (
    EventSource,
    ModelSource,
    ModelSourceFactory,
    Proposal,
    ReplaySource,
    ReplaySourceFactory,
    Tape,
    pick_starts,
)

__all__ = [
    "FORMAT", "Episode", "EventSource", "ImpactConfig", "ModelSource", "ModelSourceFactory",
    "PolicyConfig", "Proposal", "ReplaySource", "ReplaySourceFactory", "SimConfig",
    "SimResult", "StartState", "Tape", "batch_seed", "load_scenario", "paired_shortfall",
    "parse_duration", "pick_starts", "policy_configs", "run_batch", "run_simulation",
    "scenario_path", "simulate_episodes",
]
