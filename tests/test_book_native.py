"""The book's native path (book/native*.py + book_scan.c / book_state.c) against the pure-Python path:
the same check.json and the same tables bit for bit, on real captures and on synthetic
ones full of gaps, resyncs and bad lines; the fallback without a compiler; the cache."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mega_trading.book import capture, native_lib, native_scan
from mega_trading.book.build import check_document, rebuild_captures, write_book
from mega_trading.book.synthetic import synthetic_capture
from mega_trading.cli import main
from mega_trading.core import native
from mega_trading.core.errors import ConfigError, DataError

CAPTURES = Path(__file__).parent / "data" / "captures"
SPOT_BTC = CAPTURES / "spot-BTCUSDT-20240808.gz"
UM_BTC = CAPTURES / "um-BTCUSDT-20240808.gz"
NEXO = [CAPTURES / "spot-NEXOUSDT-20240723.gz", CAPTURES / "spot-NEXOUSDT-20240724.gz"]
TABLES = ("book_events.parquet", "top.parquet", "trades.parquet")

needs_native = pytest.mark.skipif(native_lib.native_error() is not None,
                                  reason=f"no native book path here: {native_lib.native_error()}")


def lines_of(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines()


def write_capture(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return path


def both_paths(paths: list[Path], tmp: Path) -> dict:
    """write_book with each engine; asserts equal outputs; returns the check."""
    checks = {}
    for engine in ("python", "native"):
        out = tmp / f"out-{engine}"
        check = write_book(paths, out, engine)
        assert check["provenance"]["book_engine"] == engine
        checks[engine] = json.loads((out / "check.json").read_text())
        checks[engine].pop("provenance")
    assert checks["native"] == checks["python"]
    for table in TABLES:
        python = pl.read_parquet(tmp / "out-python" / table)
        ours = pl.read_parquet(tmp / "out-native" / table)
        assert ours.schema == python.schema, table
        assert ours.equals(python, null_equal=True), table
        # bit for bit, not just ==: -0.0 and NaN placement included
        for name, dtype in python.schema.items():
            if dtype == pl.Float64:
                a, b = python[name].to_numpy(), ours[name].to_numpy()
                assert a.tobytes() == b.tobytes(), (table, name)
    return checks["native"]


def both_rebuilds(paths: list[Path]):
    """(python check, native check) of rebuild_captures, or the errors each raised."""
    results = []
    for engine in ("python", "native"):
        try:
            results.append(check_document(rebuild_captures(paths, engine)))
        except DataError as error:
            results.append(f"DataError: {error}")
    return results


@needs_native
@pytest.mark.parametrize("paths", [[SPOT_BTC], [UM_BTC], NEXO, [SPOT_BTC, UM_BTC, *NEXO]],
                         ids=["spot", "um", "nexo", "all"])
def test_real_captures_give_the_same_outputs_bit_for_bit(tmp_path, paths):
    check = both_paths(paths, tmp_path)
    assert check["bookticker_checked"] > 20 and check["bookticker_mismatches"] == 0


@needs_native
@pytest.mark.parametrize("market", ["spot", "um"])
def test_gaps_and_resyncs_are_the_same(tmp_path, market):
    lines = synthetic_capture(400, market=market, snapshot_every=100, seed=11)
    snapshot_rows = [i for i, line in enumerate(lines) if b"lastUpdateId" in line]
    lost = {snapshot_rows[1] - 40, snapshot_rows[2] - 10, snapshot_rows[2] + 1}  # two gaps
    kept = [line for i, line in enumerate(lines) if i not in lost]
    check = both_paths([write_capture(tmp_path / f"{market}-BTCUSDT-20240808.gz", kept)],
                       tmp_path)
    assert len(check["gaps"]) == 2 and check["resyncs"] >= 1
    assert check["bookticker_mismatches"] == 0


@needs_native
def test_bad_lines_truncation_and_foreign_snapshots_are_the_same(tmp_path):
    lines = lines_of(SPOT_BTC)
    diffs = [i for i, line in enumerate(lines) if b"depthUpdate" in line]
    lines[diffs[100]] = lines[diffs[100]][:60]                    # a cut diff: not JSON
    lines.insert(diffs[50], b"1723161255030314667 not json")
    lines.insert(diffs[20], b"")                                   # no receive time
    lines.insert(diffs[10], b"garbage line")
    path = write_capture(tmp_path / SPOT_BTC.name, lines)
    check = both_paths([path], tmp_path / "bad")
    assert check["skipped_lines"]["line is not JSON"] == 2
    assert check["skipped_lines"]["line without a receive time"] == 2
    assert len(check["gaps"]) == 1

    data = SPOT_BTC.read_bytes()
    cut = tmp_path / "cut" / SPOT_BTC.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 2 // 3])
    check = both_paths([cut], tmp_path / "cut")
    assert any("truncated" in reason for reason in check["skipped_lines"])

    snapshot = next(i for i, line in enumerate(lines) if b"lastUpdateId" in line)
    stamp, body = lines[snapshot].split(b" ", 1)
    doc = json.loads(body)
    for side in ("bids", "asks"):
        doc[side] = [[f"{float(p) / 23:.2f}", q] for p, q in doc[side]]
    lines[snapshot] = stamp + b" " + json.dumps(doc).encode()
    (tmp_path / "foreign").mkdir()
    foreign = write_capture(tmp_path / "foreign" / SPOT_BTC.name, lines)
    python, ours = both_rebuilds([foreign])
    assert ours == python and "no usable snapshot" in ours


@needs_native
def test_a_foreign_first_snapshot_is_rolled_back_the_same(tmp_path):
    lines = synthetic_capture(200, snapshot_every=100, seed=5)
    stamp, body = lines[0].split(b" ", 1)
    doc = json.loads(body)
    for side in ("bids", "asks"):
        doc[side] = [[f"{float(p) / 23:.2f}", q] for p, q in doc[side]]
    lines[0] = stamp + b" " + json.dumps(doc).encode()
    check = both_paths([write_capture(tmp_path / "spot-BTCUSDT-20240808.gz", lines)], tmp_path)
    assert len(check["rejected_snapshots"]) == 1 and check["bookticker_checked"] == 100


@needs_native
def test_errors_are_the_same(tmp_path):
    python, ours = both_rebuilds(NEXO[1:])                             # no snapshot at all
    assert ours == python and "no usable snapshot" in ours
    lines = lines_of(SPOT_BTC)
    lines[20] = lines[20].replace(b'"s":"BTCUSDT"', b'"s":"ETHUSDT"')
    python, ours = both_rebuilds([write_capture(tmp_path / SPOT_BTC.name, lines)])
    assert ours == python and "ETHUSDT message in a BTCUSDT capture" in ours


def _mutations(line: bytes, rng: random.Random) -> bytes:
    """A line the scanner must hand to Python (or type exactly): same meaning or broken."""
    stamp, body = line.split(b" ", 1)
    doc = json.loads(body)
    data = doc.get("data", doc)
    choice = rng.randrange(12)
    if choice == 0:    # keys in another order: data before stream
        doc = dict(reversed(list(doc.items())))
    elif choice == 1:  # JSON numbers where Binance sends strings
        for key in ("p", "q", "b", "B", "a", "A"):
            if isinstance(data.get(key), str):
                data[key] = float(data[key])
    elif choice == 2:  # an escaped character in a string
        text = json.dumps(doc, separators=(",", ":")).replace('"s":', '"\\u0073":', 1)
        return stamp + b" " + text.encode()
    elif choice == 3:  # spaces everywhere
        return stamp + b" " + json.dumps(doc, indent=1).encode().replace(b"\n", b" ")
    elif choice == 4:  # exponents and odd decimals that float() reads
        for key in ("p", "q", "B", "A"):
            if isinstance(data.get(key), str):
                data[key] = f"{float(data[key]):.3e}"
    elif choice == 5:  # a field missing
        for key in ("p", "u", "lastUpdateId", "U"):
            data.pop(key, None)
    elif choice == 6:  # a repeated key (the last wins)
        text = json.dumps(doc, separators=(",", ":"))
        return stamp + b" " + text.replace('{"', '{"e":1,"e":2,"', 1).encode()
    elif choice == 7:  # very long decimals (more than 19 significant digits)
        for key in ("p", "q", "b", "B", "a", "A"):
            if isinstance(data.get(key), str):
                data[key] = data[key] + "000000000000000000001"
    elif choice == 8:  # a stream the book does not use
        if "stream" in doc:
            doc["stream"] = doc["stream"].split("@")[0] + "@markPrice"
    elif choice == 9:  # a leading zero in the receive time
        return b"0" + line
    elif choice == 10:  # trailing garbage
        return line + b" x"
    else:              # unicode in a string the book ignores
        doc["note"] = "caf\u00e9"
        return stamp + b" " + json.dumps(doc, ensure_ascii=False).encode()
    return stamp + b" " + json.dumps(doc, separators=(",", ":")).encode()


@needs_native
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lines_the_scanner_hands_back_are_read_like_python_reads_them(tmp_path, seed):
    rng = random.Random(seed)
    lines = lines_of(UM_BTC if seed == 1 else SPOT_BTC)
    start = next(i for i, line in enumerate(lines) if b"lastUpdateId" in line) + 1
    for i in rng.sample(range(start, len(lines)), 150):
        lines[i] = _mutations(lines[i], rng)
    name = (UM_BTC if seed == 1 else SPOT_BTC).name
    path = write_capture(tmp_path / name, lines)
    check = both_paths([path], tmp_path)
    assert sum(check["skipped_lines"].values()) > 0
    kinds = np.bincount(scanned_kinds(path), minlength=7)
    assert kinds[native_lib.K_PY] > 50 and kinds[native_lib.K_DIFF] > 100  # both ways used


def scanned_kinds(path: Path) -> np.ndarray:
    lib = native_lib.library()
    handle = lib.scan_new()
    try:
        data = gzip.decompress(path.read_bytes())
        lib.scan_feed(handle, data, len(data))
        return native_scan._Scan(lib, handle).records["kind"].copy()
    finally:
        lib.scan_free(handle)


@needs_native
def test_a_garbled_level_is_a_gap_not_a_traceback(tmp_path):
    lines = lines_of(SPOT_BTC)
    diffs = [i for i, line in enumerate(lines) if b"depthUpdate" in line]
    stamp, body = lines[diffs[150]].split(b" ", 1)
    doc = json.loads(body)
    side = "b" if doc["data"]["b"] else "a"
    doc["data"][side][0][0] = "618f0.68000000"
    lines[diffs[150]] = stamp + b" " + json.dumps(doc).encode()
    check = both_paths([write_capture(tmp_path / SPOT_BTC.name, lines)], tmp_path)
    assert [g["reason"] for g in check["gaps"]] == ["diff with a malformed level"]


@needs_native
@pytest.mark.parametrize("seed", [0, 1])
def test_randomly_corrupted_captures_give_the_same_result(tmp_path, seed):
    """Cut lines and stray bytes (quotes, brackets, digits, NUL, 0xFF) in every bundled
    capture: the same outputs, or the same one-line error."""
    rng = random.Random(seed)
    for path in sorted(CAPTURES.glob("*.gz")):
        lines = lines_of(path)
        for i, line in enumerate(lines):
            r = rng.random()
            if r < 0.01 and line:
                lines[i] = line[:rng.randrange(len(line))]
            elif r < 0.03 and line:
                j = rng.randrange(len(line))
                stray = bytes([rng.choice(b'{}[]",:0123456789.-eE \\tfu\x00\xff')])
                lines[i] = line[:j] + stray + line[j + 1:]
        out = tmp_path / path.stem
        out.mkdir()
        corrupted = write_capture(out / path.name, lines)
        try:
            both_paths([corrupted], out)
        except DataError as error:   # the Python path's: the native one must say the same
            with pytest.raises(DataError) as native_error:
                write_book([corrupted], out / "native-error", "native")
            assert str(native_error.value) == str(error)


@needs_native
def test_decimal_strings_become_the_floats_python_reads(tmp_path):
    """Prices of every length, through trades.parquet: float(s) bit for bit."""
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 10, (3000, 30))
    texts = []
    for k, row in enumerate(digits):
        n_int, n_frac = int(rng.integers(1, 12)), int(rng.integers(0, 26))
        text = "".join(map(str, row[:n_int])) + ("." + "".join(map(str, row[n_int:n_int + n_frac]))
                                                 if n_frac else "")
        texts.append(("-" if k % 7 == 0 else "") + text)
    texts += ["0.00000000", "-0.0", "9007199254740993", "0.1", "123456789012345678901234.5"]
    lines = synthetic_capture(5, seed=1)
    for k, text in enumerate(texts):
        trade = {"e": "trade", "s": "BTCUSDT", "t": k, "p": text, "q": text, "T": 1, "m": k % 2 == 0}
        lines.append(b"1723161253900000000 " + json.dumps(
            {"stream": "btcusdt@trade", "data": trade}).encode())
    both_paths([write_capture(tmp_path / "spot-BTCUSDT-20240808.gz", lines)], tmp_path)
    prices = pl.read_parquet(tmp_path / "out-native" / "trades.parquet")["price"].to_numpy()
    expected = np.array([float(t) for t in texts])
    assert prices[-len(texts):].tobytes() == expected.tobytes()


@needs_native
def test_files_named_without_their_market_hold_messages_until_one_tells(tmp_path):
    """hftbacktest's names (btcusdt_20240808.gz) say no market: trades are held until a
    diff (pu or not) tells it; a µs-stamped file is the same book in other units."""
    lines = lines_of(UM_BTC)
    first_diff = next(i for i, line in enumerate(lines) if b"depthUpdate" in line)
    trades = [line for line in lines[:first_diff] if b"@trade" in line][:3]
    micro = [line.split(b" ", 1)[0][:-3] + b" " + line.split(b" ", 1)[1]
             for line in trades + lines]
    check = both_paths([write_capture(tmp_path / "btcusdt_20240808.gz", micro)], tmp_path)
    assert check["bookticker_mismatches"] == 0 and list(check["books"]) == ["um:BTCUSDT"]


@needs_native
@pytest.mark.parametrize("scan_thread", [False, True], ids=["inline", "reader-thread"])
def test_small_blocks_with_and_without_the_reader_thread(monkeypatch, tmp_path, scan_thread):
    """Hundreds of blocks (lines cut across them, buffers recycled), a cut gzip and an
    error in the middle of a file: the same as the Python path, and no thread left."""
    import threading

    monkeypatch.setattr(native_scan, "SCAN_THREAD", scan_thread)
    monkeypatch.setattr(capture, "BLOCK_BYTES", 4096)
    check = both_paths([UM_BTC, *NEXO], tmp_path / "all")
    assert check["bookticker_mismatches"] == 0 and check["bookticker_checked"] > 400
    data = UM_BTC.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / UM_BTC.name).write_bytes(data[: len(data) // 2])
    check = both_paths([tmp_path / "cut" / UM_BTC.name], tmp_path / "cut")
    assert any("truncated" in reason for reason in check["skipped_lines"])
    lines = lines_of(SPOT_BTC)
    lines[-20] = lines[-20].replace(b'"s":"BTCUSDT"', b'"s":"ETHUSDT"')
    python, ours = both_rebuilds([write_capture(tmp_path / SPOT_BTC.name, lines)])
    assert ours == python and "ETHUSDT message in a BTCUSDT capture" in ours
    assert not [t for t in threading.enumerate() if t.name == "book-scan"]


def test_the_engine_is_chosen_by_option_then_environment(monkeypatch):
    monkeypatch.setenv(native_lib.ENGINE_ENV, "python")
    assert native_lib.resolve_engine() == ("python", None)
    assert rebuild_captures([SPOT_BTC]).engine == "python"
    with pytest.raises(ConfigError, match="not one of auto, native, python"):
        native_lib.resolve_engine("fortran")
    if native_lib.native_error() is None:
        assert native_lib.resolve_engine("native") == ("native", None)
        monkeypatch.setenv(native_lib.ENGINE_ENV, "auto")
        assert rebuild_captures([SPOT_BTC]).engine == "native"


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native_lib.library.cache_clear()
    native_lib.native_error.cache_clear()
    yield tmp_path
    native_lib.library.cache_clear()
    native_lib.native_error.cache_clear()


def test_without_a_compiler_auto_falls_back_to_python_and_native_refuses(no_compiler, capsys):
    tmp_path = no_compiler
    assert "no C compiler" in native_lib.native_error()
    engine, note = native_lib.resolve_engine("auto")
    assert engine == "python" and "no C compiler" in note
    check = write_book(NEXO, tmp_path / "out", "auto")
    assert check["provenance"]["book_engine"] == "python"
    assert "no C compiler" in check["provenance"]["book_engine_note"]
    assert check["bookticker_checked"] > 20 and check["bookticker_mismatches"] == 0
    code = main(["book", *map(str, NEXO), "--out", str(tmp_path / "cli"), "--no-facts"])
    assert code == 0 and "pure-Python path" in capsys.readouterr().err
    code = main(["book", *map(str, NEXO), "--out", str(tmp_path / "refused"), "--no-facts",
                 "--engine", "native"])
    err = capsys.readouterr().err
    assert code == 2 and "no C compiler" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "cache").exists()


@needs_native
def test_the_build_is_cached_and_written_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_lib.library.cache_clear()
    try:
        native_lib.library()
        built = list((tmp_path / "mega_trading" / "kernels").iterdir())
        assert [p.suffix for p in built] == [".so"] and built[0].name.startswith("book_native")
        mtime = built[0].stat().st_mtime_ns
        native_lib.library.cache_clear()
        native_lib.library()                     # found in the cache: not rebuilt
        assert built[0].stat().st_mtime_ns == mtime
        assert list((tmp_path / "mega_trading" / "kernels").iterdir()) == built
    finally:
        native_lib.library.cache_clear()



@needs_native
def test_editing_any_source_or_header_rebuilds(monkeypatch, tmp_path):
    """The library is two C files and two headers: each is in the cache key, so an edit to
    any one (a header included by one file only, too) builds a new library."""
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("book_scan.c", "book_state.c", "book_native.h", "book_json.h"):
        shutil.copy(native_lib.SOURCES[0].with_name(name), src / name)
    sources = tuple(src / p.name for p in native_lib.SOURCES)
    kernels = tmp_path / "cache" / "mega_trading" / "kernels"
    native.build(sources, native_lib.FLAGS, name=native_lib.LIBRARY_NAME)
    assert len(list(kernels.iterdir())) == 1
    for edited in ("book_json.h", "book_native.h", "book_state.c", "book_scan.c"):
        with open(src / edited, "a") as handle:
            handle.write("/* edited */\n")
        lib = native.build(sources, native_lib.FLAGS, name=native_lib.LIBRARY_NAME)
        assert lib.scan_record_size() > 0
    built = sorted(p.name for p in kernels.iterdir())
    assert len(built) == 5 and all(n.startswith("book_native_") for n in built)


def test_the_native_module_and_book_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, mega_trading.core.native, mega_trading.book.build, mega_trading.book.native,"
            " mega_trading.book.native_lib, mega_trading.book.native_scan;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
