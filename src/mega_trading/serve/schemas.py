"""The service's typed surface: settings with declared bounds, its error, the limits,
and the request / response bodies (the OpenAPI schema is built from these)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mega_trading.core.config import NonNegativeFloat, NonNegativeInt, PositiveInt, config_dataclass
from mega_trading.core.errors import MegaTradingError

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
# Answers of at most this many new tokens are decoded on the engine's thread, together with
# the others that finish at the same step, and turned into JSON on the event loop (~0.1 ms):
# a thread hop per answer, and the GIL shared with the engine thread, cost more than that.
# Larger ones are decoded and encoded on the answer thread.
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
                               description="0 = greedy. The sampling fields (temperature, "
                                           "top_k, top_p, min_p, tick_support) that a request "
                                           "leaves out "
                                           "take the run's measured choice (RUN/sampling.json; "
                                           "without one, the defaults shown)")
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="null = off")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="1 = off")
    min_p: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False,
                         description="keep tokens with p >= min_p * the top token's p; 0 = off")
    tick_support: bool = Field(False, description="only tokens whose move and gap bins a market "
                                                   "of the rollout's tick class made in training")
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
        the schema says number, so a boolean anywhere but the boolean fields is refused."""
        if not isinstance(data, dict):
            return data
        stack = [(key, value) for key, value in data.items()
                 if key not in ("forbid_seg", "tick_support")]
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
    tick_support: bool = False
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


