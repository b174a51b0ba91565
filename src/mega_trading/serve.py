"""HTTP rollout service: sample synthetic order flow from a trained run over a small JSON API.

``create_app(run_dir, data_dir=None, settings=ServeSettings())`` builds a FastAPI app:

* ``POST /v1/rollouts``  continue a prompt (token ids, events, or a named real window of
  the prepared data) with ``n`` sampled rollouts of ``length`` tokens, decoded to events
  and price / time paths, with the provenance needed to reproduce them; without a prompt
  the rollouts start a new segment (the prompt is one ``SEG`` token: a beginning-of-
  sequence seed), anchored at the latest real segment start of ``symbol`` in the data, or
  at price 1 and time 0 without a symbol;
* ``GET /v1/model``      the model card (config, size, training data, backtest headline);
* ``GET /healthz``       liveness plus batching counters;
* ``GET /openapi.json``  the schema (committed as ``docs/openapi.json``; a test keeps the
  two equal: regenerate with ``python -m mega_trading.serve docs/openapi.json``).

Batching. Handlers never touch the model: they validate a request into a ``Job`` and put
it on a queue. One worker task takes the oldest job and collects more jobs with the same
prompt length (so every row shares one prefill and one sliding window schedule), up to
``batch_rows`` rows or ``max_batch_requests`` requests, then runs them together in a
worker thread (``RolloutEngine.run_batch``). A batch starts as soon as it is full, or
when for ``batch_window_ms`` no job joined it and no answer was being written, and at the
latest ``max_batch_wait_ms`` after its first job was taken; meanwhile it also waits for
clients answered on a connection they keep open less than ``max_batch_wait_ms`` ago (a
client answered moments ago is likely to send its next request). Answers leave one after
another, so the clients of one batch come back spread over the time the answers take to
write and read; a window counted from the first job cut them into convoys that each paid
for all ``batch_rows`` rows (BENCHMARKS.md, issue 18). A job with a shorter ``length`` is
answered as soon as its own tokens are done. Jobs of another prompt length wait in order
for the next batch. ``max_batch_requests=1`` turns batching off; ``batch_window_ms=0``
takes only the jobs already queued.

Determinism under batching: a request's rollouts depend only on the request (prompt,
sampling settings, seed) and the server's run and ``batch_rows``, never on which other
requests share its batch or on which rows it gets, because

1. each request samples its rows with its OWN ``torch.Generator`` seeded with its seed
   (``DecodeEngine.sample_each``: the race of its rows drawn from its generator; every
   other sampling op runs on all ``batch_rows`` rows, once per distinct settings), so no
   other request draws from its stream;
2. every forward pass has the same shape, ``[batch_rows, T]``: unused rows are padding.
   Every op of the model is row-independent (embedding, per-row norms, per-sequence
   attention, matmuls), but a BLAS kernel may reduce in another order for another batch
   size (matrix-vector for one row, blocked matrix-matrix for several), which changes the
   last bits of the logits; with a fixed shape, a row's arithmetic is the same whatever
   the other rows hold (tests check that a request alone, with others, or at another row
   offset gives the same tokens). The price: at low load a lone request pays for
   ``batch_rows`` rows (on a CPU about 2.7x the time of one row for the micro preset; on
   a GPU next to nothing), so ``batch_rows`` is a setting;
3. the decode loop is the one decoder engine of ``mega_trading.generation.generate.generate``
   (``engine.DecodeEngine``: prefill, one token per step on fused weights fetched once,
   the same sliding window), so a request filling all ``batch_rows`` rows gets exactly
   what ``generate`` gives with the same seed (tested).

Limits. Bodies over ``max_body_bytes`` get 413 before any parsing; schema violations,
tokens outside the vocabulary, prompts longer than the model's block size, ``n`` over
``batch_rows`` and ``n * length`` over ``max_new_tokens`` get 422 with a message; a full
queue, or a job not started within ``queue_timeout_s``, gets 503 and a job not done
within ``request_timeout_s`` gets 504. The worker turns any failure of a batch into an
error for the jobs in it, so a request never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import polars as pl
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mega_trading import __version__
from mega_trading.core.config import NonNegativeFloat, NonNegativeInt, PositiveInt, config_dataclass
from mega_trading.core.errors import DataError, MegaTradingError

log = logging.getLogger("mega_trading.serve")

API_TITLE = "Mega-Trading rollout service"
# Static bounds of the schema; a server may be stricter (ServeSettings, the model's block
# size, its vocabulary), which is checked per request and answered with 422.
MAX_PROMPT_TOKENS = 4096
MAX_N = 256
MAX_LENGTH = 4096
DEFAULT_WINDOW = 128  # tokens of a named window whose length is not given
MAX_MOVE_BPS = 1e4
MAX_ABS_LOG_SIZE = 50.0
MAX_DT_US = 10**13
MAX_SEED = 2**63 - 1
DEFAULT_START_PRICE = 1.0  # tokens / events prompts: the price path is an index from 1
# Answers of at most this many new tokens are built on the event loop (~1 ms): a thread hop
# per answer, and the GIL shared with the engine thread, cost more than the building.
INLINE_ANSWER_TOKENS = 1024


@config_dataclass
class ServeSettings:
    # A batch starts when it is full, when for batch_window_ms no request joined it and no
    # answer was written (0: no waiting), or max_batch_wait_ms after its first request was
    # taken, whichever comes first (the module docstring says what else it waits for).
    batch_window_ms: Annotated[float, Field(ge=0, le=60_000, allow_inf_nan=False)] = 5.0
    max_batch_wait_ms: Annotated[float, Field(ge=0, le=60_000, allow_inf_nan=False)] = 50.0
    max_batch_requests: PositiveInt = 16  # requests per forward batch; 1 = batching off
    batch_rows: PositiveInt = 16  # rows of EVERY forward pass (fixed shape: see the docstring)
    max_new_tokens: PositiveInt = 8192  # n * length per request
    max_body_bytes: PositiveInt = 1 << 20
    max_queue: PositiveInt = 256  # queued jobs before new ones get 503
    queue_timeout_s: NonNegativeFloat = 30.0  # a job not started by then gets 503
    request_timeout_s: NonNegativeFloat = 300.0  # a job not finished by then gets 504
    step: NonNegativeInt | None = None  # checkpoint step (default: latest)
    device: str = "cpu"


class ServeError(MegaTradingError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status_code: int = 422,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


# --- request / response bodies ---------------------------------------------------------------

TokenId = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class PromptEvent(BaseModel):
    """One event, in the event table's units (docs/CONTRACTS.md)."""

    model_config = ConfigDict(extra="forbid")
    side: Literal[-1, 1] = Field(description="+1 taker buy, -1 taker sell")
    move_bps: float = Field(ge=-MAX_MOVE_BPS, le=MAX_MOVE_BPS, allow_inf_nan=False,
                            description="price move vs the previous trade, bps")
    size: float = Field(ge=-MAX_ABS_LOG_SIZE, le=MAX_ABS_LOG_SIZE, allow_inf_nan=False,
                        description="log_size: ln(notional) minus its causal rolling level")
    dt_us: int = Field(ge=0, le=MAX_DT_US, description="µs since the previous trade")


