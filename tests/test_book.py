"""`mega-trading book`: exact rebuild on real capture slices, gaps, resyncs and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mega_trading.book.build import check_document, rebuild_captures, write_book
from mega_trading.book.synthetic import synthetic_capture
from mega_trading.cli import main
from mega_trading.core.errors import DataError

CAPTURES = Path(__file__).parent / "data" / "captures"


@pytest.fixture(autouse=True, params=["native", "python"])
def book_engine(request, monkeypatch):
    """Every test here runs on both book paths (tests/test_book_native.py holds them to
    equal outputs; these hold each to the rules)."""
    from mega_trading.book.native_lib import ENGINE_ENV, native_error

    if request.param == "native" and native_error() is not None:
        pytest.skip(f"no native book path here: {native_error()}")
    monkeypatch.setenv(ENGINE_ENV, request.param)
    return request.param
SPOT_BTC = CAPTURES / "spot-BTCUSDT-20240808.gz"
UM_BTC = CAPTURES / "um-BTCUSDT-20240808.gz"
NEXO = [CAPTURES / "spot-NEXOUSDT-20240723.gz", CAPTURES / "spot-NEXOUSDT-20240724.gz"]


def lines_of(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines()


def write_capture(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return path


def independent_counts(paths: list[Path]) -> tuple[int, int]:
    """(bookTickers whose u is the final u of a diff newer than the files' first snapshot,
    diffs newer than that snapshot), counted without the rebuild's code."""
    snapshot_id, diff_ids, ticker_ids = None, set(), []
    for path in paths:
        for line in lines_of(path):
            doc = json.loads(line.split(b" ", 1)[1])
            if "lastUpdateId" in doc and snapshot_id is None:
                snapshot_id = doc["lastUpdateId"]
            elif "depth" in doc.get("stream", ""):
                diff_ids.add(doc["data"]["u"])
            elif "bookTicker" in doc.get("stream", ""):
                ticker_ids.append(doc["data"]["u"])
    return (sum(u in diff_ids and u >= snapshot_id for u in ticker_ids),
            sum(u > snapshot_id for u in diff_ids))


@pytest.mark.parametrize("paths", [[SPOT_BTC], [UM_BTC], NEXO], ids=["spot", "um", "nexo"])
def test_real_slices_match_every_checkable_bookticker(paths):
    check = check_document(rebuild_captures(paths))
    (book,) = check["books"].values()
    assert book["bookticker_mismatches"] == 0
    checkable, newer_diffs = independent_counts(paths)
    assert book["bookticker_checked"] == checkable > 20
    assert book["diffs_applied"] == newer_diffs and book["gaps"] == []
    assert book["crossed_after_diff"] == 0


def test_a_file_without_snapshot_continues_the_previous_in_time_order():
    forward = check_document(rebuild_captures(NEXO))["books"]["spot:NEXOUSDT"]
    backward = check_document(rebuild_captures(NEXO[::-1]))["books"]["spot:NEXOUSDT"]
    assert forward == backward
    only_first = check_document(rebuild_captures(NEXO[:1]))["books"]["spot:NEXOUSDT"]
    assert forward["bookticker_checked"] > only_first["bookticker_checked"]


