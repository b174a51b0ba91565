"""The model side: jobs, the batched decode of their rows through the one engine, and
the request queue whose single worker forms batches (see the batching rule in
docs/CONTRACTS.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mega_trading.generation.engine import DecodeEngine
from mega_trading.generation.sampling import SamplingConfig
from mega_trading.generation.support import TickSupport
from mega_trading.serve.schemas import ServeError, ServeSettings

log = logging.getLogger("mega_trading.serve")


# --- the model side: jobs and batched decoding -----------------------------------------------

@dataclass(eq=False)
class Job:
    """One validated request on its way through the queue."""

    prompt: np.ndarray  # int64 [T]
    n: int
    length: int
    sampling: SamplingConfig
    seed: int
    sampling_source: str = "request"  # or "measured" / "default" (SamplingInfo.source)
    cancelled: bool = False  # read by the worker thread: the client is gone, skip the work
    client: Any = None  # the connection it came on, (host, port); None: unknown
    future: asyncio.Future | None = None
    started: asyncio.Event | None = None
    anchor: Any = None  # where its answer starts (answers.Anchor), for `RolloutEngine.prepare`
    decoded: Any = None  # its answer's decoded rollouts, when prepared with others


class RolloutEngine:
    """Runs batches of jobs through the model; every forward pass has `batch_rows` rows.

    ``prepare(finished)``, if given, runs on the engine's thread on the jobs (with their new
    tokens) that finish at one step, before their ``on_done``: the service decodes their
    answers there in one pass. If it fails, the answers are built one by one as without it.
    ``support`` serves the requests whose sampling asks for tick support.
    """

    def __init__(self, model, pad_id: int, seg_id: int, batch_rows: int,
                 prepare: Callable[[list[tuple[Job, np.ndarray]]], None] | None = None,
                 support: TickSupport | None = None):
        self.model, self.pad_id, self.seg_id = model, pad_id, seg_id
        self.batch_rows = batch_rows
        self.prepare = prepare
        self.device = model.tok_embeddings.weight.device
        # One decoder for every batch (they run one at a time, on the worker's thread): its
        # cache is zeroed per batch, not allocated (~3 ms a batch); the engine of
        # generate.generate: cache_len = block, keep = half of it.
        self.decoder = DecodeEngine(model, specials=(pad_id, seg_id), support=support)

    @torch.inference_mode()
    def run_batch(self, jobs: list[Job], on_done: Callable[[Job, np.ndarray], None]) -> None:
        """Decode jobs of equal prompt length together; on_done(job, new tokens [n, length])
        is called (from this thread) as soon as a job's tokens are complete."""

        t0 = len(jobs[0].prompt)
        if any(len(j.prompt) != t0 for j in jobs):
            raise ValueError("a batch needs one prompt length")
        if sum(j.n for j in jobs) > self.batch_rows:
            raise ValueError(f"batch of {sum(j.n for j in jobs)} rows > {self.batch_rows}")
        end = t0 + max(j.length for j in jobs)
        tokens = torch.full((self.batch_rows, end), self.pad_id, dtype=torch.long,
                            device=self.device)
        plans, row = [], 0
        for job in jobs:
            rows = slice(row, row + job.n)
            tokens[rows, :t0] = torch.from_numpy(job.prompt).to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(job.seed)
            plans.append((job, rows, generator))
            row += job.n
        engine = self.decoder
        engine.start(tokens[:, :t0])
        for t in range(t0, end):
            live = [p for p in plans if not p[0].cancelled and t < t0 + p[0].length]
            if not live:
                break
            drawn = engine.sample_each([(job.sampling, generator, rows)
                                        for job, rows, generator in live])
            finished = []
            for job, rows, _ in live:
                tokens[rows, t] = drawn[rows]
                if t + 1 == t0 + job.length:
                    finished.append((job, tokens[rows, t0:t + 1].cpu().numpy()))
            self._finish(finished, on_done)
            if t + 1 == end:
                break
            engine.feed(tokens[:, t])

    def _finish(self, finished: list[tuple[Job, np.ndarray]],
                on_done: Callable[[Job, np.ndarray], None]) -> None:
        if finished and self.prepare is not None:
            try:
                self.prepare(finished)
            except Exception:  # each answer is then decoded on its own, as without it
                log.exception("preparing the answers of finished jobs failed")
        for job, new_tokens in finished:
            on_done(job, new_tokens)


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    max_requests_in_batch: int = 0


