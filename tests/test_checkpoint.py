"""Checkpoints: atomic folders, tied weights stored once, hash checks, pruning, exact resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mega_trading.core.config import to_dict
from mega_trading.core.errors import ArtifactMismatchError
from mega_trading.model import kernels
from mega_trading.model.checkpoint import (
    latest_step,
    list_checkpoints,
    load_checkpoint,
    load_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mega_trading.model.transformer import ModelConfig, Transformer
from mega_trading.train.config import TrainConfig
from mega_trading.train.loop import train
from mega_trading.train.optim import build_optimizer

TOKENIZER_HASH, MANIFEST_HASH = "a" * 64, "b" * 64


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=41, block_size=16, n_layer=1, n_head=2,
                                   n_kv_head=1, d_model=16, ffn_hidden=32))


def one_step(model, optimizer, seed: int = 0) -> float:
    x = torch.randint(0, 41, (2, 16), generator=torch.Generator().manual_seed(seed))
    loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 41), x.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def save(run, step, model, optimizer, keep_last=3):
    return save_checkpoint(run, step, model, optimizer, sampler_state={"rng": step},
                           config={"model": to_dict(model.cfg)}, tokenizer_hash=TOKENIZER_HASH,
                           manifest_hash=MANIFEST_HASH, keep_last=keep_last)


def test_checkpoint_folder_round_trips_without_pickle(tmp_path):
    from safetensors import safe_open

    model = tiny_model()
    optimizer = build_optimizer(model)
    one_step(model, optimizer)
    path = save(tmp_path, 7, model, optimizer)
    assert path.name == "step_000007"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.pt",
                                                      "state.json"]
    assert latest_step(tmp_path) == 7
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "tok_embeddings.weight" in keys and "output.weight" not in keys  # tied: stored once
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 7 and state["tokenizer_hash"] == TOKENIZER_HASH
    assert state["tied"] == {"output.weight": "tok_embeddings.weight"}
    assert state["git_commit"] and "created_utc" in state["provenance"]

    loaded, loaded_state = load_model(tmp_path, expect_tokenizer_hash=TOKENIZER_HASH,
                                      expect_manifest_hash=MANIFEST_HASH)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, 41, (2, 16))
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded_state["sampler"] == {"rng": 7}


def test_load_refuses_another_tokenizer_or_manifest(tmp_path):
    model = tiny_model()
    save(tmp_path, 1, model, build_optimizer(model))
    with pytest.raises(ArtifactMismatchError, match=f"{TOKENIZER_HASH}.*{'c' * 64}"):
        load_model(tmp_path, expect_tokenizer_hash="c" * 64)
    with pytest.raises(ArtifactMismatchError, match=f"manifest {MANIFEST_HASH}.*{'d' * 64}"):
        load_model(tmp_path, expect_tokenizer_hash=TOKENIZER_HASH, expect_manifest_hash="d" * 64)
    other = tiny_model()
    with pytest.raises(ArtifactMismatchError):
        load_checkpoint(tmp_path, other, build_optimizer(other), expect_manifest_hash="d" * 64)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer(model)
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert list_checkpoints(tmp_path) == [4, 5] and latest_step(tmp_path) == 5
    load_model(tmp_path, step=4)
    with pytest.raises(Exception, match="available: 4, 5"):
        load_model(tmp_path, step=2)


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    optimizer = build_optimizer(model)
    save(tmp_path, 1, model, optimizer)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, optimizer)
    assert latest_step(tmp_path) == 1 and list_checkpoints(tmp_path) == [1]
    # No half-written folder (not even a temp one) is left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]


def test_load_checkpoint_restores_optimizer_and_rngs(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer(model)
    one_step(model, optimizer, seed=1)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    save(tmp_path, 1, model, optimizer)
    expected = [one_step(model, optimizer, seed=s) for s in (2, 3)]
    draws = (torch.rand(3), np.random.rand(3), random.random())

    restored = tiny_model(seed=99)
    restored_optimizer = build_optimizer(restored)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    state = load_checkpoint(tmp_path, restored, restored_optimizer)
    assert state["step"] == 1
    assert [one_step(restored, restored_optimizer, seed=s) for s in (2, 3)] == expected
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


def test_rng_state_is_json(tmp_path):
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    first = torch.randn(4)
    set_rng_state(state)
    assert torch.equal(torch.randn(4), first)


# --- exact resume after SIGKILL ---------------------------------------------------------------

TINY_ARGS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1",
             "model.ffn_hidden=64", "block_size=32", "batch_size=8", "warmup_steps=5",
             "log_every=1", "eval_every=10", "eval_batches=2", "ckpt_every=5", "keep_last=2"]
STEPS = 40


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
    return tiny_data_dir


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mega_trading.cli", "train", *args]


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sigkill_right_after_a_checkpoint_then_resume_is_exact(tmp_path, data_dir):
    from mega_trading.core.config import apply_overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as the in-process run
    reference = tmp_path / "reference"
    cfg = apply_overrides(TrainConfig(steps=STEPS, tracking="none"), TINY_ARGS)
    train(data_dir, reference, cfg, log=lambda _: None)

    run = tmp_path / "killed"
    latest = run / "checkpoints" / "latest"
    args = ["--data", str(data_dir), "--out", str(run), "--steps", str(STEPS),
            "--tracking", "none", *TINY_ARGS]
    process = subprocess.Popen(cli(*args), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    killed_at = latest_step(run)
    assert killed_at is not None and killed_at < STEPS

    resumed = subprocess.run(cli("--out", str(run), "--resume"), env=env, capture_output=True,
                             text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint step {killed_at}" in resumed.stderr
    if kernels.attention_kernel_error(16) is None:  # head dim 16: our CPU attention kernel ran
        assert "CPU attention kernel on" in " ".join(resumed.stderr.split())
    expected, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    assert latest_step(run) == STEPS