def test_diffs_without_any_snapshot_are_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DataError, match="no usable snapshot"):
        check_document(rebuild_captures(NEXO[1:]))
    code = main(["book", str(NEXO[1]), "--out", str(tmp_path / "out"), "--no-facts"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable snapshot" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_outputs_and_level_changes_chain(tmp_path):
    check = write_book([SPOT_BTC, UM_BTC], tmp_path / "book")
    assert json.loads((tmp_path / "book" / "check.json").read_text())["bookticker_checked"] == (
        check["bookticker_checked"])
    events = pl.read_parquet(tmp_path / "book" / "book_events.parquet")
    top = pl.read_parquet(tmp_path / "book" / "top.parquet")
    trades = pl.read_parquet(tmp_path / "book" / "trades.parquet")
    assert {"time_ns", "side", "price", "distance_ticks", "distance_bps", "old_qty", "new_qty",
            "update_id"} <= set(events.columns)
    assert {"bid_px", "ask_px", "bid_depth_5", "ask_depth_10"} <= set(top.columns)
    assert trades.height > 100 and set(trades["symbol"]) == {"BTCUSDT"}
    # every change's old size is the previous new size of the same level (0 when new)
    chained = events.with_columns(
        pl.col("new_qty").shift(1).over("market", "side", "price").fill_null(0.0).alias("prev"))
    assert (chained["old_qty"] == chained["prev"]).all()
    assert (top["bid_px"] < top["ask_px"]).all()
    assert (top["bid_depth_10"] >= top["bid_depth_5"]).all()
    assert (top["bid_depth_5"] >= top["bid_qty"]).all()
    ticks = events.filter(pl.col("symbol") == "BTCUSDT", pl.col("market") == "spot")
    assert ((ticks["distance_ticks"] * 2).round() - ticks["distance_ticks"] * 2).abs().max() < 1e-6


@pytest.mark.parametrize("market", ["spot", "um"])
def test_a_skipped_diff_is_a_gap_resynced_at_the_next_snapshot(tmp_path, market):
    lines = synthetic_capture(300, market=market, snapshot_every=100, seed=3)
    snapshot_rows = [i for i, line in enumerate(lines) if b"lastUpdateId" in line]
    assert len(snapshot_rows) == 3
    cut = snapshot_rows[1] - 40          # a diff (line pairs: diff, ticker) before snapshot 2
    assert b"depthUpdate" in lines[cut]
    path = write_capture(tmp_path / f"{market}-BTCUSDT-20240808.gz", lines[:cut] + lines[cut + 1:])
    book = check_document(rebuild_captures([path]))["books"][f"{market}:BTCUSDT"]
    assert book["bookticker_mismatches"] == 0
    assert len(book["gaps"]) == 1 and book["gaps"][0]["reason"] == "sequence break"
    assert book["resyncs"] == 1 and book["gaps"][0]["resynced_at_ns"] is not None
    # the tickers of the 20 diffs between the gap and the snapshot are not trusted
    assert book["bookticker_checked"] == 300 - 20
    assert book["diffs_untrusted"] == 19


def test_bad_lines_are_counted_and_a_lost_diff_is_never_trusted(tmp_path):
    lines = lines_of(SPOT_BTC)
    diff_rows = [i for i, line in enumerate(lines) if b"depthUpdate" in line]
    garbled = lines[diff_rows[200]][:40]                     # a diff cut in the middle
    broken = lines[:diff_rows[200]] + [garbled, b"1723161255030314667 not json"] + (
        lines[diff_rows[200] + 1:])
    path = write_capture(tmp_path / SPOT_BTC.name, broken)
    check = check_document(rebuild_captures([path]))
    book = check["books"]["spot:BTCUSDT"]
    assert check["skipped_lines"]["line is not JSON"] == 2
    assert book["bookticker_mismatches"] == 0
    assert len(book["gaps"]) == 1 and book["gaps"][0]["resynced_at_ns"] is None
    clean = check_document(rebuild_captures([SPOT_BTC]))["books"]["spot:BTCUSDT"]
    # the diffs before the lost one that the clean run applied, and none after it
    assert book["diffs_applied"] == 200 - clean["diffs_untrusted"] - clean["diffs_stale"]
    assert book["bookticker_checked"] < clean["bookticker_checked"]


def test_truncated_gzip_keeps_the_lines_before_the_cut(tmp_path):
    data = SPOT_BTC.read_bytes()
    path = tmp_path / SPOT_BTC.name
    path.write_bytes(data[: len(data) // 2])
    check = check_document(rebuild_captures([path]))
    assert any("truncated" in reason for reason in check["skipped_lines"])
    full = check_document(rebuild_captures([SPOT_BTC]))
    assert 0 < check["diffs_applied"] < full["diffs_applied"]
    assert check["bookticker_mismatches"] == 0
    assert main(["book", str(path), "--out", str(tmp_path / "out"), "--no-facts"]) == 0


def _scaled_snapshot(line: bytes, factor: float) -> bytes:
    """The same snapshot at another symbol's price level (ETH at ~1/23 of BTC)."""
    stamp, body = line.split(b" ", 1)
    doc = json.loads(body)
    for side in ("bids", "asks"):
        doc[side] = [[f"{float(p) * factor:.2f}", q] for p, q in doc[side]]
    return stamp + b" " + json.dumps(doc).encode()


@pytest.mark.parametrize("path", [SPOT_BTC, UM_BTC], ids=["spot", "um"])
def test_a_snapshot_of_another_symbol_is_rejected(tmp_path, path):
    """USD-M update ids are shared across symbols, so only the prices can tell."""
    lines = lines_of(path)
    row = next(i for i, line in enumerate(lines) if b"lastUpdateId" in line)
    lines[row] = _scaled_snapshot(lines[row], 1 / 23)
    bad = write_capture(tmp_path / path.name, lines)
    rebuilt = rebuild_captures([bad])
    (builder,) = rebuilt.books.values()
    assert "another symbol" in builder.rejected_snapshots[0]["reason"]
    with pytest.raises(DataError, match="no usable snapshot"):
        check_document(rebuilt)


def test_a_foreign_first_line_snapshot_is_rolled_back(tmp_path):
    """No price seen before it: the book built on it is provisional until the first
    bookTicker contradicts it, then every row built on it is removed."""
    lines = synthetic_capture(200, snapshot_every=100, seed=5)
    lines[0] = _scaled_snapshot(lines[0], 1 / 23)
    path = write_capture(tmp_path / "spot-BTCUSDT-20240808.gz", lines)
    rebuilt = rebuild_captures([path])
    book = check_document(rebuilt)["books"]["spot:BTCUSDT"]
    assert len(book["rejected_snapshots"]) == 1
    assert book["bookticker_mismatches"] == 0 and book["bookticker_checked"] == 100
    second_snapshot_ns = int(lines[[i for i, x in enumerate(lines) if b"lastUpdateId" in x][1]]
                             .split(b" ")[0])
    assert min(rebuilt.books["spot:BTCUSDT"].events.column("time_ns")) == second_snapshot_ns


def test_a_message_of_another_symbol_in_a_file_is_an_error(tmp_path):
    lines = lines_of(SPOT_BTC)
    lines[20] = lines[20].replace(b'"s":"BTCUSDT"', b'"s":"ETHUSDT"')
    path = write_capture(tmp_path / SPOT_BTC.name, lines)
    with pytest.raises(DataError, match="ETHUSDT message in a BTCUSDT capture"):
        rebuild_captures([path])


def test_book_facts_carry_a_noise_floor_and_flag_a_one_tick_spread(tmp_path):
    from mega_trading.book.facts import FACTS_NAME

    out = tmp_path / "book"
    assert main(["book", str(SPOT_BTC), *map(str, NEXO), "--out", str(out)]) == 0
    facts = json.loads((out / FACTS_NAME).read_text())
    btc, nexo = facts["books"]["spot:BTCUSDT"], facts["books"]["spot:NEXOUSDT"]
    share = btc["spread_ticks"]["share_one_tick"]
    assert share["ci95"][0] <= share["value"] <= share["ci95"][1]
    assert share["half_gap"] == pytest.approx(abs(share["first_half"] - share["second_half"]))
    assert any("one tick" in w for w in btc["warnings"])          # BTC: tick-bound spread
    assert nexo["spread_ticks"]["p90"] > 1                        # NEXO: a wider, thin book
    assert nexo["ofi"]["slope_same_interval_ticks_per_qty"]["value"] > 0   # buying lifts mid
    assert btc["cancel_to_trade"]["level_decreases"] > btc["cancel_to_trade"]["trades"]
    assert btc["resilience"]["touch_consuming_orders"] > 0


def test_report_shows_the_book_section_only_with_book_output(tmp_path):
    from mega_trading.report import build_report
    from tests.test_report import expected_text, parse, resolve

    run = tmp_path / "run"
    run.mkdir()
    assert "order-book" not in parse(build_report(run)).sections
    assert main(["book", str(SPOT_BTC), "--out", str(run / "book")]) == 0
    parser = parse(build_report(run))
    assert "order-book" in parser.sections
    docs = {"book_check": json.loads((run / "book" / "check.json").read_text()),
            "book_facts": json.loads((run / "book" / "book_facts.json").read_text())}
    keys = [(k, spec, text) for k, spec, text in parser.traced if k.split(":")[0] in docs]
    assert len(keys) > 50
    for key, spec, text in keys:
        artifact, key_path = key.split(":", 1)
        assert text == expected_text(resolve(docs[artifact], key_path), spec), key


def test_ofi_reads_no_mid_move_across_a_hole_between_runs():
    """Two 100 s runs a year apart (one book fed several captures): 99 moves in each run,
    none across the hole, and no bucket for the empty year."""
    from mega_trading.book.facts import order_flow_imbalance

    rng = np.random.default_rng(0)
    n = 400
    t_ns = np.arange(n, dtype=np.int64) * 250_000_000
    bid = 100 + 0.01 * np.cumsum(rng.integers(-1, 2, 2 * n))
    top = pl.DataFrame({"time_ns": np.r_[t_ns, t_ns + 365 * 86_400 * 10**9],
                        "bid_px": bid, "ask_px": bid + 0.01,
                        "bid_qty": rng.uniform(1, 2, 2 * n), "ask_qty": rng.uniform(1, 2, 2 * n)})
    ofi = order_flow_imbalance(top, tick=0.01)
    t_s = top["time_ns"].to_numpy()[1:] / 1e9               # e_n starts at the second row
    occupied = np.unique(np.floor(t_s - t_s[0]))
    per_run = [np.sum(occupied < 1e6), np.sum(occupied > 1e6)]
    assert per_run[0] >= 100 and per_run[1] >= 100
    assert ofi["intervals"] == (per_run[0] - 1) + (per_run[1] - 1)   # none across the hole
    assert ofi["slope_same_interval_ticks_per_qty"]["n"] == ofi["intervals"]


def test_a_snapshot_older_than_the_diffs_is_rejected_and_leaves_no_rows(tmp_path):
    """A resync snapshot whose next diff was lost: it cannot be bridged, so it is not used."""
    lines = synthetic_capture(200, snapshot_every=100, seed=7)
    rows = [i for i, line in enumerate(lines) if b"lastUpdateId" in line]
    assert b"depthUpdate" in lines[rows[1] + 1] and b"depthUpdate" in lines[rows[1] - 100]
    lost = {rows[1] - 100, rows[1] + 1}  # a diff half-way (the gap), the one after the snapshot
    moved = [line for i, line in enumerate(lines) if i not in lost]
    path = write_capture(tmp_path / "spot-BTCUSDT-20240808.gz", moved)
    rebuilt = rebuild_captures([path])
    book = check_document(rebuilt)["books"]["spot:BTCUSDT"]
    assert "older than the next diff" in book["rejected_snapshots"][0]["reason"]
    assert book["resyncs"] == 0 and book["gaps"][0]["resynced_at_ns"] is None
    assert book["bookticker_mismatches"] == 0
    snapshot_rows = sum(rebuilt.books["spot:BTCUSDT"].events.column("from_snapshot"))
    assert snapshot_rows == 400                    # the first snapshot's 200 + 200 levels only
