"""`mega-trading record` against a local Binance stand-in on 127.0.0.1.

The stand-in replays a real capture slice over a websocket (combined-stream messages,
exactly as captured) and answers REST depth requests with the TRUE book at the current
replay position (the capture's snapshot plus every diff up to there, including those it
did not deliver). It skips one diff, then drops the connection and resumes further on,
so the recorder sees two sequence gaps.
"""

from __future__ import annotations

import asyncio
import gzip
import http
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.server import serve

from mega_trading.book.build import check_document, rebuild_captures
from mega_trading.book.record import LOG_NAME, RecordConfig, run_record

SLICE = Path(__file__).parent / "data" / "captures" / "spot-BTCUSDT-20240808.gz"


class BinanceStandIn:
    """Websocket + REST on one port, in a background thread with its own event loop."""

    def __init__(self, path: Path, skip_diff: int, drop_at: int, resume_at: int,
                 pace_s: float = 0.0005):
        snapshot, self.messages = None, []
        for line in gzip.decompress(path.read_bytes()).splitlines():
            body = line.split(b" ", 1)[1].decode()
            if "lastUpdateId" in body and snapshot is None:
                snapshot = json.loads(body)
            elif '"stream"' in body:
                self.messages.append(body)
        self.lid = snapshot["lastUpdateId"]
        self.bids = {p: q for p, q in snapshot["bids"]}
        self.asks = {p: q for p, q in snapshot["asks"]}
        self.diff_rows = [i for i, m in enumerate(self.messages) if "depthUpdate" in m]
        self.skip_row = self.diff_rows[skip_diff]
        self.drop_at, self.resume_at, self.pace_s = drop_at, resume_at, pace_s
        self.position = 0                  # messages up to here have happened at the exchange
        self.connections = 0
        self.sent_after_reconnect: list[str] = []
        self.done = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> str:
        """The true book after every diff that has happened (sent or not)."""
        bids, asks, lid = dict(self.bids), dict(self.asks), self.lid
        for row in self.diff_rows:
            if row >= self.position:
                break
            data = json.loads(self.messages[row])["data"]
            if data["u"] <= lid:
                continue
            for book, key in ((bids, "b"), (asks, "a")):
                for p, q in data[key]:
                    if float(q) == 0:
                        book.pop(p, None)
                    else:
                        book[p] = q
            lid = data["u"]
        return json.dumps({"lastUpdateId": lid,
                           "bids": sorted(bids.items(), key=lambda x: -float(x[0]))[:1000],
                           "asks": sorted(asks.items(), key=lambda x: float(x[0]))[:1000]})

    async def _handler(self, ws) -> None:
        self.connections += 1
        first = self.connections == 1
        start = 0 if first else self.resume_at
        self.position = max(self.position, start)
        for i in range(start, len(self.messages)):
            if first and i == self.drop_at:
                await ws.close(1011, "stand-in drops the connection")
                return
            self.position = i + 1
            if i == self.skip_row:
                continue                   # the exchange updated the book, we lost the diff
            await ws.send(self.messages[i])
            if not first:
                self.sent_after_reconnect.append(self.messages[i])
            await asyncio.sleep(self.pace_s)
        self.done.set()
        await ws.wait_closed()

    def _process_request(self, connection, request):
        if request.path.startswith("/api/v3/depth"):
            return connection.respond(http.HTTPStatus.OK, self.snapshot())
        return None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            self.stopped = asyncio.get_running_loop().create_future()
            async with serve(self._handler, "127.0.0.1", 0,
                             process_request=self._process_request) as server:
                self.port = server.sockets[0].getsockname()[1]
                self.ready.set()
                await self.stopped

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stopped.set_result, None)
        self.thread.join(10)

    def urls(self) -> dict[str, str]:
        return {"ws_url": f"ws://127.0.0.1:{self.port}/stream",
                "rest_url": f"http://127.0.0.1:{self.port}/api/v3/depth"}


