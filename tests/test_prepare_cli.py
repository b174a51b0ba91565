"""`mega-trading prepare` end to end: the bundled sample by default, one-line errors."""

from __future__ import annotations

import json

from mega_trading.cli import main


def test_prepare_defaults_to_the_bundled_sample(tmp_path, capsys):
    out = tmp_path / "data"
    code = main(["prepare", "--out", str(out), "--block-size", "64", "--stride", "32", "--workers", "1",
                 "--set", "tokenizer.size_bins=6"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["shards"]["train"]) == {"BTCUSDT", "ETHUSDT"}
    assert manifest["config"]["tokenizer"]["size_bins"] == 6
    assert "effective vocab" in capsys.readouterr().out


def test_prepare_bad_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "ETHUSDT-trades-2024-08-08.csv"
    bad.write_text("1,2683.8,0.002,5.3676,1723161255611,True,True\n2,2683.8,oops,5.3,1723161255612,True,True\n")
    code = main(["prepare", str(bad), "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert "ETHUSDT-trades-2024-08-08.csv:2" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()


def test_prepare_unknown_override_is_an_error(tmp_path, capsys):
    code = main(["prepare", "--out", str(tmp_path / "o"), "--set", "tokenizer.nope=3"])
    assert code != 0 and "tokenizer.nope" in capsys.readouterr().err
