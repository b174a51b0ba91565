"""`mega-trading record`: Binance's combined stream and REST snapshots into capture files.

One websocket connection carries, for every symbol, ``@trade``, the depth diffs
(``@depth@100ms`` spot, ``@depth@0ms`` USD-M) and ``@bookTicker``. Each message is written
as received, ``<receive time ns> <json>``, to ``OUT/<market>-<SYMBOL>-<YYYYMMDD>.gz``
(hftbacktest's collector format: one file per symbol, rotated at each UTC day, the REST
snapshot written raw into its symbol's file).

A depth snapshot is fetched for a symbol when its first diff arrives (so the diffs that
the snapshot must be joined with are already being recorded, as Binance's procedure asks)
and again whenever a diff does not continue the previous one (`sequence_continues`),
which is how a dropped connection shows up too. Disconnects, reconnects and snapshot
fetches go to ``OUT/record_log.jsonl``. Reconnects back off exponentially.

SIGINT (Ctrl-C) cancels the loop between two messages; every open gzip is then finished,
so the files are always valid. Restarting on the same day appends a new gzip member to the
day's file (concatenated members are one valid gzip stream).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import connect

from mega_trading.book.capture import MARKETS, sequence_continues
from mega_trading.core.config import config_dataclass
from mega_trading.core.errors import ConfigError

WS_URLS = {"spot": "wss://stream.binance.com:9443/stream", "um": "wss://fstream.binance.com/stream"}
REST_URLS = {"spot": "https://api.binance.com/api/v3/depth",
             "um": "https://fapi.binance.com/fapi/v1/depth"}
DEPTH_STREAM = {"spot": "depth@100ms", "um": "depth@0ms"}
LOG_NAME = "record_log.jsonl"


@config_dataclass(frozen=False)  # __post_init__ normalizes symbols and URLs
class RecordConfig:
    symbols: list[str]
    market: str
    out: Path
    ws_url: str | None = None          # default: Binance's public endpoint for the market
    rest_url: str | None = None
    snapshot_limit: int = 1000
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    snapshot_retry_s: float = 1.0      # least time between two snapshot requests of a symbol

    def __post_init__(self) -> None:
        if self.market not in MARKETS:
            raise ConfigError(f"--market must be one of {', '.join(MARKETS)}, not {self.market!r}")
        self.symbols = [s.strip().upper() for s in self.symbols if s.strip()]
        if not self.symbols or not all(s.isalnum() for s in self.symbols):
            raise ConfigError(f"--symbols must be comma-separated symbols, got {self.symbols!r}")
        self.ws_url = self.ws_url or WS_URLS[self.market]
        self.rest_url = self.rest_url or REST_URLS[self.market]

    def stream_url(self) -> str:
        streams = [f"{s.lower()}@{kind}" for s in self.symbols
                   for kind in ("trade", DEPTH_STREAM[self.market], "bookTicker")]
        return f"{self.ws_url}?streams={'/'.join(streams)}"


class DailyFiles:
    """One gzip per symbol and UTC day; writes are synchronous, so a cancellation (Ctrl-C)
    never lands inside one, and `close` finishes every member."""

    def __init__(self, out: Path, market: str):
        self.out, self.market = out, market
        self.open: dict[str, tuple[str, gzip.GzipFile]] = {}
        out.mkdir(parents=True, exist_ok=True)

    def write(self, symbol: str, time_ns: int, text: str) -> None:
        day = dt.datetime.fromtimestamp(time_ns / 1e9, dt.UTC).strftime("%Y%m%d")
        current = self.open.get(symbol)
        if current is None or current[0] != day:
            if current is not None:
                current[1].close()
            path = self.out / f"{self.market}-{symbol}-{day}.gz"
            current = (day, gzip.open(path, "ab"))  # noqa: SIM115  (open across writes; close())
            self.open[symbol] = current
        current[1].write(f"{time_ns} {text}\n".encode())

    def flush(self) -> None:
        for _, handle in self.open.values():
            handle.flush()

    def close(self) -> None:
        for _, handle in self.open.values():
            handle.close()
        self.open.clear()


class Recorder:
    def __init__(self, cfg: RecordConfig, stop: threading.Event | None = None):
        self.cfg, self.stop = cfg, stop or threading.Event()
        self.files = DailyFiles(cfg.out, cfg.market)
        self.prev_u: dict[str, int] = {}
        self.fetching: set[str] = set()
        self.needs_snapshot: set[str] = set()
        self.last_attempt_s: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()
        self.counts = {"messages": 0, "snapshots": 0, "gaps": 0, "disconnects": 0}
        self.log_path = cfg.out / LOG_NAME

    def log(self, event: str, **detail: Any) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"time_ns": time.time_ns(), "event": event, **detail}) + "\n")

    async def run(self) -> dict[str, int]:
        backoff = self.cfg.backoff_initial_s
        async with httpx.AsyncClient(timeout=10.0) as http:
            self.http = http
            try:
                while not self.stop.is_set():
                    received = await self._session()
                    if self.stop.is_set():
                        break
                    backoff = self.cfg.backoff_initial_s if received else min(
                        2 * backoff, self.cfg.backoff_max_s)
                    self.log("reconnect_wait", seconds=backoff)
                    await asyncio.sleep(backoff)
                if self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)
            finally:
                self.files.close()
        return self.counts

    async def _session(self) -> int:
        """One connection: returns how many messages it delivered. No `wait_for` around
        `recv`: on Python 3.11 it can swallow the cancellation that Ctrl-C sends."""
        received = 0
        try:
            async with connect(self.cfg.stream_url(), max_size=2**24, open_timeout=10) as ws:
                self.log("connect", url=self.cfg.ws_url)
                watcher = asyncio.get_running_loop().create_task(self._close_on_stop(ws))
                try:
                    async for text in ws:
                        self._on_message(time.time_ns(), text)
                        received += 1
                finally:
                    watcher.cancel()
            if not self.stop.is_set():   # the server closed the connection cleanly
                raise websockets.exceptions.ConnectionClosedOK(None, None)
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
            self.counts["disconnects"] += 1
            self.log("disconnect", error=f"{exc.__class__.__name__}: {exc}", received=received)
            self.files.flush()
        return received

    async def _close_on_stop(self, ws) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
        await ws.close()

    def _on_message(self, time_ns: int, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        try:
            data = json.loads(text)["data"]
            symbol = data["s"].upper()
        except (ValueError, KeyError, TypeError, AttributeError):
            self.log("unparsed_message", text=text[:200])
            return
        self.files.write(symbol, time_ns, text)
        self.counts["messages"] += 1
        if data.get("e") == "depthUpdate":
            self._check_sequence(symbol, data)

    def _check_sequence(self, symbol: str, data: dict) -> None:
        prev = self.prev_u.get(symbol)
        if prev is None or not sequence_continues(self.cfg.market, prev, int(data["U"]),
                                                  int(data.get("pu", -1))):
            if prev is not None:
                self.counts["gaps"] += 1
                self.log("gap", symbol=symbol, prev_u=prev, U=data["U"], pu=data.get("pu"))
            self.needs_snapshot.add(symbol)
        # retried on later diffs (at most every snapshot_retry_s) until a snapshot is written
        now = time.monotonic()
        if (symbol in self.needs_snapshot and symbol not in self.fetching
                and now - self.last_attempt_s.get(symbol, -1e9) >= self.cfg.snapshot_retry_s):
            self.last_attempt_s[symbol] = now
            self.fetching.add(symbol)
            task = asyncio.get_running_loop().create_task(self._snapshot(symbol))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.prev_u[symbol] = int(data["u"])

    async def _snapshot(self, symbol: str) -> None:
        try:
            response = await self.http.get(self.cfg.rest_url, params={
                "symbol": symbol, "limit": self.cfg.snapshot_limit})
            response.raise_for_status()
            text = response.text.strip()
            json.loads(text)  # a valid document, or nothing is written
            self.files.write(symbol, time.time_ns(), text)
            self.counts["snapshots"] += 1
            self.needs_snapshot.discard(symbol)
            self.log("snapshot", symbol=symbol, last_update_id=json.loads(text).get("lastUpdateId"))
        except (httpx.HTTPError, ValueError) as exc:
            # Tried again on a later diff; until then `book` reports the gap as open.
            self.log("snapshot_failed", symbol=symbol, error=f"{exc.__class__.__name__}: {exc}")
        finally:
            self.fetching.discard(symbol)


def run_record(cfg: RecordConfig, stop: threading.Event | None = None) -> dict[str, int]:
    """Record until `stop` is set or SIGINT; the gzip files are finished either way."""
    return asyncio.run(Recorder(cfg, stop).run())
