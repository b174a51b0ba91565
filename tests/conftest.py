"""Shared fixtures. Tests run on CPU, single-threaded torch, on the bundled real sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # never reach a server from tests


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    from mega_trading.data.bundled import sample_dir as _sample_dir

    return _sample_dir()


@pytest.fixture(scope="session")
def sample_trade_zips() -> list[Path]:
    from mega_trading.data.bundled import sample_files

    return sample_files("trades")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, sample_trade_zips) -> Path:
    """The bundled sample prepared with 32-token blocks: shared, read-only test data."""
    from mega_trading.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("tiny_data") / "data"
    prepare(sample_trade_zips, out, PrepareConfig(block_size=32, stride=16, workers=1))
    return out
