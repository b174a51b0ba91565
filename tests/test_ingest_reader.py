"""Reading Binance archive files into the canonical trade table, and Parquet partitions."""

from __future__ import annotations

import datetime as dt
import zipfile
from pathlib import Path

import polars as pl
import pytest

from mega_trading.core.errors import DataError
from mega_trading.data.ingest.canonical import validate_trades
from mega_trading.data.ingest.partitions import (
    ingest_files,
    list_partitions,
    read_partitions,
    scan_partitions,
    write_partitions,
)
from mega_trading.data.ingest.reader import read_trades, read_trades_with_report
from mega_trading.data.ingest.schema import CANONICAL_SCHEMA, parse_archive_name


def _sample(sample_dir: Path, name: str) -> Path:
    return sample_dir / name


def _csv_lines(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(archive.namelist()[0]).decode().splitlines()


def _utc(time_us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(time_us / 1e6, dt.UTC)


# --- the real sample ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, unit, day",
    [
        ("BTCUSDT-trades-2023-04-05.zip", "ms", dt.date(2023, 4, 5)),
        ("BTCUSDT-trades-2024-08-08.zip", "ms", dt.date(2024, 8, 8)),
        ("ETHUSDT-trades-2024-08-08.zip", "ms", dt.date(2024, 8, 8)),
        ("BTCUSDT-trades-2025-01-01.zip", "us", dt.date(2025, 1, 1)),
    ],
)
def test_time_unit_detected_per_file_gives_right_utc_dates(sample_dir, name, unit, day):
    frame, report = read_trades_with_report(sample_dir / name)
    assert report.time_unit == unit
    median_day = _utc(int(frame["time_us"].median())).date()
    assert median_day == day
    first_raw_time = int(_csv_lines(sample_dir / name)[0].split(",")[4])
    assert frame["time_us"][0] == first_raw_time * (1000 if unit == "ms" else 1)


def test_canonical_schema_sorted_and_symbol_from_name(sample_dir):
    frame = read_trades(sample_dir / "ETHUSDT-trades-2024-08-08.zip")
    assert dict(frame.schema) == CANONICAL_SCHEMA
    assert frame.height == len(_csv_lines(sample_dir / "ETHUSDT-trades-2024-08-08.zip"))
    assert frame["trade_id"].is_sorted()
    assert frame["symbol"].unique().to_list() == ["ETHUSDT"]
    assert frame["kind"].unique().to_list() == ["trades"]
    assert frame["first_trade_id"].null_count() == frame.height
    assert frame["quote_qty"].null_count() == 0


def test_is_buyer_maker_and_best_match_kept(sample_dir):
    path = sample_dir / "BTCUSDT-trades-2024-08-08.zip"
    raw = [line.split(",") for line in _csv_lines(path)]
    frame = read_trades(path)
    assert frame["is_buyer_maker"].to_list() == [r[5] == "True" for r in raw]
    assert frame["is_best_match"].to_list() == [r[6] == "True" for r in raw]
    # both sides occur in real data, so the column cannot be trivially constant
    assert 0 < frame["is_buyer_maker"].sum() < frame.height


def test_aggtrades_layout_and_computed_quote_qty(sample_dir):
    frame, report = read_trades_with_report(sample_dir / "BTCUSDT-aggTrades-2026-01-01.zip")
    assert report.kind == "aggTrades" and report.time_unit == "us"
    assert frame["kind"].unique().to_list() == ["aggTrades"]
    assert _utc(frame["time_us"][0]).date() == dt.date(2026, 1, 1)
    expected = frame["price"] * frame["qty_base"]
    assert (frame["quote_qty"] - expected).abs().max() < 1e-9
    assert frame["first_trade_id"].null_count() == 0
    assert (frame["last_trade_id"] >= frame["first_trade_id"]).all()


def test_gaps_reported_not_rejected(tmp_path, sample_dir):
    lines = _csv_lines(sample_dir / "BTCUSDT-trades-2024-08-08.zip")
    ids = [int(line.split(",")[0]) for line in lines]
    kept = lines[:100] + lines[105:2000] + lines[2001:]
    path = tmp_path / "BTCUSDT-trades-2024-08-08.csv"
    path.write_text("\n".join(kept) + "\n")
    frame, report = read_trades_with_report(path)
    assert frame.height == len(lines) - 6
    assert report.n_gaps == 2
    assert report.n_missing_ids == 6
    assert report.gaps[0] == (ids[99], ids[105])
    assert report.gaps[1] == (ids[1999], ids[2001])
    assert "2 gap(s)" in report.gap_summary()


def test_header_row_accepted_and_parsed_like_headerless(tmp_path, sample_dir):
    lines = _csv_lines(sample_dir / "BTCUSDT-trades-2025-01-01.zip")
    header = "id,price,qty,quote_qty,time,is_buyer_maker,is_best_match"
    path = tmp_path / "BTCUSDT-trades-2025-01-01.csv"
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    frame, report = read_trades_with_report(path)
    assert report.has_header
    assert frame.equals(read_trades(sample_dir / "BTCUSDT-trades-2025-01-01.zip"))


def test_same_trades_in_ms_and_us_give_same_time(tmp_path, sample_dir):
    lines = _csv_lines(sample_dir / "BTCUSDT-trades-2023-04-05.zip")
    as_us = []
    for line in lines:
        fields = line.split(",")
        fields[4] = str(int(fields[4]) * 1000)
        as_us.append(",".join(fields))
    path = tmp_path / "BTCUSDT-trades-2023-04-05.csv"
    path.write_text("\n".join(as_us) + "\n")
    frame_us, report = read_trades_with_report(path)
    assert report.time_unit == "us"
    frame_ms = read_trades(sample_dir / "BTCUSDT-trades-2023-04-05.zip")
    assert frame_us["time_us"].equals(frame_ms["time_us"])


def test_symbol_flag_and_unnamed_file(tmp_path, sample_dir):
    lines = _csv_lines(sample_dir / "BTCUSDT-trades-2025-01-01.zip")
    path = tmp_path / "export.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="symbol"):
        read_trades(path)
    frame = read_trades(path, symbol="btcusdt")
    assert frame["symbol"].unique().to_list() == ["BTCUSDT"]


def test_parse_archive_name():
    name = parse_archive_name("x/BTCUSDT-aggTrades-2024-01.zip")
    assert (name.symbol, name.kind, name.period) == ("BTCUSDT", "aggTrades", "2024-01")
    assert parse_archive_name("BTCUSDT-klines-2024-01.zip") is None


# --- bad input: one DataError naming the file and the line -------------------------------

GOOD = [
    "11,100.0,0.5,50.0,1700000000000,True,True",
    "12,101.0,0.5,50.5,1700000000001,False,True",
    "13,102.0,0.5,51.0,1700000000002,True,False",
    "14,103.0,0.5,51.5,1700000000003,False,True",
]


def _with_line(index: int, text: str) -> str:
    rows = list(GOOD)
    rows[index] = text
    return "\n".join(rows) + "\n"


BAD_FILES = {
    "non-numeric price": (_with_line(2, "13,abc,0.5,51.0,1700000000002,True,False"), 3, "price"),
    "missing field": (_with_line(1, "12,101.0,0.5,50.5,1700000000001,False"), 2, "fields"),
    "extra field": (_with_line(3, GOOD[3] + ",1"), 4, "fields"),
    "blank line": (_with_line(1, ""), 2, "empty line"),
    "bad boolean": (_with_line(3, "14,103.0,0.5,51.5,1700000000003,maybe,True"), 4, "true/false"),
    "negative price": (_with_line(2, "13,-1.0,0.5,51.0,1700000000002,True,False"), 3, "price"),
    "time backwards": (_with_line(2, "13,102.0,0.5,51.0,1699999999999,True,False"), 3, "backwards"),
    "duplicate id": (_with_line(2, "12,102.0,0.5,51.0,1700000000002,True,False"), 3, "duplicate"),
    "mixed time units": (_with_line(3, "14,1,1,1,1700000000003000,False,True"), 4, "unit"),
    "not a timestamp": (_with_line(0, "11,100.0,0.5,50.0,1700000,True,True"), 1, "timestamp"),
    "empty file": ("", None, "empty"),
    "header only": ("id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\n", None, "empty"),
    "header, blank lines": ("id,price,qty,quote_qty,time,is_buyer_maker,is_best_match\n \n\n",
                            None, "empty"),
    # A clean parse is trusted to hold a row per line: these must not vanish silently.
    "whitespace line": (_with_line(2, "   "), 3, "empty line"),
    "two blank lines": ("\n".join([*GOOD[:2], "", "", *GOOD[2:]]) + "\n", 3, "empty line"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_csv_is_a_data_error_naming_file_and_line(tmp_path, case):
    text, line, words = BAD_FILES[case]
    path = tmp_path / "BTCUSDT-trades-2023-11-14.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_trades(path)
    message = str(info.value)
    assert str(path) in message
    assert info.value.line == line
    if line is not None:
        assert f"{path}:{line}:" in message
    assert words in message
    assert "\n" not in message


def test_two_symbols_in_one_file(tmp_path):
    header = "symbol,id,price,qty,quote_qty,time,is_buyer_maker,is_best_match"
    rows = ["BTCUSDT," + GOOD[0], "BTCUSDT," + GOOD[1], "ETHUSDT," + GOOD[2]]
    path = tmp_path / "mixed.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"mixed\.csv:4: .*two symbols"):
        read_trades(path)
    path.write_text(header + "\n" + "\n".join(rows[:2]) + "\n")
    assert read_trades(path)["symbol"].unique().to_list() == ["BTCUSDT"]


def test_truncated_and_corrupt_zips(tmp_path, sample_dir):
    data = (sample_dir / "BTCUSDT-trades-2025-01-01.zip").read_bytes()
    truncated = tmp_path / "BTCUSDT-trades-2025-01-01.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt zip"):
        read_trades(truncated)
    corrupt = tmp_path / "BTCUSDT-trades-2025-01-02.zip"
    flipped = bytearray(data)
    flipped[200] ^= 0xFF  # inside the compressed CSV: a CRC / deflate error on read
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="BTCUSDT-trades-2025-01-02.zip"):
        read_trades(corrupt)


def test_zip_members_inflate_exactly_and_bad_crc_is_refused(tmp_path, sample_dir):
    """Deflated members are inflated by ISA-L and checked against the zip's CRC-32; a
    stored (uncompressed) member takes zipfile's own path. All read the same trades."""
    source = sample_dir / "BTCUSDT-trades-2025-01-01.zip"
    with zipfile.ZipFile(source) as zf:
        name = zf.namelist()[0]
        csv = zf.read(name)
    expected = read_trades(source)
    stored = tmp_path / "stored" / source.name
    stored.parent.mkdir()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(name, csv)
    assert read_trades(stored).equals(expected)
    bad_crc = tmp_path / "crc" / source.name
    bad_crc.parent.mkdir()
    with zipfile.ZipFile(bad_crc, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, csv)
    data = bytearray(bad_crc.read_bytes())
    crc = zipfile.ZipFile(bad_crc).infolist()[0].CRC.to_bytes(4, "little")
    at = data.rfind(crc)  # the central directory's copy, the one zipfile reads
    data[at:at + 4] = (int.from_bytes(crc, "little") ^ 1).to_bytes(4, "little")
    bad_crc.write_bytes(bytes(data))
    with pytest.raises(DataError, match="truncated or corrupt zip.*CRC"):
        read_trades(bad_crc)


def test_checksum_sidecar_mismatch(tmp_path, sample_dir):
    path = tmp_path / "BTCUSDT-trades-2025-01-01.zip"
    path.write_bytes((sample_dir / path.name).read_bytes())
    (tmp_path / (path.name + ".CHECKSUM")).write_text(f"{'0' * 64}  {path.name}\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        read_trades(path)
    (tmp_path / (path.name + ".CHECKSUM")).write_text(
        (sample_dir / (path.name + ".CHECKSUM")).read_text()
    )
    assert read_trades(path).height == 210


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_trades(tmp_path / "BTCUSDT-trades-2024-01-01.zip")


def test_validate_trades_rejects_two_symbols_in_one_table(sample_dir):
    both = pl.concat(
        [read_trades(p) for p in sorted(sample_dir.glob("*USDT-trades-2024-08-08.zip"))]
    )
    with pytest.raises(DataError, match="two symbols"):
        validate_trades(both, "combined")


# --- partitions ---------------------------------------------------------------------------


def test_partitions_round_trip_layout_and_idempotence(tmp_path, sample_dir, sample_trade_zips):
    out = tmp_path / "parts"
    frames = [read_trades(p) for p in sample_trade_zips]
    for frame in frames:
        write_partitions(frame, out)
    parts = list_partitions(out)
    layout = {str(p.parent.relative_to(out)) for p in parts}
    assert layout == {
        "kind=trades/symbol=BTCUSDT/month=2023-04",
        "kind=trades/symbol=BTCUSDT/month=2024-08",
        "kind=trades/symbol=BTCUSDT/month=2025-01",
        "kind=trades/symbol=ETHUSDT/month=2024-08",
    }
    assert all(p.name.startswith("part-") and len(p.stem) == len("part-") + 8 for p in parts)
    mtimes = {p: p.stat().st_mtime_ns for p in parts}
    again = [write_partitions(frame, out) for frame in frames]
    assert sorted(p for group in again for p in group) == sorted(parts)
    assert {p: p.stat().st_mtime_ns for p in list_partitions(out)} == mtimes
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet"]

    back = read_partitions(out, symbols=["BTCUSDT"])
    expected = pl.concat([f for f in frames if f["symbol"][0] == "BTCUSDT"]).sort("trade_id")
    assert back.equals(expected)
    assert dict(back.schema) == CANONICAL_SCHEMA
    lazy = scan_partitions(out, kinds=["trades"])
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.select(pl.len()).collect().item() == sum(f.height for f in frames)
    with pytest.raises(DataError, match="no trade partitions"):
        read_partitions(out, kinds=["aggTrades"])


def test_overlapping_trades_refused_and_existing_part_kept(tmp_path, sample_dir):
    out = tmp_path / "parts"
    frame = read_trades(sample_dir / "BTCUSDT-trades-2024-08-08.zip")
    (first,) = write_partitions(frame, out)
    before = first.read_bytes()
    with pytest.raises(DataError, match="overlap"):
        write_partitions(frame.slice(10, 100), out, source="other.zip")
    assert list_partitions(out) == [first]
    assert first.read_bytes() == before


def test_ingest_files_reports_written_parts(tmp_path, sample_trade_zips):
    out = tmp_path / "parts"
    results = ingest_files(sample_trade_zips, out)
    assert [len(r.written) for r in results] == [1, 1, 1, 1]
    assert {r.report.time_unit for r in results} == {"ms", "us"}
    rerun = ingest_files(sample_trade_zips, out)
    assert [len(r.written) for r in rerun] == [0, 0, 0, 0]
    assert [r.parts for r in rerun] == [r.parts for r in results]
    meta = pl.read_parquet_metadata(results[0].parts[0])
    assert results[0].report.source_sha256 in meta["mega_trading"]


def test_combined_frame_splits_into_the_same_parts(tmp_path, sample_trade_zips):
    frames = [read_trades(p) for p in sample_trade_zips]
    for frame in frames:
        write_partitions(frame, tmp_path / "one_by_one")
    combined = write_partitions(pl.concat(frames).sample(fraction=1.0, seed=1), tmp_path / "all")
    names = sorted(str(p.relative_to(tmp_path / "all")) for p in combined)
    expected = sorted(
        str(p.relative_to(tmp_path / "one_by_one"))
        for p in list_partitions(tmp_path / "one_by_one")
    )
    assert names == expected and len(names) == 4


@pytest.mark.parametrize(
    "case", ["non-numeric price", "missing field", "extra field", "blank line", "bad boolean"]
)
def test_both_bad_line_finders_agree(tmp_path, case):
    from mega_trading.data.ingest.csv_parse import _diagnose, _diagnose_by_splitting
    from mega_trading.data.ingest.schema import TRADES_LAYOUT

    text, line, _ = BAD_FILES[case]
    data = text.encode()
    path = tmp_path / "x.csv"
    fast = _diagnose(data, path, TRADES_LAYOUT, has_header=False)
    slow = _diagnose_by_splitting(data, path, TRADES_LAYOUT, has_header=False)
    assert fast is not None and slow is not None
    assert (fast.line, str(fast)) == (slow.line, str(slow)) == (line, str(fast))
