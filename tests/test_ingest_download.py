"""Archive downloads against a local (loopback) HTTP server with Range support."""

from __future__ import annotations

import hashlib
import io
import re
import socketserver
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mega_trading.cli import main
from mega_trading.core.errors import ConfigError
from mega_trading.data.ingest.download import (
    ArchiveFile,
    DownloadConfig,
    archive_periods,
    download_archive,
    plan_files,
)
from mega_trading.data.ingest.reader import read_trades


class _Archive:
    """What the fake data.binance.vision serves, and what it was asked."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fail_next: dict[str, int] = {}  # path -> how many 500s before succeeding
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def add(self, file: ArchiveFile, data: bytes, checksum_of: bytes | None = None) -> None:
        digest = hashlib.sha256(checksum_of if checksum_of is not None else data).hexdigest()
        path = "/data/" + file.relative_path
        self.files[path] = data
        self.files[path + ".CHECKSUM"] = f"{digest}  {file.name}\n".encode()

    def hits(self, suffix: str) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if r[0].endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    archive: _Archive

    def do_GET(self) -> None:
        archive = self.server.archive  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        with archive.lock:
            archive.requests.append((self.path, range_header))
            failures = archive.fail_next.get(self.path, 0)
            if failures:
                archive.fail_next[self.path] = failures - 1
        if failures:
            self.send_error(500, "transient")
            return
        body = archive.files.get(self.path)
        if body is None:
            self.send_error(404, "NoSuchKey")
            return
        start, end, status = 0, len(body) - 1, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(body) - 1, len(body) - 1)
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body[start : end + 1])

    def log_message(self, *args) -> None:
        pass


class _LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN (a DNS query): not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


@pytest.fixture
def archive():
    state = _Archive()
    server = _LoopbackServer(("127.0.0.1", 0), _Handler)
    server.archive = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield state
    server.shutdown()
    server.server_close()


BTC = ArchiveFile("BTCUSDT", "trades", "2024-08-08")
ETH = ArchiveFile("ETHUSDT", "trades", "2024-08-08")


@pytest.fixture
def served(archive, sample_dir):
    """The real sample zips served in the archive layout (their published checksums)."""
    for file in (BTC, ETH):
        archive.add(file, (sample_dir / file.name).read_bytes())
    return archive


def _cfg(archive: _Archive, **kw) -> DownloadConfig:
    return DownloadConfig(
        base_url=archive.base_url,  # type: ignore[attr-defined]
        workers=2,
        retries=kw.pop("retries", 3),
        backoff_s=0.01,
        timeout_s=5,
        **kw,
    )


def test_download_verifies_and_mirrors_archive_layout(served, tmp_path, sample_dir):
    result = download_archive([BTC, ETH], tmp_path, _cfg(served))
    assert result.ok
    assert [o.file for o in result.downloaded] == [BTC, ETH]
    for file in (BTC, ETH):
        local = tmp_path / "spot/daily/trades" / file.symbol / file.name
        assert local.read_bytes() == (sample_dir / file.name).read_bytes()
        expected = (sample_dir / (file.name + ".CHECKSUM")).read_text().split()[0]
        assert local.with_name(local.name + ".CHECKSUM").read_text().split()[0] == expected
        assert not local.with_name(local.name + ".part").exists()
    assert read_trades(result.zips()[1])["symbol"][0] == "ETHUSDT"


def test_rerun_skips_verified_files_without_requests(served, tmp_path):
    download_archive([BTC, ETH], tmp_path, _cfg(served))
    n_requests = len(served.requests)
    again = download_archive([BTC, ETH], tmp_path, _cfg(served))
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"]
    assert len(served.requests) == n_requests
    # a file changed on disk is no longer "verified": it is fetched again
    local = again.skipped[0].path
    local.write_bytes(b"garbage")
    third = download_archive([BTC], tmp_path, _cfg(served))
    assert third.downloaded and third.downloaded[0].path == local
    assert local.read_bytes() == served.files["/data/" + BTC.relative_path]


def test_resume_partial_download_with_range(served, tmp_path):
    data = served.files["/data/" + BTC.relative_path]
    part = tmp_path / (BTC.relative_path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 3])
    result = download_archive([BTC], tmp_path, _cfg(served))
    assert result.ok and result.downloaded
    assert served.hits(".zip") == [("/data/" + BTC.relative_path, f"bytes={len(data) // 3}-")]
    assert (tmp_path / BTC.relative_path).read_bytes() == data


def test_resume_of_bad_partial_restarts_from_scratch(served, tmp_path):
    data = served.files["/data/" + BTC.relative_path]
    part = tmp_path / (BTC.relative_path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 100)  # not a prefix of the real file
    result = download_archive([BTC], tmp_path, _cfg(served))
    assert result.ok
    assert [r[1] for r in served.hits(".zip")] == ["bytes=100-", None]
    assert (tmp_path / BTC.relative_path).read_bytes() == data


def test_complete_part_file_is_verified_without_refetching(served, tmp_path):
    data = served.files["/data/" + BTC.relative_path]
    part = tmp_path / (BTC.relative_path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data)  # a crash after the last byte but before the rename
    result = download_archive([BTC], tmp_path, _cfg(served))
    assert result.ok and result.downloaded
    assert served.hits(".zip") == [("/data/" + BTC.relative_path, f"bytes={len(data)}-")]
    assert (tmp_path / BTC.relative_path).read_bytes() == data


def test_retry_after_transient_500(served, tmp_path):
    zip_path = "/data/" + BTC.relative_path
    served.fail_next[zip_path] = 2
    served.fail_next[zip_path + ".CHECKSUM"] = 1
    result = download_archive([BTC], tmp_path, _cfg(served))
    assert result.ok and result.downloaded
    assert len(served.hits(".zip")) == 3
    assert len(served.hits(".CHECKSUM")) == 2


def test_persistent_500_fails_after_retries(served, tmp_path):
    served.fail_next["/data/" + BTC.relative_path] = 99
    result = download_archive([BTC], tmp_path, _cfg(served, retries=2))
    assert not result.ok
    assert "HTTP 500" in result.failed[0].message
    assert len(served.hits(".zip")) == 3


def test_missing_file_is_reported_and_skipped(served, tmp_path):
    files = plan_files(["BTCUSDT"], "trades", "2024-08-07", "2024-08-08", daily=True)
    result = download_archive(files, tmp_path, _cfg(served))
    assert result.ok
    assert [o.file.period for o in result.missing] == ["2024-08-07"]
    assert [o.file.period for o in result.downloaded] == ["2024-08-08"]
    assert not (tmp_path / files[0].relative_path).exists()


def test_checksum_mismatch_fails_only_that_file(served, tmp_path, sample_dir):
    bad = ArchiveFile("BTCUSDT", "trades", "2024-08-09")
    served.add(bad, (sample_dir / BTC.name).read_bytes(), checksum_of=b"something else")
    result = download_archive([bad, ETH], tmp_path, _cfg(served))
    assert not result.ok
    assert [o.file for o in result.failed] == [bad]
    assert "checksum mismatch" in result.failed[0].message
    assert [o.file for o in result.downloaded] == [ETH]
    local = tmp_path / bad.relative_path
    assert not local.exists()
    assert not local.with_name(local.name + ".part").exists()


def test_monthly_urls(archive, tmp_path, sample_dir):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("BTCUSDT-aggTrades-2026-01.csv", b"1,2.0,3.0,4,4,1767225600039409,True,True\n")
    month = ArchiveFile("BTCUSDT", "aggTrades", "2026-01")
    archive.add(month, buffer.getvalue())
    files = plan_files(["btcusdt"], "aggTrades", "2025-12", "2026-01")
    result = download_archive(files, tmp_path, _cfg(archive))
    assert [o.status for o in result.outcomes] == ["missing", "downloaded"]
    assert (
        archive.hits(".zip")[0][0]
        == "/data/spot/monthly/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2026-01.zip"
    )
    assert read_trades(result.zips()[0])["kind"][0] == "aggTrades"


def test_archive_periods():
    assert archive_periods("2023-11", "2024-02", daily=False) == [
        "2023-11",
        "2023-12",
        "2024-01",
        "2024-02",
    ]
    february = archive_periods("2024-02", "2024-02", daily=True)
    assert len(february) == 29 and february[0] == "2024-02-01" and february[-1] == "2024-02-29"
    assert archive_periods("2024-01-30", "2024-02-01", daily=True) == [
        "2024-01-30",
        "2024-01-31",
        "2024-02-01",
    ]
    with pytest.raises(ConfigError):
        archive_periods("2024-03", "2024-01", daily=False)
    with pytest.raises(ConfigError):
        archive_periods("2024-01-05", "2024-02", daily=False)
    with pytest.raises(ConfigError):
        archive_periods("2024-13", "2024-14", daily=False)


def test_download_cli_summary_and_exit_code(served, tmp_path, sample_dir, capsys):
    bad = ArchiveFile("ETHUSDT", "trades", "2024-08-09")
    served.add(bad, b"not the real bytes", checksum_of=b"other")
    args = ["download", "--symbols", "BTCUSDT,ETHUSDT", "--kind", "trades", "--daily",
            "--start", "2024-08-08", "--end", "2024-08-09", "--out", str(tmp_path),
            "--base-url", served.base_url, "--workers", "3", "--retries", "0"]  # fmt: skip
    code = main(args)
    captured = capsys.readouterr()
    assert code != 0
    assert "2 downloaded, 0 already there, 1 missing, 1 failed" in captured.out
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and "checksum mismatch" in err_lines[0]
    assert "Traceback" not in captured.err
    assert (tmp_path / BTC.relative_path).is_file()
    assert not (tmp_path / bad.relative_path).exists()

    served.files.pop("/data/" + bad.relative_path)
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "0 downloaded, 2 already there, 2 missing, 0 failed" in captured.out


def test_usdm_futures_download_mirrors_futures_layout_with_checksums(archive, tmp_path, sample_dir):
    """`download --market um` fetches futures/um/daily/trades/..., verifies its checksum like
    spot, keeps it apart from the spot file of the same name, and the reader sees futures."""
    from mega_trading.data.bundled import bundled_dir

    um_file = ArchiveFile("BTCUSDT", "trades", "2024-07-19", market="um")
    spot_file = ArchiveFile("BTCUSDT", "trades", "2024-07-19")
    archive.add(um_file, (bundled_dir("demo") / "um" / um_file.name).read_bytes())
    archive.add(spot_file, (sample_dir / "BTCUSDT-trades-2025-01-01.zip").read_bytes())
    bad = ArchiveFile("ETHUSDT", "trades", "2024-07-19", market="um")
    archive.add(bad, b"corrupted in transit", checksum_of=b"the real bytes")
    args = ["download", "--symbols", "BTCUSDT,ETHUSDT", "--market", "um", "--daily",
            "--start", "2024-07-19", "--end", "2024-07-19", "--out", str(tmp_path),
            "--base-url", archive.base_url, "--retries", "0"]  # fmt: skip
    assert main(args) != 0  # the corrupted ETHUSDT file fails its checksum
    assert um_file.relative_path == "futures/um/daily/trades/BTCUSDT/BTCUSDT-trades-2024-07-19.zip"
    assert archive.hits(".zip")[0][0].startswith("/data/futures/um/daily/trades/")
    assert not any(path.startswith("/data/spot/") for path, _ in archive.requests)
    local = tmp_path / um_file.relative_path
    assert read_trades(local)["market"][0] == "um"
    assert not (tmp_path / bad.relative_path).exists()
    result = download_archive([spot_file], tmp_path, _cfg(archive))
    assert result.ok and read_trades(result.zips()[0])["market"][0] == "spot"
    assert result.zips()[0] != local and local.is_file()
    with pytest.raises(ConfigError):
        plan_files(["BTCUSDT"], "aggTrades", "2024-07", "2024-07", market="um")
