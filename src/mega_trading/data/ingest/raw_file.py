"""One archive file as bytes, and what its first line says: the checksum against a Binance
`.CHECKSUM` sidecar, the zip's single CSV member (inflated by ISA-L), the header row if
any, and the layout (spot or USD-M futures, trades or aggTrades) the line implies.

Separate from parsing: this part only touches bytes and the first line, so it decides how
the file will be parsed before Polars sees it.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path

from isal import isal_zlib

from mega_trading.core.errors import DataError
from mega_trading.core.lineage import sha256_file
from mega_trading.data.ingest.schema import (
    AGG_TRADES_LAYOUT,
    FUTURES_TRADES_LAYOUT,
    HEADER_ALIASES,
    LAYOUTS,
    REQUIRED_COLUMNS,
    TRADES_LAYOUT,
)


def market_of_layout(first_line: str, header: tuple[str, ...] | None) -> str:
    """'um' for the futures trades layout (exactly its 6 columns, with or without the
    header row), 'spot' for everything else (7-column trades, aggTrades, other exports)."""
    if header is not None:
        return "um" if header == FUTURES_TRADES_LAYOUT else "spot"
    return "um" if first_line.count(",") + 1 == len(FUTURES_TRADES_LAYOUT) else "spot"


def wrong_market_message(found: str) -> str:
    if found == "um":
        return ("this is a USD-M futures file (6 columns, no is_best_match) but it is read as "
                "spot; use --market um")
    return ("this is a spot file (not the 6-column futures layout) but it is read as USD-M "
            "futures; use --market spot")


def verify_checksum(path: Path) -> str:
    """SHA-256 of `path`, checked against a Binance `<file>.CHECKSUM` beside it if any."""
    _check_is_file(path)
    digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".CHECKSUM")
    if sidecar.is_file():
        expected = (sidecar.read_text(errors="replace").split() or [""])[0].lower()
        if expected != digest:
            raise DataError(
                f"checksum mismatch: {sidecar.name} says {expected[:16]}…, "
                f"the file hashes to {digest[:16]}…",
                path,
            )
    return digest



def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise DataError("no such file", path)
    if not path.is_file():
        raise DataError("not a regular file (expected a CSV or zip)", path)


def read_csv_bytes(path: Path) -> bytes:
    _check_is_file(path)
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        data = _read_zip_member(path)
    else:
        data = path.read_bytes()
    if not data or data.isspace():  # (no .strip(): it would copy a large file)
        raise DataError("empty file", path)
    # A run of blank lines at the very end is harmless padding, not a malformed row.
    if data.endswith((b"\n\n", b"\r\n\r\n")):
        data = data.rstrip(b"\r\n") + b"\n"
    return data


def _read_zip_member(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise DataError(f"a Binance zip holds one CSV, this one holds {len(members)}", path)
            member = members[0]
            if member.compress_type != zipfile.ZIP_DEFLATED or member.flag_bits & 0x1:
                return archive.read(member)
            return _inflate_member(archive, member)
    except (zipfile.BadZipFile, zlib.error, isal_zlib.error, EOFError, OSError) as exc:
        raise DataError(f"truncated or corrupt zip ({exc})", path) from exc


def _inflate_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """A deflated member's bytes, inflated by ISA-L (about 2x faster than zlib, which
    `zipfile` uses, on the archive's monthly files) and checked against the zip's CRC-32
    and size, as `zipfile` checks them."""
    handle = archive.fp
    handle.seek(member.header_offset)
    local = handle.read(_LOCAL_HEADER.size)
    if len(local) != _LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local file header")
    name_len, extra_len = _LOCAL_HEADER.unpack(local)[-2:]
    handle.seek(member.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
    compressed = handle.read(member.compress_size)
    if len(compressed) != member.compress_size:
        raise EOFError(f"member {member.filename} is cut short")
    data = isal_zlib.decompress(compressed, -15, member.file_size or 1)
    if len(data) != member.file_size or isal_zlib.crc32(data) != member.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 or size for {member.filename}")
    return data


# Zip local file header: signature ... file name length, extra field length (APPNOTE 4.3.7).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def read_first_line(data: bytes) -> str:
    end = data.find(b"\n")
    line = data[: end if end >= 0 else len(data)]
    return line.rstrip(b"\r").decode("utf-8", errors="replace")


def parse_header(line: str, path: Path) -> tuple[str, ...] | None:
    """Column names if the first line is a header, None if it is already a data row."""
    fields = [f.strip() for f in line.split(",")]
    if not fields or _is_int(fields[0]):
        return None
    columns = []
    for field in fields:
        key = field.lower().replace("_", "").replace(" ", "")
        if key not in HEADER_ALIASES:
            raise DataError(f"unknown column '{field}' in the header", path, 1)
        columns.append(HEADER_ALIASES[key])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"the header lacks column(s) {', '.join(missing)}", path, 1)
    if len(set(columns)) != len(columns):
        raise DataError("the header names a column twice", path, 1)
    return tuple(columns)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def kind_from_width(line: str, path: Path) -> str:
    width = line.count(",") + 1
    for kind, layout in LAYOUTS.items():
        if width == len(layout):
            return kind
    raise DataError(
        f"expected {len(TRADES_LAYOUT)} fields (trades) or {len(AGG_TRADES_LAYOUT)} fields "
        f"(aggTrades), found {width}",
        path,
        1,
    )