class Batcher:
    """The request queue and the single worker task that batches jobs onto the engine."""

    def __init__(self, engine: RolloutEngine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.stats = BatchStats()
        self.queue: asyncio.Queue[Job] | None = None
        self.pending: deque[Job] = deque()  # taken from the queue, another prompt length
        self.running: list[Job] = []
        self.task: asyncio.Task | None = None
        self.answering = 0  # answers being built or sent: their clients may come back soon
        self.last_activity = 0.0  # time.monotonic() a job joined a batch or an answer left
        self.answered: dict[Any, float] = {}  # connection -> when its answer left, until
        # it sends its next request

    @contextlib.contextmanager
    def writing_answer(self, client: Any = None):
        """Around the writing of one answer, up to its last byte sent (`AnswerTracking`):
        meanwhile `_collect` keeps a batch open, and for a while after for its client."""
        self.answering += 1
        try:
            yield
        finally:
            self.answering -= 1
            self.last_activity = time.monotonic()
            if client is not None:
                self.answered[client] = self.last_activity

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name="rollout-worker")

    async def stop(self) -> None:
        for job in self.running:  # the engine thread stops at its next token
            job.cancelled = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None
        waiting = list(self.pending)
        while self.queue is not None and not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for job in waiting:
            _fail(job, ServeError("the server is shutting down", 503))

    @property
    def queued(self) -> int:
        return (self.queue.qsize() if self.queue is not None else 0) + len(self.pending)

    async def submit(self, job: Job) -> np.ndarray:
        """Queue a job and wait for its tokens [n, length] (503 / 504 on the limits)."""
        self.answered.pop(job.client, None)  # it came back
        if self.task is None or self.task.done():
            raise ServeError("the rollout worker is not running", 503)
        if self.queued >= self.settings.max_queue:
            raise ServeError(f"queue full ({self.settings.max_queue} requests waiting); "
                             f"retry later", 503, {"Retry-After": "1"})
        job.future = asyncio.get_running_loop().create_future()
        job.started = asyncio.Event()
        self.queue.put_nowait(job)
        try:
            try:
                await asyncio.wait_for(job.started.wait(), self.settings.queue_timeout_s)
            except TimeoutError:
                raise ServeError(f"the request waited more than {self.settings.queue_timeout_s:g} s "
                                 f"in the queue; retry later", 503, {"Retry-After": "1"}) from None
            try:
                return await asyncio.wait_for(asyncio.shield(job.future),
                                              self.settings.request_timeout_s)
            except TimeoutError:
                raise ServeError(f"the rollouts took more than "
                                 f"{self.settings.request_timeout_s:g} s", 504) from None
        finally:
            if not job.future.done():
                job.cancelled = True  # timed out or client gone: the worker skips it

    async def _run(self) -> None:
        while True:
            batch = await self._collect(await self._next_job())
            batch = [job for job in batch if not job.cancelled and not job.future.done()]
            if not batch:
                continue
            try:
                await self._run_batch(batch)
            except Exception as exc:  # never let one bad batch stop the worker
                log.exception("rollout batch failed")
                for job in batch:
                    _fail(job, exc)

    async def _run_batch(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for job in batch:
            job.started.set()
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.rows += sum(job.n for job in batch)
        self.stats.max_requests_in_batch = max(self.stats.max_requests_in_batch, len(batch))

        def on_done(job: Job, tokens: np.ndarray) -> None:
            loop.call_soon_threadsafe(_resolve, job, tokens)

        self.running = batch
        try:
            await asyncio.to_thread(self.engine.run_batch, batch, on_done)
        finally:
            self.running = []
        await asyncio.sleep(0)  # let the results queued by on_done land first
        for job in batch:  # a job left without a result would hang its request
            if not job.future.done() and not job.cancelled:
                _fail(job, RuntimeError("the batch ended without this request's tokens"))

    async def _next_job(self) -> Job:
        if self.pending:
            return self.pending.popleft()
        return await self.queue.get()

    async def _collect(self, first: Job) -> list[Job]:
        """`first` plus compatible jobs, up to the limits, while the server is busy.

        The batch starts when it is full, or when for ``batch_window_ms`` no job joined it
        and no answer was written (while answers are being written it stays open), or
        ``max_batch_wait_ms`` after `first` was taken, whichever comes first. Not a fixed
        window from the first job: answers leave one after another, and the clients they
        answer come back spread over the time the answers take to write; a fixed window
        cut them into convoys that each paid for all ``batch_rows`` rows of a forward pass.
        ``batch_window_ms`` 0: no waiting, only the jobs already queued join.
        """
        batch, rows = [first], first.n
        limit_requests, limit_rows = self.settings.max_batch_requests, self.engine.batch_rows

        def take(job: Job) -> bool:
            nonlocal rows
            if len(job.prompt) == len(first.prompt) and rows + job.n <= limit_rows:
                batch.append(job)
                rows += job.n
                return True
            return False

        def full() -> bool:
            return len(batch) >= limit_requests or rows >= limit_rows

        for job in list(self.pending):
            if full():
                return batch
            if take(job):
                self.pending.remove(job)
        gap_s = self.settings.batch_window_ms / 1000
        max_wait_s = self.settings.max_batch_wait_ms / 1000
        now = time.monotonic()
        closes_at = now + max_wait_s
        self.last_activity = max(self.last_activity, now)
        self.answered = {client: at for client, at in self.answered.items()
                         if at > now - max_wait_s}

        def open_until() -> float:
            if gap_s == 0:
                return 0.0
            until = self.last_activity + gap_s
            if self.answering:
                until = closes_at
            elif self.answered:  # a client answered moments ago is likely to come back
                until = max(until, max(self.answered.values()) + max_wait_s)
            return min(until, closes_at)

        while not full():
            remaining = open_until() - time.monotonic()
            try:
                if remaining > 0:  # waits of at most one gap: answers move open_until()
                    job = await asyncio.wait_for(self.queue.get(), min(remaining, gap_s))
                else:
                    job = self.queue.get_nowait()
            except TimeoutError:
                continue
            except asyncio.QueueEmpty:
                break
            if take(job):
                self.last_activity = time.monotonic()
            else:
                self.pending.append(job)
        return batch


def _resolve(job: Job, tokens: np.ndarray) -> None:
    if not job.future.done():
        job.future.set_result(tokens)


def _fail(job: Job, exc: BaseException) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_exception(exc)