class WindowRef(BaseModel):
    """A real window of the prepared data: tokens [start, start + length) of one shard."""

    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "validation", "backtest"]
    symbol: str = Field(min_length=1, max_length=32, pattern=r"^[A-Z0-9]+$")
    start: int | None = Field(None, ge=0, le=2**53,
                              description="token position in the shard; null = latest window")
    length: int | None = Field(None, ge=1, le=MAX_PROMPT_TOKENS,
                               description=f"tokens; null = min({DEFAULT_WINDOW}, block size)")


PROMPTS = ("tokens", "events", "window")
SEGMENT_SPLITS = ("backtest", "validation", "train")  # where a symbol's segment start is looked up
# At most one prompt; none = start a new segment.
_AT_MOST_ONE_PROMPT = {"not": {"anyOf": [{"required": [a, b]} for i, a in enumerate(PROMPTS)
                                         for b in PROMPTS[i + 1:]]}}


class RolloutRequest(BaseModel):
    """At most one prompt (tokens, events or window) plus sampling settings. Without one, the
    rollouts start a new segment: the prompt is a single segment-start token (SEG)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_AT_MOST_ONE_PROMPT)
    tokens: Annotated[list[TokenId], Field(
        min_length=1, max_length=MAX_PROMPT_TOKENS,
        description="prompt token ids (each in [0, vocab_size))")] = None
    events: Annotated[list[PromptEvent], Field(
        min_length=1, max_length=MAX_PROMPT_TOKENS,
        description="prompt events; encoded with the run's tokenizer after a "
                    "segment-start token (the events open a segment, as in the data)")] = None
    window: WindowRef = Field(None, description="a real window of the prepared data")
    symbol: str | None = Field(
        None, min_length=1, max_length=32, pattern=r"^[A-Z0-9]+$",
        description="only without a prompt: anchor the new segment at this symbol's latest "
                    "segment start in the data (backtest, else validation, else train split): "
                    "the price, time and size level of its first trade")
    n: int = Field(1, ge=1, le=MAX_N, description="rollouts (at most the server's batch_rows)")
    length: int = Field(64, ge=1, le=MAX_LENGTH, description="new tokens per rollout")
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False,
                               description="0 = greedy. The four sampling fields (temperature, "
                                           "top_k, top_p, min_p) that a request leaves out "
                                           "take the run's measured choice (RUN/sampling.json; "
                                           "without one, the defaults shown)")
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="null = off")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="1 = off")
    min_p: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False,
                         description="keep tokens with p >= min_p * the top token's p; 0 = off")
    forbid_seg: bool = Field(False, description="never sample a segment start")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null = drawn by the server "
                                                                   "(returned in provenance)")
    start_price: float | None = Field(
        None, gt=0, le=1e12, allow_inf_nan=False,
        description=f"price before the first rollout event; default: the window's last "
                    f"trade price, or the symbol's segment start, else {DEFAULT_START_PRICE}")
    start_time_us: int | None = Field(
        None, ge=0, le=2**62, description="time before the first rollout event; default: the "
                                          "window's last trade time, or the symbol's segment "
                                          "start, else 0")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """pydantic's lax mode reads true / false as 1 / 0 (even for side: Literal[-1, 1]);
        the schema says number, so a boolean anywhere but forbid_seg is refused."""
        if not isinstance(data, dict):
            return data
        stack = [(key, value) for key, value in data.items() if key != "forbid_seg"]
        while stack:  # iterative: the body's nesting depth is the client's choice
            where, value = stack.pop()
            if isinstance(value, bool):
                raise ValueError(f"{where}: a boolean where the schema wants a number or text")
            if isinstance(value, dict):
                stack.extend((f"{where}.{k}", v) for k, v in value.items())
            elif isinstance(value, list):
                stack.extend((f"{where}.{i}", v) for i, v in enumerate(value))
        return data

    @model_validator(mode="after")
    def _at_most_one_prompt(self) -> RolloutRequest:
        given = [name for name in PROMPTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one prompt: tokens, events or window (got "
                             f"{', '.join(given)})")
        if given and self.symbol is not None:
            raise ValueError("symbol only anchors a request without a prompt (a window names "
                             "its own symbol)")
        return self


class Rollout(BaseModel):
    """One rollout as parallel arrays, one entry per generated token (specials are null)."""

    index: int
    tokens: list[int]
    is_event: list[bool]
    segment_start: list[bool]
    side: list[int | None]
    move_bps: list[float | None]
    log_size: list[float | None]
    dt_us: list[int | None]
    time_us: list[int]
    price: list[float | None]
    quote_qty: list[float | None]


class PromptInfo(BaseModel):
    source: Literal["tokens", "events", "window", "segment_start"]
    n_tokens: int
    tokens: list[int]
    split: str | None = None
    symbol: str | None = None
    start: int | None = None
    start_price: float
    start_time_us: int
    size_level: float | None = None


class SamplingInfo(BaseModel):
    temperature: float
    top_k: int | None
    top_p: float
    min_p: float
    forbid_seg: bool
    forbid_pad: bool
    source: Literal["request", "measured", "default"] = Field(
        description="request: every sampling field came from the request; measured: the "
                    "run's RUN/sampling.json filled those left out; default: built-in defaults")
    label: str


class Provenance(BaseModel):
    run: str
    checkpoint_step: int | None
    model_sha256: str
    tokenizer_hash: str
    manifest_hash: str | None
    git_commit: str
    package_version: str
    sampling: SamplingInfo
    seed: int
    n: int
    length: int
    batch_rows: int


class RolloutResponse(BaseModel):
    rollouts: list[Rollout]
    prompt: PromptInfo
    provenance: Provenance


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: Literal["ok"]
    queued: int
    batches: int
    requests: int
    rows: int
    max_requests_in_batch: int


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    run: str
    checkpoint_step: int | None
    model: dict[str, Any]
    n_params: int
    n_params_hidden: int
    model_sha256: str
    tokenizer: dict[str, Any]
    training: dict[str, Any] | None
    data: dict[str, Any] | None
    backtest: dict[str, Any] | None
    limits: dict[str, Any]
    provenance: dict[str, Any]


# --- the model side: jobs and batched decoding -----------------------------------------------

@dataclass(eq=False)
class Job:
    """One validated request on its way through the queue."""

    prompt: np.ndarray  # int64 [T]
    n: int
    length: int
    sampling: Any  # mega_trading.generation.sampling.SamplingConfig
    seed: int
    sampling_source: str = "request"  # or "measured" / "default" (SamplingInfo.source)
    cancelled: bool = False  # read by the worker thread: the client is gone, skip the work
    client: Any = None  # the connection it came on, (host, port); None: unknown
    future: asyncio.Future | None = None
    started: asyncio.Event | None = None


class RolloutEngine:
    """Runs batches of jobs through the model; every forward pass has `batch_rows` rows."""

    def __init__(self, model, pad_id: int, seg_id: int, batch_rows: int):
        self.model, self.pad_id, self.seg_id = model, pad_id, seg_id
        self.batch_rows = batch_rows
        self.device = model.tok_embeddings.weight.device

    @torch.inference_mode()
    def run_batch(self, jobs: list[Job], on_done: Callable[[Job, np.ndarray], None]) -> None:
        """Decode jobs of equal prompt length together; on_done(job, new tokens [n, length])
        is called (from this thread) as soon as a job's tokens are complete."""
        from mega_trading.generation.engine import DecodeEngine

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
        # The engine of generate.generate: cache_len = block, keep = half of it.
        engine = DecodeEngine(self.model, specials=(self.pad_id, self.seg_id))
        engine.start(tokens[:, :t0])
        for t in range(t0, end):
            live = [p for p in plans if not p[0].cancelled and t < t0 + p[0].length]
            if not live:
                break
            drawn = engine.sample_each([(job.sampling, generator, rows)
                                        for job, rows, generator in live])
            for job, rows, _ in live:
                tokens[rows, t] = drawn[rows]
                if t + 1 == t0 + job.length:
                    on_done(job, tokens[rows, t0:t + 1].cpu().numpy())
            if t + 1 == end:
                break
            engine.feed(tokens[:, t])


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


