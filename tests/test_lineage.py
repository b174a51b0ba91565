"""Atomic writes: artifacts get the mode open() / mkdir() would give them under the umask."""

from __future__ import annotations

import os
import stat

import pytest

from mega_trading.core import lineage
from mega_trading.core.lineage import atomic_dir, current_umask, write_json_atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (pytest-xdist workers are separate processes)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_artifacts_and_data_dirs_follow_the_umask(umask, tmp_path, mask):
    umask(mask)
    assert current_umask() == mask
    report = write_json_atomic(tmp_path / "run" / "backtest.json", {"nll": 4.1})
    with open(tmp_path / "plain.json", "w") as handle:  # what the user's own files get
        handle.write("{}")
    assert mode(report) == 0o666 & ~mask == mode(tmp_path / "plain.json")
    with atomic_dir(tmp_path / "data") as building:
        (building / "manifest.json").write_text("{}")
    os.mkdir(tmp_path / "plain_dir")
    assert mode(tmp_path / "data") == 0o777 & ~mask == mode(tmp_path / "plain_dir")
    with atomic_dir(tmp_path / "data") as building:  # replacing an existing folder too
        pass
    assert mode(tmp_path / "data") == 0o777 & ~mask


def test_the_umask_is_read_without_proc_too(umask, tmp_path, monkeypatch):
    monkeypatch.setattr(lineage, "_PROC_STATUS", tmp_path / "no-proc")
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # the round trip restored it
    assert mode(write_json_atomic(tmp_path / "facts.json", {})) == 0o640


def test_a_prepared_data_dir_and_its_files_follow_the_umask(tiny_data_dir):
    """The folders and files `prepare` leaves (it builds under atomic_dir)."""
    mask = current_umask()
    assert mode(tiny_data_dir) == 0o777 & ~mask
    assert mode(tiny_data_dir / "manifest.json") == 0o666 & ~mask
    assert mode(tiny_data_dir / "tokenizer.json") == 0o666 & ~mask