def recorded_bodies(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("*.gz")):
        lines += gzip.decompress(path.read_bytes()).decode().splitlines()
    return [line.split(" ", 1)[1] for line in lines]


@pytest.mark.slow
def test_recorder_survives_a_drop_and_a_gap_and_the_book_is_exact(tmp_path):
    out = tmp_path / "rec"
    with BinanceStandIn(SLICE, skip_diff=60, drop_at=1500, resume_at=1600) as server:
        cfg = RecordConfig(["BTCUSDT"], "spot", out, **server.urls(), backoff_initial_s=0.05,
                           snapshot_retry_s=0.05)
        stop = threading.Event()
        worker = threading.Thread(target=lambda: setattr(worker, "counts", run_record(cfg, stop)))
        worker.start()
        assert server.done.wait(120), "the stand-in never finished its replay"
        time.sleep(0.5)
        stop.set()
        worker.join(30)
    assert server.connections == 2
    bodies = recorded_bodies(out)
    # nothing the server sent after the reconnect is lost, and the order is kept
    sent = server.sent_after_reconnect
    streamed = [b for b in bodies if '"stream"' in b]
    assert streamed[-len(sent):] == sent
    assert worker.counts["disconnects"] == 1 and worker.counts["gaps"] == 2
    assert sum('"lastUpdateId"' in b for b in bodies) == 3     # start + after each gap
    events = [json.loads(x)["event"] for x in (out / LOG_NAME).read_text().splitlines()]
    assert events.count("disconnect") == 1 and events.count("connect") == 2
    book = check_document(rebuild_captures(sorted(out.glob("*.gz"))))["books"]["spot:BTCUSDT"]
    assert len(book["gaps"]) == 2 and book["resyncs"] == 2
    assert book["bookticker_mismatches"] == 0 and book["bookticker_checked"] > 20


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT semantics")
def test_ctrl_c_leaves_a_valid_gzip(tmp_path):
    out = tmp_path / "rec"
    with BinanceStandIn(SLICE, skip_diff=5, drop_at=10**9,
                        resume_at=0, pace_s=0.002) as server:
        urls = server.urls()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mega_trading.cli", "record", "--symbols", "BTCUSDT",
             "--market", "spot", "--out", str(out), "--ws-url", urls["ws_url"],
             "--rest-url", urls["rest_url"]], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(out.glob("*.gz")):
            time.sleep(0.1)
        time.sleep(1.0)                              # mid-stream
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)   # a loaded 2-core machine is slow
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"record did not stop on SIGINT: {err.decode()[-2000:]}")
    assert proc.returncode == 130, err.decode()
    (path,) = out.glob("*.gz")
    lines = gzip.decompress(path.read_bytes()).splitlines()  # raises on a truncated gzip
    assert len(lines) > 50 and all(line.split(b" ", 1)[0].isdigit() for line in lines)
    assert b"Traceback" not in err


def test_files_rotate_at_the_utc_day_and_a_restart_appends_a_member(tmp_path):
    from mega_trading.book.capture import Skips, read_capture
    from mega_trading.book.record import DailyFiles

    day_end_ns = 1_723_161_599_000_000_000            # 2024-08-08 23:59:59 UTC
    msg = '{"stream":"btcusdt@trade","data":{"s":"BTCUSDT","p":"1","q":"1","T":1,"t":%d,"m":true}}'
    for start in (0, 10):                              # a second run on the same days
        files = DailyFiles(tmp_path, "spot")
        for i in range(start, start + 4):
            files.write("BTCUSDT", day_end_ns + i * 400_000_000, msg % i)
        files.close()
    names = sorted(p.name for p in tmp_path.glob("*.gz"))
    assert names == ["spot-BTCUSDT-20240808.gz", "spot-BTCUSDT-20240809.gz"]
    skips = Skips()
    ids = [m.data["t"] for name in names for m in read_capture(tmp_path / name, skips)]
    assert sorted(ids) == [0, 1, 2, 3, 10, 11, 12, 13] and not skips.counts
