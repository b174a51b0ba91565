"""Read raw stream captures: gzip files of lines ``<local receive time> <json>``.

The format is the one hftbacktest's collector writes (and `mega-trading record`): one file
per symbol and UTC day, each line a combined-stream message (``{"stream": ..., "data":
...}``) or, without a ``stream`` key, a REST depth snapshot (``{"lastUpdateId": ...}``).
A snapshot carries no symbol: it belongs to its file's symbol, which is why files hold one
symbol each. Receive times are ns (µs in older ``.dat`` captures): the unit is detected
from the magnitude, never from a date.

A bad line is a counted, reported skip (`Skips`): the sequence checks downstream see the
hole it leaves in the update ids, so a skipped diff can never silently corrupt a book. A
truncated gzip keeps every complete line before the cut and is reported the same way.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
from isal import igzip_threaded, isal_zlib

from mega_trading.core.errors import DataError

MARKETS = ("spot", "um")
# <market>-<SYMBOL>-<YYYYMMDD>.gz (ours and the shared captures) or <symbol>_<YYYYMMDD>.gz
# (hftbacktest's collector).
_NAME_PATTERNS = (re.compile(r"^(spot|um)-([A-Za-z0-9]+)-(\d{8})"),
                  re.compile(r"^([A-Za-z0-9]+)_(\d{8})"))
_NS_THRESHOLD = 10**17  # a receive time above this is ns since 1970, below it µs

DIFF, TRADE, TICKER, SNAPSHOT = "diff", "trade", "ticker", "snapshot"
BLOCK_BYTES = 1 << 17  # small: a cut gzip loses the block being inflated
# Inflate in a background thread (ISA-L releases the GIL) while the caller scans: it
# overlaps when a core is free and costs a few % of CPU when none is (bench/book.py).
INFLATE_THREADS = 1
# A cut gzip (a crashed writer) ends in EOFError, a corrupt one in zlib's or ISA-L's error.
READ_ERRORS = (EOFError, zlib.error, isal_zlib.error, OSError)


@dataclasses.dataclass
class Skips:
    """Lines that were not used, by reason, with the first few places for the report."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class Message:
    kind: str        # DIFF, TRADE, TICKER or SNAPSHOT
    time_ns: int     # local receive time
    data: dict
    line: int        # 1-based line number in its file


def name_identity(path: Path) -> tuple[str | None, str | None]:
    """(market, SYMBOL) read from a capture's file name; None where the name does not say."""
    name = path.name
    match = _NAME_PATTERNS[0].match(name)
    if match:
        return match.group(1), match.group(2).upper()
    match = _NAME_PATTERNS[1].match(name)
    if match:
        return None, match.group(1).upper()
    return None, None


def sequence_continues(market: str, prev_u: int, first_id: int, prev_final_id: int) -> bool:
    """Binance's continuity rule for the next diff after one ending at `prev_u`.

    spot: the diff's first update id ``U`` must be ``prev_u + 1``; USD-M futures: the
    diff's ``pu`` (passed as `prev_final_id`) must equal ``prev_u``. Shared by the
    recorder (to know when to fetch a snapshot) and the rebuild.
    """
    if market == "um":
        return prev_final_id == prev_u
    return first_id == prev_u + 1


def _classify(doc: dict) -> str | None:
    stream = doc.get("stream")
    if stream is None:
        return SNAPSHOT if "lastUpdateId" in doc else None
    suffix = stream.split("@", 1)[1] if "@" in stream else ""
    if suffix.startswith("depth"):
        return DIFF
    if suffix == "trade":
        return TRADE
    if suffix == "bookTicker":
        return TICKER
    return None  # markPrice and other streams the book does not use


def capture_blocks(path: Path, threads: int | None = None) -> Iterator[tuple[bytes, int]]:
    """The decompressed file as (buffer, n) pairs whose first n bytes are whole lines (the
    file's last line may lack its newline). With `threads`=1 (default `INFLATE_THREADS`)
    ISA-L inflates in a thread while the caller works on the previous block. A
    decompression error (`READ_ERRORS`) is raised after the last whole line before it; the
    cut line is dropped. Both the Python reader and the native scanner read through here,
    so they see the same lines."""
    threads = INFLATE_THREADS if threads is None else threads
    try:
        handle = igzip_threaded.open(path, "rb", threads=threads, block_size=BLOCK_BYTES)
    except OSError as exc:
        raise DataError(f"cannot open capture: {exc}", path) from exc
    with handle:
        carry = b""
        while True:
            chunk = handle.read1(BLOCK_BYTES)
            if not chunk:
                if carry:
                    yield carry, len(carry)
                return
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n") + 1
            if cut:
                yield data, cut
            carry = data[cut:]


def truncation_reason(exc: BaseException, line_no: int) -> str:
    return f"truncated or corrupt gzip after line {line_no} ({exc.__class__.__name__})"


def capture_lines(path: Path) -> Iterator[bytes]:
    """The file's lines without their newline; raises a `READ_ERRORS` error at a cut."""
    for data, n in capture_blocks(path):
        lines = data[:n].split(b"\n")
        if data[n - 1:n] == b"\n":
            lines.pop()          # the empty piece after the block's final newline
        yield from lines


def decode_line(raw: bytes, decoder: msgspec.json.Decoder
                ) -> tuple[str | None, str | None, int | None, dict | None]:
    """One line: (kind, skip reason, receive stamp as written, data). kind is set when the
    line is a message the book uses (its stamp then fixes the file's time unit), the
    reason when the line is skipped; a classified line can still be skipped (no data)."""
    stamp, sep, body = raw.partition(b" ")
    if not sep or not stamp.isdigit():
        return None, "line without a receive time", None, None
    try:
        doc = decoder.decode(body)
    except msgspec.DecodeError:
        return None, "line is not JSON", None, None
    if not isinstance(doc, dict):
        return None, "line is not a JSON object", None, None
    kind = _classify(doc)
    if kind is None:
        return None, "stream not used by the book", None, None
    data = doc if kind == SNAPSHOT else doc.get("data")
    if not isinstance(data, dict):
        return kind, "message without a data object", int(stamp), None
    return kind, None, int(stamp), data


def time_scale(stamp: int) -> int:
    """ns per unit of a file's receive times, from its first message's stamp."""
    return 1 if stamp > _NS_THRESHOLD else 1000


def read_capture(path: Path, skips: Skips) -> Iterator[Message]:
    """The file's usable messages in file order; bad lines go to `skips`."""
    decoder = msgspec.json.Decoder()
    scale = None
    where = str(path)
    line_no = 0
    try:
        for raw in capture_lines(path):
            line_no += 1
            kind, reason, stamp, data = decode_line(raw, decoder)
            if kind is not None and scale is None:
                scale = time_scale(stamp)
            if reason is not None:
                skips.add(reason, f"{where}:{line_no}")
                continue
            yield Message(kind, stamp * scale, data, line_no)
    except READ_ERRORS as exc:
        # A cut gzip (a crashed writer): keep the lines before the cut, report the rest.
        skips.add(truncation_reason(exc, line_no), where)
