"""Download Binance public archive zips (data.binance.vision) with checksums and resume.

Archive layout (mirrored under the output folder, without the leading `data/`):
  data/spot/monthly/{kind}/{SYMBOL}/{SYMBOL}-{kind}-{YYYY-MM}.zip
  data/spot/daily/{kind}/{SYMBOL}/{SYMBOL}-{kind}-{YYYY-MM-DD}.zip
  data/futures/um/daily|monthly/trades/{SYMBOL}/...   (USD-M futures, `market="um"`)
each with `<zip>.CHECKSUM` holding "<sha256>  <filename>".

Per file: skip it when a verified copy is already there (an `.ok` marker records its
size, mtime and hash, so a re-run makes no request); else fetch the checksum, stream the
zip into `<zip>.part` (resuming a previous partial download with an HTTP Range request),
retry connection errors and 5xx with exponential backoff, verify SHA-256, and only then
rename it to its final name. A 404 is "missing", not fatal; a checksum mismatch fails
that file (nothing is kept under the final name) while the other files carry on.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from pydantic import Field

from mega_trading.core.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    config_dataclass,
)
from mega_trading.core.errors import ConfigError
from mega_trading.core.lineage import provenance, sha256_file, write_json_atomic, write_text_atomic
from mega_trading.data.ingest.schema import normalize_kind, normalize_market

DEFAULT_BASE_URL = "https://data.binance.vision"
CHUNK_BYTES = 1 << 20
USER_AGENT = "mega-trading-downloader"

_MONTH = re.compile(r"^\d{4}-\d{2}$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@config_dataclass
class DownloadConfig:
    base_url: str = DEFAULT_BASE_URL
    workers: Annotated[int, Field(ge=1, le=64)] = 4
    retries: NonNegativeInt = 4  # extra attempts after the first, per request
    backoff_s: NonNegativeFloat = 1.0  # first retry waits this long, then doubles
    timeout_s: PositiveFloat = 60.0


@dataclasses.dataclass(frozen=True)
class ArchiveFile:
    symbol: str
    kind: str
    period: str  # YYYY-MM (monthly) or YYYY-MM-DD (daily)
    market: str = "spot"  # or "um": USD-M futures

    @property
    def daily(self) -> bool:
        return len(self.period) == 10

    @property
    def name(self) -> str:
        return f"{self.symbol}-{self.kind}-{self.period}.zip"

    @property
    def relative_path(self) -> str:
        frequency = "daily" if self.daily else "monthly"
        market = "spot" if self.market == "spot" else f"futures/{self.market}"
        return f"{market}/{frequency}/{self.kind}/{self.symbol}/{self.name}"

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/data/{self.relative_path}"


@dataclasses.dataclass(frozen=True)
class FileOutcome:
    file: ArchiveFile
    status: str  # downloaded | skipped | missing | failed
    path: Path
    message: str = ""
    n_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    outcomes: tuple[FileOutcome, ...]

    def _with(self, status: str) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def downloaded(self) -> list[FileOutcome]:
        return self._with("downloaded")

    @property
    def skipped(self) -> list[FileOutcome]:
        return self._with("skipped")

    @property
    def missing(self) -> list[FileOutcome]:
        return self._with("missing")

    @property
    def failed(self) -> list[FileOutcome]:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def zips(self) -> list[Path]:
        """The verified zips on disk (downloaded now or before)."""
        return [o.path for o in self.outcomes if o.status in ("downloaded", "skipped")]


class _Missing(Exception):
    """The server has no such file (HTTP 404)."""


class _Transient(Exception):
    """Worth retrying: connection trouble or a 5xx."""


class _ChecksumMismatch(Exception):
    pass


# --- which files ----------------------------------------------------------------------


def _parse_period(text: str, what: str) -> tuple[int, int, int | None]:
    text = text.strip()
    try:
        if _MONTH.match(text):
            stamp = dt.date.fromisoformat(text + "-01")
            return stamp.year, stamp.month, None
        if _DAY.match(text):
            stamp = dt.date.fromisoformat(text)
            return stamp.year, stamp.month, stamp.day
    except ValueError:
        pass
    raise ConfigError(f"--{what} {text!r}: expected YYYY-MM or YYYY-MM-DD")


def archive_periods(start: str, end: str, daily: bool) -> list[str]:
    """Months (YYYY-MM) or days (YYYY-MM-DD) from start to end, both included."""
    y0, m0, d0 = _parse_period(start, "start")
    y1, m1, d1 = _parse_period(end, "end")
    if not daily:
        if d0 is not None or d1 is not None:
            raise ConfigError("monthly archives take --start/--end as YYYY-MM (or pass --daily)")
        months = []
        year, month = y0, m0
        while (year, month) <= (y1, m1):
            months.append(f"{year:04d}-{month:02d}")
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        if not months:
            raise ConfigError(f"--start {start} is after --end {end}")
        return months
    first = dt.date(y0, m0, d0 or 1)
    last = dt.date(y1, m1, d1 or calendar.monthrange(y1, m1)[1])
    if first > last:
        raise ConfigError(f"--start {start} is after --end {end}")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def plan_files(
    symbols: Sequence[str], kind: str, start: str, end: str, daily: bool = False,
    market: str = "spot",
) -> list[ArchiveFile]:
    kind = normalize_kind(kind) or "trades"
    market = normalize_market(market) or "spot"
    if market != "spot" and kind != "trades":
        raise ConfigError(f"--market {market}: only --kind trades is read for futures")
    symbols = [s.strip().upper() for s in symbols if s.strip()]
    if not symbols:
        raise ConfigError("no symbols given")
    bad = [s for s in symbols if not s.isalnum()]
    if bad:
        raise ConfigError(f"invalid symbol(s): {', '.join(bad)}")
    periods = archive_periods(start, end, daily)
    return [ArchiveFile(s, kind, p, market) for s in symbols for p in periods]


# --- HTTP -----------------------------------------------------------------------------


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    # Environment proxies apply to the real archive, never to a loopback test server.
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _open(url: str, cfg: DownloadConfig, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    try:
        return _opener_for(url).open(request, timeout=cfg.timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise _Missing(url) from None
        if exc.code == 416:
            raise  # the caller handles "range not satisfiable"
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} from {url}") from None
        raise
    except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc} ({url})") from None


def _with_retries(action: Callable[[], object], cfg: DownloadConfig):
    for attempt in range(cfg.retries + 1):
        try:
            return action()
        except _Transient:
            if attempt == cfg.retries:
                raise
            time.sleep(cfg.backoff_s * (2**attempt))
    raise AssertionError("unreachable")


def fetch_checksum(file: ArchiveFile, cfg: DownloadConfig) -> str:
    url = file.url(cfg.base_url) + ".CHECKSUM"

    def get() -> str:
        try:
            with _open(url, cfg) as response:
                text = response.read().decode("utf-8", errors="replace")
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Transient(str(exc)) from None
        return text

    text = _with_retries(get, cfg)
    digest = text.split()[0].lower() if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"unreadable checksum file at {url}: {text[:80]!r}")
    return digest


def _download_to_part(
    url: str, part: Path, cfg: DownloadConfig, on_bytes: Callable[[int, int | None], None]
) -> None:
    """Stream `url` into `part`, continuing from its current size when it exists."""

    def attempt() -> None:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = _open(url, cfg, headers)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing beyond what we have: the part is complete
                return
            raise
        with response:
            resumed = response.status == 206 and _range_start(response) == have
            total = _total_size(response, have if resumed else 0)
            mode = "ab" if resumed else "wb"
            done = have if resumed else 0
            on_bytes(done, total)
            try:
                with open(part, mode) as handle:
                    while chunk := response.read(CHUNK_BYTES):
                        handle.write(chunk)
                        done += len(chunk)
                        on_bytes(done, total)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc} ({url})") from None
            if total is not None and done < total:
                raise _Transient(f"connection closed after {done} of {total} bytes ({url})")

    _with_retries(attempt, cfg)


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _total_size(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


# --- one file -------------------------------------------------------------------------


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".ok")


def _is_verified(path: Path) -> bool:
    """True when `path` matches its `.ok` marker (size, mtime) or its local CHECKSUM."""
    if not path.is_file():
        return False
    stat = path.stat()
    marker = _marker(path)
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
            if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
                return True
        except (OSError, ValueError):
            pass
    checksum = path.with_name(path.name + ".CHECKSUM")
    if checksum.is_file():
        expected = (checksum.read_text().split() or [""])[0].lower()
        if expected and sha256_file(path) == expected:
            _write_marker(path, expected)
            return True
    return False


def _write_marker(path: Path, digest: str, url: str | None = None) -> None:
    stat = path.stat()
    record = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    write_json_atomic(_marker(path), {**record, **provenance(stage="download", url=url)})


def download_file(
    file: ArchiveFile,
    out_dir: str | Path,
    cfg: DownloadConfig = DownloadConfig(),
    on_bytes: Callable[[int, int | None], None] | None = None,
) -> FileOutcome:
    """Fetch and verify one archive zip; never raises for a per-file problem."""
    target = Path(out_dir) / file.relative_path
    on_bytes = on_bytes or (lambda done, total: None)
    if _is_verified(target):
        return FileOutcome(file, "skipped", target, "already verified", target.stat().st_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        expected = fetch_checksum(file, cfg)
        resumed = part.exists() and part.stat().st_size > 0
        _fetch_verified(file.url(cfg.base_url), part, expected, cfg, on_bytes, resumed)
    except _Missing:
        return FileOutcome(file, "missing", target, "not in the archive (HTTP 404)")
    except _ChecksumMismatch as exc:
        return FileOutcome(file, "failed", target, str(exc))
    except (_Transient, urllib.error.HTTPError, ValueError, OSError) as exc:
        return FileOutcome(file, "failed", target, f"{type(exc).__name__}: {exc}")
    if target.exists():
        target.unlink()  # an unverified leftover under the final name
    os.replace(part, target)
    write_text_atomic(target.with_name(target.name + ".CHECKSUM"), f"{expected}  {target.name}\n")
    _write_marker(target, expected, file.url(cfg.base_url))
    return FileOutcome(file, "downloaded", target, "", target.stat().st_size)


def _fetch_verified(
    url: str,
    part: Path,
    expected: str,
    cfg: DownloadConfig,
    on_bytes: Callable[[int, int | None], None],
    resumed: bool,
) -> None:
    _download_to_part(url, part, cfg, on_bytes)
    actual = sha256_file(part)
    if actual == expected:
        return
    part.unlink(missing_ok=True)
    if resumed:
        # The old partial bytes may have been bad: one clean download from scratch.
        _fetch_verified(url, part, expected, cfg, on_bytes, resumed=False)
        return
    raise _ChecksumMismatch(f"checksum mismatch: expected {expected}, got {actual}")


# --- many files -----------------------------------------------------------------------


def download_archive(
    files: Sequence[ArchiveFile],
    out_dir: str | Path,
    cfg: DownloadConfig = DownloadConfig(),
    on_start: Callable[[ArchiveFile], object] | None = None,
    on_bytes: Callable[[ArchiveFile, int, int | None], None] | None = None,
    on_done: Callable[[FileOutcome], None] | None = None,
) -> DownloadResult:
    """Download `files` with `cfg.workers` threads; per-file problems land in the result."""
    if cfg.workers < 1:
        raise ConfigError("--workers must be at least 1")

    def one(file: ArchiveFile) -> FileOutcome:
        if on_start is not None:
            on_start(file)
        progress = (lambda done, total: on_bytes(file, done, total)) if on_bytes else None
        outcome = download_file(file, out_dir, cfg, progress)
        if on_done is not None:
            on_done(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        outcomes = tuple(pool.map(one, files))
    return DownloadResult(outcomes)