# --- the run: model, tokenizer, data, prompts, answers ---------------------------------------

@dataclass(frozen=True)
class Anchor:
    """Where a prompt leaves off: the rollout's price / time start and size level."""

    source: str
    price: float
    time_us: int
    size_level: float | None = None
    split: str | None = None
    symbol: str | None = None
    start: int | None = None


class RolloutService:
    """Everything the handlers need: the loaded run, its hashes, prompts and the batcher."""

    def __init__(self, run_dir: str | Path, data_dir: str | Path | None = None,
                 settings: ServeSettings = ServeSettings()):
        from mega_trading.core.lineage import git_commit, sha256_file
        from mega_trading.model.checkpoint import checkpoint_path, load_model

        self.run_dir, self.settings = Path(run_dir), settings
        if not self.run_dir.is_dir():
            raise DataError("run folder does not exist", self.run_dir)
        self.shards = self._open_data(data_dir)
        self.tokenizer = self._load_tokenizer()
        weights = checkpoint_path(self.run_dir, settings.step) / "model.safetensors"
        self.model, self.state = load_model(
            self.run_dir, step=settings.step, expect_tokenizer_hash=self.tokenizer.hash,
            expect_manifest_hash=self.shards.manifest_hash if self.shards else None,
            device=settings.device)
        if self.model.cfg.vocab_size != self.tokenizer.vocab_size:
            raise DataError(f"model vocabulary {self.model.cfg.vocab_size} != tokenizer "
                            f"vocabulary {self.tokenizer.vocab_size}", self.run_dir)
        self.model_sha256 = sha256_file(weights)
        self.git_commit = git_commit()
        self._identity: dict[str, Any] | None = None
        # One thread writes the answers, in the order their tokens are done: the first answer
        # of a batch leaves after one payload, not after all of them shared the GIL.
        self._answers: ThreadPoolExecutor | None = None  # from start() to stop()
        self.engine = RolloutEngine(self.model, self.tokenizer.pad_id, self.tokenizer.seg_id,
                                    settings.batch_rows)
        self.batcher = Batcher(self.engine, settings)
        from mega_trading.generation.sampling import read_measured

        self.measured = read_measured(self.run_dir)  # the run's sampling choice, if any
        self._windows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._windows_lock = threading.Lock()

    # startup ---------------------------------------------------------------------------
    def _run_config(self) -> dict[str, Any]:
        from mega_trading.core.lineage import read_json

        path = self.run_dir / "config.json"
        return read_json(path) if path.is_file() else {}

    def _open_data(self, data_dir: str | Path | None):
        """The prepared data: as given (a mismatch is an error), else the run's own if it
        still exists and matches (else None: named windows are then unavailable)."""
        from mega_trading.data.shards import ShardSet

        if data_dir is not None:
            return ShardSet.open(data_dir)
        config = self._run_config()
        recorded = config.get("data_dir")
        if not recorded or not (Path(recorded) / "manifest.json").is_file():
            return None
        try:
            shards = ShardSet.open(recorded)
        except MegaTradingError:
            return None
        if shards.manifest_hash != config.get("manifest_hash"):
            log.warning("%s has changed since training; serving without data", recorded)
            return None
        return shards

    def _load_tokenizer(self):
        from mega_trading.data.tokenizer import Tokenizer

        path = self.run_dir / "tokenizer.json"
        if path.is_file():
            return Tokenizer.load(path)
        if self.shards is not None:
            return self.shards.tokenizer
        raise DataError("run has no tokenizer.json and no data directory was given", self.run_dir)

    # requests --------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.model.cfg.block_size

    def build_job(self, req: RolloutRequest) -> tuple[Job, Anchor]:
        """Validate a request against this run and the limits; 422 (ServeError) if not."""
        from mega_trading.generation.sampling import SamplingConfig

        if req.n > self.settings.batch_rows:
            raise ServeError(f"n={req.n} rollouts is over this server's limit of "
                             f"{self.settings.batch_rows} (batch_rows) per request")
        if req.n * req.length > self.settings.max_new_tokens:
            raise ServeError(f"n * length = {req.n * req.length} new tokens is over this "
                             f"server's limit of {self.settings.max_new_tokens} per request")
        prompt, anchor = self._prompt(req)
        if len(prompt) > self.block_size:
            raise ServeError(f"the prompt has {len(prompt)} tokens; the model's context "
                             f"(block size) is {self.block_size}")
        given = {"temperature": req.temperature, "top_k": req.top_k or 0, "top_p": req.top_p,
                 "min_p": req.min_p}
        unset = [k for k in given if k not in req.model_fields_set]
        source = "request"
        if unset and self.measured is not None:  # the run's choice fills what was left out
            given.update({k: self.measured["chosen"][k] for k in unset})
            source = "measured"
        elif unset:
            source = "default" if len(unset) == len(given) else "request"
        sampling = SamplingConfig(**given, forbid_seg=req.forbid_seg)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return Job(prompt=prompt, n=req.n, length=req.length, sampling=sampling, seed=seed,
                   sampling_source=source), anchor

    def _prompt(self, req: RolloutRequest) -> tuple[np.ndarray, Anchor]:
        price = req.start_price if req.start_price is not None else DEFAULT_START_PRICE
        time_us = req.start_time_us if req.start_time_us is not None else 0
        if req.tokens is not None:
            tokens = self.tokenizer.check_tokens(np.asarray(req.tokens, dtype=np.int64))
            return tokens, Anchor("tokens", price, time_us)
        if req.events is not None:
            frame = pl.DataFrame({
                "side": [e.side for e in req.events],
                "move_bps": [e.move_bps for e in req.events],
                "log_size": [e.size for e in req.events],
                "dt_us": [e.dt_us for e in req.events],
            }, schema={"side": pl.Int8, "move_bps": pl.Float64, "log_size": pl.Float64,
                       "dt_us": pl.Int64})
            tokens = np.concatenate([[self.tokenizer.seg_id], self.tokenizer.encode(frame)])
            return tokens.astype(np.int64), Anchor("events", price, time_us)
        if req.window is not None:
            tokens, anchor = self._window(req.window)
        else:
            tokens, anchor = self._segment_start(req.symbol)
        return tokens, dataclasses.replace(
            anchor, price=req.start_price if req.start_price is not None else anchor.price,
            time_us=req.start_time_us if req.start_time_us is not None else anchor.time_us)

    def _shard(self, split: str, symbol: str) -> tuple[np.ndarray, np.ndarray]:
        """(memory-mapped tokens, SEG positions) of a shard: events are read one at a time."""
        if self.shards is None:
            raise ServeError("this server has no prepared data (start it with --data DIR), "
                             "so it cannot serve named windows")
        symbols = self.shards.symbols(split)
        if symbol not in symbols:
            raise ServeError(f"the data has no {split} shard for {symbol} "
                             f"(it has {', '.join(symbols) or 'none'})")
        with self._windows_lock:
            if (split, symbol) not in self._windows:
                self._windows[split, symbol] = (self.shards.tokens(split, symbol),
                                                self.shards.seg_positions(split, symbol))
            return self._windows[split, symbol]

    def _segment_start(self, symbol: str | None) -> tuple[np.ndarray, Anchor]:
        """No prompt: one SEG token, as before every segment of the data. With a symbol, the
        anchor is the first trade of its latest segment in the data, so the rollout opens a
        segment where a real one opened (price, time, and the size level that trade was
        measured against); without one, price 1 and time 0, like a token prompt."""
        seed = np.asarray([self.tokenizer.seg_id], dtype=np.int64)
        if symbol is None:
            return seed, Anchor("segment_start", DEFAULT_START_PRICE, 0)
        if self.shards is None:
            raise ServeError("this server has no prepared data (start it with --data DIR), "
                             f"so it cannot anchor a segment start at {symbol}")
        held = [split for split in SEGMENT_SPLITS if symbol in self.shards.symbols(split)]
        if not held:
            raise ServeError(f"the data has no shard for {symbol}")
        for split in held:  # the latest data first
            tokens, segs = self._shard(split, symbol)
            # The latest SEG before an event that opens a segment (a shard's opening SEG may
            # sit before the middle of a segment cut by the split boundary).
            first = None
            for seg in segs[::-1][:2]:
                if seg + 1 < len(tokens):
                    row = self.shards.event_at_token(split, symbol, int(seg) + 1, segs)
                    if bool(row["segment_start"][0]):
                        first = row.row(0, named=True)
                        break
            if first is not None:
                break
        else:
            raise ServeError(f"the data holds no segment start of {symbol}")
        level = math.exp(math.log(first["quote_qty"]) - first["log_size"])
        return seed, Anchor("segment_start", price=float(first["price"]),
                            time_us=int(first["time_us"]), size_level=level, split=split,
                            symbol=symbol, start=int(first["token_pos"]) - 1)

    def _window(self, ref: WindowRef) -> tuple[np.ndarray, Anchor]:
        """Tokens of a named window and the last real trade at or before its end (the same
        anchor rule as generate.prompt_from_split), read alone."""
        tokens, segs = self._shard(ref.split, ref.symbol)
        n_tokens = len(tokens)
        length = ref.length or min(DEFAULT_WINDOW, self.block_size, n_tokens)
        start = n_tokens - length if ref.start is None else ref.start
        if start < 0 or start + length > n_tokens:
            raise ServeError(f"window [{start}, {start + length}) does not fit in the "
                             f"{ref.split} {ref.symbol} shard of {n_tokens} tokens")
        try:
            prompt, last = self.shards.window(ref.split, ref.symbol, start, length, segs)
        except DataError:
            raise ServeError(f"window [{start}, {start + length}) holds no trade to start "
                             "from") from None
        anchor = Anchor("window", price=last.price, time_us=last.time_us,
                        size_level=last.size_level, split=ref.split, symbol=ref.symbol,
                        start=start)
        return prompt, anchor

    async def answer(self, job: Job, anchor: Anchor, new_tokens: np.ndarray) -> dict[str, Any]:
        """The payload: a small one (~1 ms) at once on the event loop, a larger one on the
        answer thread, so that it does not hold up the other requests."""
        if new_tokens.size <= INLINE_ANSWER_TOKENS:
            return self.payload(job, anchor, new_tokens)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._answers, self.payload, job, anchor, new_tokens)

    def start(self) -> None:
        self._answers = ThreadPoolExecutor(1, thread_name_prefix="rollout-answers")
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._answers is not None:
            self._answers.shutdown(wait=False, cancel_futures=True)

    def payload(self, job: Job, anchor: Anchor, new_tokens: np.ndarray) -> dict[str, Any]:
        """The response body: decoded rollouts, the prompt, provenance."""
        # in-bin draws seeded per request; each rollout decoded after its prompt (context)
        rollouts = rollout_columns(self.tokenizer, new_tokens, anchor, decode_seed=job.seed,
                                   context_tokens=job.prompt)
        cfg = job.sampling
        return {
            "rollouts": rollouts,
            "prompt": {"source": anchor.source, "n_tokens": len(job.prompt),
                       "tokens": job.prompt.tolist(), "split": anchor.split,
                       "symbol": anchor.symbol, "start": anchor.start,
                       "start_price": anchor.price, "start_time_us": anchor.time_us,
                       "size_level": anchor.size_level},
            "provenance": {
                **self.identity(),
                "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k or None,
                             "top_p": cfg.top_p, "min_p": cfg.min_p,
                             "forbid_seg": cfg.forbid_seg, "forbid_pad": cfg.forbid_pad,
                             "source": job.sampling_source,
                             "label": cfg.label},
                "seed": job.seed, "n": job.n, "length": job.length,
                "batch_rows": self.settings.batch_rows,
            },
        }

    def identity(self) -> dict[str, Any]:
        if self._identity is None:  # constant; the tokenizer hash alone costs ~1 ms
            self._identity = self._compute_identity()
        return dict(self._identity)

    def _compute_identity(self) -> dict[str, Any]:
        return {
            "run": self.run_dir.resolve().name,
            "checkpoint_step": self.state.get("step"),
            "model_sha256": self.model_sha256,
            "tokenizer_hash": self.tokenizer.hash,
            "manifest_hash": self.state.get("manifest_hash")
            or (self.shards.manifest_hash if self.shards else None),
            "git_commit": self.git_commit,
            "package_version": __version__,
        }

    # model card ------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        from mega_trading.core.config import to_dict
        from mega_trading.generation.sampling import SamplingConfig

        cfg = self.model.cfg
        tok = self.tokenizer
        return {
            "run": self.run_dir.resolve().name,
            "checkpoint_step": self.state.get("step"),
            "model": to_dict(cfg),
            "n_params": cfg.n_params(),
            "n_params_hidden": cfg.n_params(include_embeddings=False),
            "model_sha256": self.model_sha256,
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size,
                          "n_event_tokens": tok.n_event_tokens, "field_sizes": tok.field_sizes,
                          "pad_id": tok.pad_id, "seg_id": tok.seg_id},
            "training": self._training_summary(),
            "data": self._data_summary(),
            "backtest": self._backtest_headline(),
            "limits": {**dataclasses.asdict(self.settings), "block_size": cfg.block_size,
                       "max_prompt_tokens": min(cfg.block_size, MAX_PROMPT_TOKENS)},
            "provenance": self.identity(),
            # what a request that leaves the sampling fields out gets (RUN/sampling.json)
            "sampling_default": ({"source": "measured", "label": self.measured.get("label"),
                                  **{k: self.measured["chosen"][k] for k in self.measured["chosen"]},
                                  "score": self.measured.get("score"),
                                  "split": self.measured.get("split")}
                                 if self.measured else {"source": "default",
                                                        "label": SamplingConfig().label}),
        }

    def _training_summary(self) -> dict[str, Any] | None:
        from mega_trading.core.lineage import read_json

        config = self._run_config()
        if not config:
            return None
        summary_path = self.run_dir / "train_summary.json"
        summary = read_json(summary_path) if summary_path.is_file() else {}
        train = config.get("train", {})
        return {
            "preset": train.get("preset"), "steps": train.get("steps"),
            "batch_size": train.get("batch_size"), "lr": train.get("lr"),
            "seed": train.get("seed"), "data_dir": config.get("data_dir"),
            "final_loss": summary.get("loss"), "val_loss": summary.get("val_loss"),
            "tokens_seen": summary.get("tokens_seen"),
            "windows_seen": summary.get("windows_seen"),
        }

    def _data_summary(self) -> dict[str, Any] | None:
        if self.shards is None:
            return None
        manifest = self.shards.manifest
        splits = {}
        for split, by_symbol in manifest["shards"].items():
            splits[split] = {
                symbol: {key: info.get(key) for key in
                         ("n_events", "n_tokens", "n_windows", "start_time_us", "end_time_us")}
                for symbol, info in sorted(by_symbol.items())}
        return {"manifest_hash": self.shards.manifest_hash, "kind": manifest.get("kind"),
                "splits": splits, "token_stats": manifest.get("token_stats"),
                "data_dir": str(Path(self.shards.root).resolve())}

    def _backtest_headline(self) -> dict[str, Any] | None:
        from mega_trading.core.lineage import read_json

        path = self.run_dir / "backtest.json"
        if not path.is_file():
            return None
        doc = read_json(path)
        keys = ("nll_nats", "nll_nats_ci95", "bits_per_event", "top1", "top5", "ece")
        model = doc.get("model", {})
        baselines = {name: s.get("nll_nats") for name, s in doc.get("baselines", {}).items()}
        best = min((b for b in baselines if baselines[b] is not None),
                   key=lambda b: baselines[b], default=None)
        return {"split": doc.get("split"), "n_scored": doc.get("n_scored"),
                "model": {k: model.get(k) for k in keys if k in model},
                "baselines_nll_nats": baselines, "best_baseline": best,
                "vs_best_baseline": model.get("vs_baselines", {}).get(best) if best else None}


