"""The report in a real browser: headless Chromium opens it from a file:// URL, offline.

Driven over the Chrome DevTools protocol (a websocket): no console error or uncaught
exception, no request leaves the file, every chart container holds rendered Plotly SVG
with at least one trace, and screenshots of the page and of every chart are not blank.

Needs the Debian `chromium` package. Under CI (CI=true) a missing browser is a failure;
elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from tests.test_report import CHARTS, build_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-port=0", "--window-size=1280,900")
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "devtools:")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = ("headless Chromium is not installed (apt-get install -y chromium); "
               "it is needed to check that the report renders")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


# --- a minimal PNG reader (8-bit RGB / RGBA, as Chromium writes them) ------------------------

def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw RGB(A) bytes) of a non-interlaced 8-bit PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        filter_type = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 255
            elif filter_type == 2:
                line[i] = (line[i] + up) & 255
            elif filter_type == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif filter_type == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def gray_variance(data: bytes, step: int = 2) -> float:
    """Variance of the gray level over a grid of pixels: ~0 for a blank image."""
    width, _, rows = png_pixels(data)
    channels = len(rows[0]) // width
    values = []
    for row in rows[::step]:
        for x in range(0, width, step):
            r, g, b = row[x * channels:x * channels + 3]
            values.append((r + g + b) / 3)
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def test_png_reader_on_known_images():
    def png(width, height, rows_rgb, filter_type=0):
        raw = b"".join(bytes([filter_type]) + r for r in rows_rgb)
        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

    blank = png(4, 4, [b"\xff" * 12] * 4)
    assert gray_variance(blank, step=1) == 0.0
    stripes = png(4, 4, [b"\x00" * 12, b"\xff" * 12] * 2)
    assert gray_variance(stripes, step=1) > 10_000
    # filter 2 ("up"): a row of zero differences repeats the row above
    up = png(2, 2, [b"\x10\x20\x30\x40\x50\x60", b"\x00" * 6], filter_type=2)
    assert png_pixels(up)[2] == [b"\x10\x20\x30\x40\x50\x60"] * 2


# --- DevTools protocol -------------------------------------------------------------------------

class DevTools:
    """One page's websocket: commands with ids, events collected as they arrive."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self._next_id = 0

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def start_browser(browser: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium; return it and the websocket URL of its page."""
    process = subprocess.Popen([browser, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"Chromium did not start (exit code {process.poll()})")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
    page = next(t for t in targets if t["type"] == "page")
    return process, page["webSocketDebuggerUrl"]


CHART_STATE = """JSON.stringify(Array.from(document.querySelectorAll('.chart')).map(d => ({
  name: d.dataset.chart, svg: d.querySelectorAll('.main-svg').length,
  traces: d.querySelectorAll('g.trace').length,
  width: d.getBoundingClientRect().width, height: d.getBoundingClientRect().height})))"""
CHART_BOX = """JSON.stringify((() => { const d = document.querySelector('[data-chart="%s"]');
  d.scrollIntoView({block: 'start', behavior: 'instant'}); const r = d.getBoundingClientRect();
  return {x: r.left + window.scrollX, y: r.top + window.scrollY,
  width: r.width, height: Math.min(r.height, window.innerHeight)}; })())"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Open the report of a tiny real run in headless Chromium; yield (devtools, path)."""
    browser = find_browser()
    from mega_trading.report import build_report

    root = tmp_path_factory.mktemp("browser")
    run, _ = build_run(root)
    path = build_report(run)
    from websockets.sync.client import connect

    process, ws_url = start_browser(browser, root / "profile")
    try:
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            yield from _load(DevTools(ws), path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _load(devtools: DevTools, path: Path):
    """Navigate to the report, wait until every chart is drawn, yield (devtools, path)."""
    for domain in ("Runtime", "Log", "Page", "Network"):
        devtools.send(f"{domain}.enable")
    devtools.send("Page.navigate", url=path.resolve().as_uri())
    devtools.wait_for("Page.loadEventFired", timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # Plotly draws synchronously, but be patient
        state = json.loads(devtools.evaluate(CHART_STATE))
        if state and all(c["svg"] and c["traces"] for c in state):
            break
        time.sleep(0.5)
    yield devtools, path


def test_no_console_errors_and_no_network(rendered):
    devtools, _ = rendered
    errors = []
    for event in devtools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details.get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    assert errors == []
    requests = [e["params"]["request"]["url"] for e in devtools.events
                if e.get("method") == "Network.requestWillBeSent"]
    assert requests  # the page itself was loaded ...
    remote = [u for u in requests if not u.startswith(LOCAL_SCHEMES)]
    assert remote == []  # ... and nothing else was fetched: it works offline


def test_every_chart_has_rendered_svg(rendered):
    devtools, _ = rendered
    state = {c["name"]: c for c in json.loads(devtools.evaluate(CHART_STATE))}
    assert set(CHARTS) <= set(state)
    empty = {name: c for name, c in state.items()
             if not (c["svg"] >= 1 and c["traces"] >= 1 and c["width"] > 200 and c["height"] > 150)}
    assert not empty, f"charts without rendered content: {empty}"


def test_screenshots_are_not_blank(rendered, tmp_path):
    devtools, path = rendered
    page = base64.b64decode(devtools.send("Page.captureScreenshot", format="png")["data"])
    (path.parent / "report-top.png").write_bytes(page)  # kept for a person to look at
    assert gray_variance(page, step=4) > 200
    blank = []
    for name in CHARTS:
        box = json.loads(devtools.evaluate(CHART_BOX % name))
        # scrolled into view first: capturing beyond the viewport would resize the page
        # and make every responsive chart redraw
        shot = devtools.send("Page.captureScreenshot", format="png", clip={**box, "scale": 0.3})
        if gray_variance(base64.b64decode(shot["data"])) < 20:
            blank.append(name)
    assert blank == []
