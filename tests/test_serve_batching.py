"""When the rollout service's worker starts a batch: the batching policy of serve.Batcher,
driven directly (no model, no HTTP) by jobs submitted at chosen times."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mega_trading.core.errors import ConfigError
from mega_trading.generation.sampling import SamplingConfig
from mega_trading.serve.batching import Batcher, Job
from mega_trading.serve.schemas import ServeSettings


class RecordingEngine:
    """Stands in for RolloutEngine: records each batch's seeds, answers zeros at once."""

    def __init__(self, batch_rows: int):
        self.batch_rows = batch_rows
        self.batches: list[list[int]] = []

    def run_batch(self, jobs, on_done) -> None:
        self.batches.append([job.seed for job in jobs])
        for job in jobs:
            on_done(job, np.zeros((job.n, job.length), dtype=np.int64))


def job(seed: int, prompt_length: int = 3) -> Job:
    return Job(prompt=np.arange(prompt_length, dtype=np.int64), n=1, length=2,
               sampling=SamplingConfig(), seed=seed)


async def submit_at(batcher: Batcher, delays_s: list[float], seeds=None) -> list[float]:
    """Submit one job per delay (seconds after the start); the seconds each took to answer."""
    start = time.monotonic()
    seeds = seeds or range(len(delays_s))

    async def one(seed: int, delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        sent = time.monotonic()
        await batcher.submit(job(seed))
        return time.monotonic() - sent

    try:
        return list(await asyncio.gather(*(one(s, d) for s, d in zip(seeds, delays_s))))
    finally:
        assert time.monotonic() - start < 60


def run_batcher(settings: ServeSettings, scenario, rows: int = 16) -> tuple[list[list[int]], object]:
    engine = RecordingEngine(rows)

    async def main():
        batcher = Batcher(engine, settings)
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await batcher.stop()

    return engine.batches, asyncio.run(main())


def test_a_batch_stays_open_while_requests_keep_arriving():
    """Six requests 0.2 s apart span 1 s, more than the 0.6 s window: a window counted
    from the first request would have cut them in two; counted from the latest, one batch."""
    settings = ServeSettings(batch_window_ms=600, max_batch_wait_ms=30_000)
    batches, _ = run_batcher(settings, lambda b: submit_at(b, [0.2 * i for i in range(6)]))
    assert batches == [[0, 1, 2, 3, 4, 5]]


def test_a_lone_request_waits_one_window_not_the_max():
    settings = ServeSettings(batch_window_ms=50, max_batch_wait_ms=30_000)
    batches, waited = run_batcher(settings, lambda b: submit_at(b, [0.0]))
    assert batches == [[0]]
    assert waited[0] < 10  # far below the 30 s max: the batch closed after one quiet window


def test_max_batch_wait_bounds_a_steady_stream():
    """Requests every 0.1 s never leave a 2 s quiet window: the 0.3 s max closes it."""
    settings = ServeSettings(batch_window_ms=2000, max_batch_wait_ms=300)
    batches, _ = run_batcher(settings, lambda b: submit_at(b, [0.1 * i for i in range(12)]))
    assert len(batches) >= 2 and len(batches[0]) < 12
    assert sorted(seed for batch in batches for seed in batch) == list(range(12))


def test_a_full_batch_starts_at_once():
    settings = ServeSettings(batch_window_ms=30_000, max_batch_wait_ms=30_000)
    batches, waited = run_batcher(settings, lambda b: submit_at(b, [0.0] * 4), rows=4)
    assert batches == [[0, 1, 2, 3]]
    assert max(waited) < 10


def test_answers_being_written_keep_the_batch_open():
    """A client whose answer is still being written is likely to come back: while one is,
    the batch waits (here 0.5 s, past its 0.1 s window) and the late request joins it."""
    settings = ServeSettings(batch_window_ms=100, max_batch_wait_ms=30_000)

    async def scenario(batcher: Batcher):
        with batcher.writing_answer():
            first = asyncio.create_task(submit_at(batcher, [0.0], seeds=[0]))
            await asyncio.sleep(0.5)
            late = asyncio.create_task(submit_at(batcher, [0.0], seeds=[1]))
            await asyncio.sleep(0.1)
        await asyncio.gather(first, late)

    batches, _ = run_batcher(settings, scenario)
    assert batches == [[0, 1]]


def test_a_zero_window_takes_only_what_is_queued():
    """batch_window_ms 0 never waits, even while answers are being written."""
    settings = ServeSettings(batch_window_ms=0, max_batch_wait_ms=30_000)

    async def scenario(batcher: Batcher):
        with batcher.writing_answer():
            await submit_at(batcher, [0.0, 0.3])

    batches, _ = run_batcher(settings, scenario)
    assert batches == [[0], [1]]


def test_other_prompt_lengths_wait_for_their_own_batch():
    settings = ServeSettings(batch_window_ms=300, max_batch_wait_ms=30_000)

    async def scenario(batcher: Batcher):
        async def one(seed: int, length: int) -> None:
            await batcher.submit(job(seed, length))

        await asyncio.gather(one(0, 3), one(1, 5), one(2, 3), one(3, 5))

    batches, _ = run_batcher(settings, scenario)
    assert batches == [[0, 2], [1, 3]]


@pytest.mark.parametrize("field, value", [("batch_window_ms", -1), ("max_batch_wait_ms", -1),
                                          ("max_batch_wait_ms", 60_001),
                                          ("batch_window_ms", float("nan"))])
def test_batch_timing_settings_are_bounded(field, value):
    with pytest.raises(ConfigError, match=field):
        ServeSettings(**{field: value})


def test_a_client_answered_moments_ago_is_expected_back():
    """Client "a" was just answered on a connection it keeps: the batch that "b" opens
    waits for it (0.5 s, past the 0.1 s window) within the max wait, and "a" joins."""
    settings = ServeSettings(batch_window_ms=100, max_batch_wait_ms=30_000)

    async def scenario(batcher: Batcher):
        with batcher.writing_answer(client="a"):
            pass
        b = Job(**{**vars(job(1)), "client": "b"})
        a = Job(**{**vars(job(0)), "client": "a"})
        first = asyncio.create_task(batcher.submit(b))
        await asyncio.sleep(0.5)
        await asyncio.gather(first, batcher.submit(a))

    batches, _ = run_batcher(settings, scenario)
    assert batches == [[1, 0]]


def test_an_answered_client_that_stays_away_holds_a_batch_at_most_the_max_wait():
    settings = ServeSettings(batch_window_ms=50, max_batch_wait_ms=300)

    async def scenario(batcher: Batcher):
        with batcher.writing_answer(client="a"):
            pass
        started = time.monotonic()
        await batcher.submit(Job(**{**vars(job(1)), "client": "b"}))
        return time.monotonic() - started

    batches, waited_s = run_batcher(settings, scenario)
    assert batches == [[1]] and 0.15 < waited_s < 10
