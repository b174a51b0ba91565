"""`mega-trading ingest` end to end: summaries, one-line errors, nothing written lost."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from mega_trading.cli import main
from mega_trading.data.ingest.partitions import list_partitions, read_partitions

ROWS = [
    "11,100.0,0.5,50.0,1700000000000,True,True",
    "12,101.0,0.5,50.5,1700000000001,False,True",
    "13,102.0,0.5,51.0,1700000000002,True,False",
]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _zip_of(path: Path, text: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(path.with_suffix(".csv").name, text)
    return path


def test_ingest_sample_prints_units_and_gaps(tmp_path, sample_dir, capsys):
    gappy = tmp_path / "ETHUSDT-trades-2024-08-09.csv"
    with zipfile.ZipFile(sample_dir / "ETHUSDT-trades-2024-08-08.zip") as archive:
        lines = archive.read(archive.namelist()[0]).decode().splitlines()
    # shift the ids so they do not overlap the real 08-08 file, then drop three rows
    shifted = [",".join([str(int(r.split(",")[0]) + 10**6)] + r.split(",")[1:]) for r in lines]
    gappy.write_text("\n".join(shifted[:50] + shifted[53:]) + "\n")
    out = tmp_path / "parts"
    code = main(["ingest", str(sample_dir), str(gappy), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "BTCUSDT-trades-2024-08-08.zip" in captured.out
    assert "time in ms" in captured.out and "time in µs" in captured.out
    assert "1 gap(s), 3 missing id(s)" in captured.out
    assert "ingested 6 file(s)" in captured.out
    assert len(list_partitions(out)) == 6
    assert read_partitions(out, symbols=["ETHUSDT"]).height == 2 * len(lines) - 3


def test_ingest_rerun_writes_nothing_new(tmp_path, sample_trade_zips, capsys):
    out = tmp_path / "parts"
    assert main(["ingest", *map(str, sample_trade_zips), "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["ingest", *map(str, sample_trade_zips), "--out", str(out)]) == 0
    assert "0 new / 1 part(s)" in capsys.readouterr().out
    assert _snapshot(out) == before


def _bad_inputs(tmp_path: Path, sample_dir: Path) -> dict[str, tuple[Path, int | None]]:
    """Each bad input and the CSV line its error must name (None: no line)."""
    d = tmp_path / "bad"
    d.mkdir()
    sample = (sample_dir / "BTCUSDT-trades-2025-01-01.zip").read_bytes()
    cases: dict[str, tuple[Path, int | None]] = {}

    truncated = d / "BTCUSDT-trades-2023-11-01.zip"
    truncated.write_bytes(sample[:1000])
    cases["truncated zip"] = (truncated, None)

    mismatch = d / "BTCUSDT-trades-2023-11-02.zip"
    mismatch.write_bytes(sample)
    (d / (mismatch.name + ".CHECKSUM")).write_text(f"{'ab' * 32}  {mismatch.name}\n")
    cases["checksum mismatch"] = (mismatch, None)

    malformed = d / "BTCUSDT-trades-2023-11-03.csv"
    malformed.write_text("\n".join([ROWS[0], ROWS[1], "13,1.0,oops,1,1700000000002,True,True"]))
    cases["malformed row"] = (malformed, 3)

    empty = _zip_of(d / "BTCUSDT-trades-2023-11-04.zip", "")
    cases["empty file"] = (empty, None)

    backwards = d / "BTCUSDT-trades-2023-11-05.csv"
    backwards.write_text("\n".join([ROWS[0], "12,101.0,0.5,50.5,1600000000001,False,True"]))
    cases["non-monotonic time"] = (backwards, 2)

    dup = d / "BTCUSDT-trades-2023-11-06.csv"
    dup.write_text("\n".join([ROWS[0], ROWS[1], ROWS[1].replace("101.0", "101.5")]) + "\n")
    cases["duplicate ids"] = (dup, 3)

    two = d / "two-symbols.csv"
    header = "symbol,id,price,qty,quote_qty,time,is_buyer_maker,is_best_match"
    two.write_text("\n".join([header, "BTCUSDT," + ROWS[0], "ETHUSDT," + ROWS[1]]) + "\n")
    cases["two symbols"] = (two, 3)

    cases["missing path"] = (d / "BTCUSDT-trades-2023-11-07.zip", None)
    return cases


def test_every_bad_input_is_one_line_naming_the_file(tmp_path, sample_dir, capsys):
    out = tmp_path / "parts"
    assert (
        main(["ingest", str(sample_dir / "BTCUSDT-trades-2024-08-08.zip"), "--out", str(out)]) == 0
    )
    before = _snapshot(out)
    assert before
    for case, (path, line) in _bad_inputs(tmp_path, sample_dir).items():
        capsys.readouterr()
        code = main(["ingest", str(path), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code != 0, case
        assert "Traceback" not in err, case
        assert len(err.splitlines()) == 1, (case, err)
        assert err.startswith("error:"), (case, err)
        where = f"{path}:{line}:" if line is not None else f"{path}:"
        assert where in err, (case, err)
        assert _snapshot(out) == before, case


def test_failing_file_after_good_ones_keeps_earlier_partitions(tmp_path, sample_dir, capsys):
    out = tmp_path / "parts"
    bad = tmp_path / "BTCUSDT-trades-2099-01-01.csv"
    bad.write_text(ROWS[0] + "\n" + "x\n")
    good = sample_dir / "ETHUSDT-trades-2024-08-08.zip"
    code = main(["ingest", str(good), str(bad), "--out", str(out)])
    assert code != 0
    assert f"{bad}:2:" in capsys.readouterr().err
    assert read_partitions(out).height == 6106


def test_duplicate_trades_across_files_refused(tmp_path, sample_dir, capsys):
    out = tmp_path / "parts"
    source = sample_dir / "BTCUSDT-trades-2024-08-08.zip"
    assert main(["ingest", str(source), "--out", str(out)]) == 0
    before = _snapshot(out)
    copy = tmp_path / "BTCUSDT-trades-2024-08.csv"
    with zipfile.ZipFile(source) as archive:
        copy.write_bytes(archive.read(archive.namelist()[0])[:-200].rsplit(b"\n", 1)[0] + b"\n")
    code = main(["ingest", str(copy), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "overlap" in err and str(copy) in err
    assert _snapshot(out) == before


def test_symbol_flag_with_files_of_two_symbols_refused(tmp_path, sample_dir, capsys):
    files = [str(p) for p in sorted(sample_dir.glob("*-trades-2024-08-08.zip"))]
    code = main(["ingest", *files, "--out", str(tmp_path / "parts"), "--symbol", "BTCUSDT"])
    err = capsys.readouterr().err
    assert code != 0
    assert "BTCUSDT" in err and "ETHUSDT" in err
    assert not (tmp_path / "parts").exists()


@pytest.mark.parametrize("flag", ["--kind"])
def test_unknown_kind_flag(tmp_path, sample_trade_zips, capsys, flag):
    code = main(["ingest", str(sample_trade_zips[0]), "--out", str(tmp_path), flag, "klines"])
    assert code != 0
    assert "unknown kind" in capsys.readouterr().err
