"""The notebook API (mega_trading.load_run): the README's example runs as written, and each
method gives what its command gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import mega_trading
from mega_trading.core.config import apply_overrides
from mega_trading.core.errors import DataError
from mega_trading.eval.backtest import run_backtest
from mega_trading.train.config import TrainConfig
from mega_trading.train.loop import train

README = Path(__file__).parent.parent / "README.md"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1",
        "model.ffn_hidden=64", "batch_size=4", "warmup_steps=2", "eval_every=5",
        "eval_batches=1", "ckpt_every=5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data_dir) -> Path:
    run = tmp_path_factory.mktemp("api") / "run"
    train(tiny_data_dir, run, apply_overrides(TrainConfig(steps=5, tracking="none"), TINY),
          log=lambda _: None)
    return run


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(run_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    assert scope["scores"]["model"]["n_scored"] > 0
    assert scope["trades"]["rollout"].n_unique() == 4
    assert set(scope["result"]["policies"]) == {"twap", "immediate"}
    assert not (run_dir / "backtest.json").exists()  # the API wrote nothing into the run
    assert "bits" not in capsys.readouterr().err


def test_methods_give_what_the_commands_give(run_dir, tiny_data_dir, tmp_path):
    run = mega_trading.load_run(run_dir)
    assert run.data_dir == tiny_data_dir and run.model.cfg.vocab_size == run.tokenizer.vocab_size
    scores = run.score(max_tokens=400)
    command = run_backtest(run_dir, tiny_data_dir, max_tokens=400, out=tmp_path / "bt.json")
    for doc in (scores, command):
        doc.pop("lineage"), doc.pop("timing_s")
    assert json.dumps(scores, sort_keys=True) == json.dumps(command, sort_keys=True)
    first = run.generate(n=2, length=16, seed=3)
    assert first.equals(run.generate(n=2, length=16, seed=3))
    assert not first.equals(run.generate(n=2, length=16, seed=4))


def test_bad_run_folders_and_keys_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(DataError, match="not a run folder"):
        mega_trading.load_run(tmp_path)
    run = mega_trading.load_run(run_dir)
    with pytest.raises(Exception, match="stepz|unknown"):
        run.score(stepz=1)
