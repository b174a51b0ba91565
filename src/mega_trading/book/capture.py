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
from isal import igzip

from mega_trading.errors import DataError

MARKETS = ("spot", "um")
# <market>-<SYMBOL>-<YYYYMMDD>.gz (ours and the shared captures) or <symbol>_<YYYYMMDD>.gz
# (hftbacktest's collector).
_NAME_PATTERNS = (re.compile(r"^(spot|um)-([A-Za-z0-9]+)-(\d{8})"),
                  re.compile(r"^([A-Za-z0-9]+)_(\d{8})"))
_NS_THRESHOLD = 10**17  # a receive time above this is ns since 1970, below it µs

DIFF, TRADE, TICKER, SNAPSHOT = "diff", "trade", "ticker", "snapshot"


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


def read_capture(path: Path, skips: Skips) -> Iterator[Message]:
    """The file's usable messages in file order; bad lines go to `skips`."""
    decoder = msgspec.json.Decoder()
    scale = None
    where = str(path)
    try:
        handle = igzip.open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open capture: {exc}", path) from exc
    line_no = 0
    with handle:
        try:
            for raw in handle:
                line_no += 1
                stamp, sep, body = raw.partition(b" ")
                if not sep or not stamp.isdigit():
                    skips.add("line without a receive time", f"{where}:{line_no}")
                    continue
                try:
                    doc = decoder.decode(body)
                except msgspec.DecodeError:
                    skips.add("line is not JSON", f"{where}:{line_no}")
                    continue
                if not isinstance(doc, dict):
                    skips.add("line is not a JSON object", f"{where}:{line_no}")
                    continue
                kind = _classify(doc)
                if kind is None:
                    skips.add("stream not used by the book", f"{where}:{line_no}")
                    continue
                stamp_int = int(stamp)
                if scale is None:
                    scale = 1 if stamp_int > _NS_THRESHOLD else 1000
                data = doc if kind == SNAPSHOT else doc.get("data")
                if not isinstance(data, dict):
                    skips.add("message without a data object", f"{where}:{line_no}")
                    continue
                yield Message(kind, stamp_int * scale, data, line_no)
        except (EOFError, zlib.error, OSError) as exc:
            # A cut gzip (a crashed writer): keep the lines before the cut, report the rest.
            skips.add(f"truncated or corrupt gzip after line {line_no} ({exc.__class__.__name__})",
                      where)