def rollout_columns(tokenizer, new_tokens: np.ndarray, anchor: Anchor, decode_seed: int,
                    context_tokens: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Tokens [n, length] -> one ``Rollout`` body per row, as JSON-ready lists.

    The values of ``generate.rollouts_to_events`` (tokens decoded inside their bins from
    PCG64(decode_seed), price compounded from the anchor, time summed from it, quote size
    from the size level; specials and non-finite numbers null; a test holds the two equal),
    built on numpy arrays: a polars frame per answer cost ~1.5 ms, which the worker's next
    batch waited for.
    """
    tokens = np.asarray(new_tokens, dtype=np.int64)
    n, length = tokens.shape
    # Each rollout is one decoding stream, its prompt (the same for every row) decoded
    # first so the move's context is known from the first new event.
    context = (np.zeros((n, 0), dtype=np.int64) if context_tokens is None
               else np.broadcast_to(np.asarray(context_tokens, dtype=np.int64).reshape(1, -1),
                                    (n, np.asarray(context_tokens).size)))
    stream = np.concatenate([context, tokens], axis=1)
    decoded = tokenizer.decode_fields(stream.reshape(-1), seed=decode_seed,
                                      streams=np.repeat(np.arange(n), stream.shape[1]))
    fields = {k: np.asarray(v).reshape(n, -1)[:, context.shape[1]:].reshape(-1)
              for k, v in decoded.items()}
    is_event = fields["is_event"].reshape(n, length)
    price = anchor.price * np.cumprod(1.0 + fields["move_bps"].reshape(n, length) / 1e4, axis=1)
    time_us = anchor.time_us + np.cumsum(fields["dt_us"].astype(np.int64).reshape(n, length),
                                         axis=1)
    level = np.nan if anchor.size_level is None else anchor.size_level
    quote_qty = np.where(is_event, np.exp(fields["log_size"].reshape(n, length)) * level, np.nan)

    def grid(name: str) -> np.ndarray:
        return fields[name].reshape(n, length)

    columns = {
        "tokens": (tokens, None),
        "is_event": (is_event, None),
        "segment_start": (tokens == tokenizer.seg_id, None),
        "side": (grid("side"), is_event),
        "move_bps": (grid("move_bps"), is_event),
        "log_size": (grid("log_size"), is_event),
        "dt_us": (grid("dt_us"), is_event),
        "time_us": (time_us, None),
        "price": (price, np.ones_like(is_event)),
        "quote_qty": (quote_qty, is_event),
    }
    rollouts = [{"index": i} for i in range(n)]
    for name, (values, shown) in columns.items():
        for i, row in enumerate(_json_rows(values, shown)):
            rollouts[i][name] = row
    return rollouts


def _json_rows(values: np.ndarray, shown: np.ndarray | None) -> list[list[Any]]:
    """values [n, length] as lists; null where `shown` is False or a float is not finite."""
    rows = values.tolist()
    if shown is None:
        return rows
    if values.dtype.kind == "f":
        shown = shown & np.isfinite(values)
    for i in np.flatnonzero(~shown.all(axis=1)):
        rows[i] = ([v if keep else None for v, keep in zip(rows[i], shown[i].tolist())]
                   if shown[i].any() else [None] * len(rows[i]))
    return rows


# --- HTTP ----------------------------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, before anything parses it.

    A declared Content-Length is checked first; otherwise (chunked) the body is read up to
    the limit and then handed on to the app unchanged.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reject(int(declared), scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(size, scope, receive, send, at_least=True)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, size: int, scope, receive, send, at_least: bool = False) -> None:
        over = "over " if at_least else ""
        response = JSONResponse({"detail": f"request body is {over}{size} bytes; this server "
                                           f"accepts at most {self.max_bytes} bytes"},
                                status_code=413)
        await response(scope, receive, send)


class AnswerTracking:
    """ASGI middleware: what a request enters on ``scope[KEY]`` (an ExitStack) is left
    when its response has been sent, or the client has gone: the batcher counts answers
    up to their last byte (``Batcher.writing_answer``)."""

    KEY = "mega_trading.answer"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with contextlib.ExitStack() as stack:
            scope[self.KEY] = stack
            await self.app(scope, receive, send)


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {413: "body too large (checked before parsing)",
            422: "invalid request: schema, vocabulary or limits",
            503: "queue full or queue timeout", 504: "generation timeout"}
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    clean = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
              "type": str(e.get("type", ""))} for e in errors]
    if not clean:
        return "invalid request", clean
    first = clean[0]
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    more = f" (and {len(clean) - 1} more)" if len(clean) > 1 else ""
    return f"{where}: {first['msg']}{more}", clean


def build_app(service: RolloutService | None, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app around a service (None builds the routes only, for the schema)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service is not None:
            service.start()
        try:
            yield
        finally:
            if service is not None:
                await service.stop()

    app = FastAPI(title=API_TITLE, version=__version__, lifespan=lifespan,
                  description="Synthetic Binance order flow sampled from a trained Mega-Trading "
                              "decoder. Same request and seed, same rollouts.")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AnswerTracking)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_message(list(exc.errors()))
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body it cannot decode at all (not UTF-8) but 422 for
        # malformed JSON; both are one kind of client error here: 422.
        status = 422 if exc.status_code == 400 else exc.status_code
        detail = ("the body is not valid UTF-8 JSON" if exc.status_code == 400 else exc.detail)
        return JSONResponse({"detail": str(detail)}, status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(MegaTradingError)
    async def on_refused(request: Request, exc: MegaTradingError) -> JSONResponse:
        status = getattr(exc, "status_code", 422)
        return JSONResponse({"detail": str(exc)}, status_code=status,
                            headers=getattr(exc, "headers", None))

    def running() -> RolloutService:
        if service is None:
            raise ServeError("no run is loaded", 503)
        return service

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness and batching counters."""
        svc = running()
        return {"status": "ok", "queued": svc.batcher.queued,
                **dataclasses.asdict(svc.batcher.stats)}

    @app.get("/v1/model", response_model=ModelCard, tags=["model"])
    async def model_card() -> dict[str, Any]:
        """The model card: config, size, hashes, training data, backtest headline, limits."""
        return running().model_card()

    @app.post("/v1/rollouts", response_model=RolloutResponse, tags=["rollouts"],
              responses=_error_responses(413, 422, 503, 504))
    async def rollouts(body: RolloutRequest, request: Request) -> dict[str, Any]:
        """Sample `n` rollouts of `length` tokens continuing one prompt."""
        svc = running()
        if body.tokens is not None:  # checked in microseconds: no thread hop
            job, anchor = svc.build_job(body)
        else:  # events to encode, or a window or segment start to read from the shards
            job, anchor = await asyncio.to_thread(svc.build_job, body)
        client = request.scope.get("client")  # (host, port); a list from some servers
        job.client = tuple(client) if client else None
        new_tokens = await svc.batcher.submit(job)
        request.scope[AnswerTracking.KEY].enter_context(svc.batcher.writing_answer(job.client))
        return await svc.answer(job, anchor, new_tokens)

    return app


def create_app(run_dir: str | Path, data_dir: str | Path | None = None,
               settings: ServeSettings = ServeSettings()) -> FastAPI:
    """Load a run (and optionally its prepared data) and build the app serving it."""
    return build_app(RolloutService(run_dir, data_dir, settings), settings)


def openapi_document() -> dict[str, Any]:
    """The served OpenAPI schema (it does not depend on the run)."""
    return build_app(None).openapi()


def write_openapi(path: str | Path) -> Path:
    import json

    from mega_trading.core.lineage import write_text_atomic

    return write_text_atomic(path, json.dumps(openapi_document(), indent=2) + "\n")


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":  # python -m mega_trading.serve docs/openapi.json
    import sys

    print(write_openapi(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json"))
