"""`mega-trading train` under torchrun (2 CPU processes, gloo): DDP and FSDP2 follow the same
trajectory as one process with the same global batch, and a run resumes under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mega_trading.core.config import apply_overrides
from mega_trading.core.errors import ConfigError
from mega_trading.train.config import TrainConfig
from mega_trading.train.distributed import DistContext, mean_across_ranks, use_fsdp
from mega_trading.train.loop import train

# Newton-Schulz in float32: in bf16 (the default on CPUs with native bf16) a 1e-7 difference
# between the batch splits can flip one rounding and move the loss by ~1e-5 a few steps
# later, which would test luck, not DDP/FSDP. With float32 they agree within ~5e-7.
TINY_ARGS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1",
             "model.ffn_hidden=64", "block_size=16", "batch_size=4", "warmup_steps=2",
             "log_every=1", "eval_every=3", "eval_batches=2", "ckpt_every=3", "grad_accum=2",
             "muon_ns_dtype=float32"]
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_trade_zips):
    """The bundled sample prepared with 16-token blocks: block_size is the data's (one
    setting per run), and 16 keeps these multi-process runs short."""
    from mega_trading.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("ddp_data") / "data"
    prepare(sample_trade_zips, out, PrepareConfig(block_size=16, stride=16, workers=1))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("single") / "run"
    cfg = apply_overrides(TrainConfig(steps=STEPS, tracking="none"), TINY_ARGS)
    train(data_dir, run, cfg, log=lambda _: None)
    return run


def metrics(run) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mega_trading.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group: on a timeout the workers die with the launcher, not orphaned.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun timed out:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_same_trajectory(run, reference, steps) -> None:
    got, expected = metrics(run), metrics(reference)
    for step in steps:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-5), step
        if "val_loss" in expected[step]:
            assert got[step]["val_loss"] == pytest.approx(expected[step]["val_loss"], abs=1e-5)


def test_ddp_two_ranks_match_one_process(tmp_path, data_dir, single):
    run = tmp_path / "ddp"
    done = torchrun("--data", str(data_dir), "--out", str(run), "--steps", str(STEPS),
                    "--tracking", "none", *TINY_ARGS)
    assert "DDP x2" in done.stderr
    assert_same_trajectory(run, single, range(1, STEPS + 1))
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["windows_seen"] == json.loads((single / "train_summary.json").read_text())[
        "windows_seen"]
    # Rank 0 alone wrote the checkpoints; a DDP checkpoint resumes under FSDP2 (next test).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_000003", "step_000006"]


def test_fsdp2_resume_under_torchrun_continues_the_trajectory(tmp_path, data_dir, single):
    """Resume the single-process run's step-3 checkpoint with 2 FSDP2-sharded ranks."""
    run = tmp_path / "fsdp"
    shutil.copytree(single, run)
    shutil.rmtree(run / "checkpoints" / "step_000006")  # as if killed after step 3
    (run / "checkpoints" / "latest").write_text("step_000003\n")
    done = torchrun("--out", str(run), "--resume", "fsdp=true")
    assert "FSDP2 x2" in done.stderr and "resumed from checkpoint step 3" in done.stderr
    assert_same_trajectory(run, single, range(1, STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"


def test_fsdp_choice_and_rank_mean_alone():
    alone = DistContext()
    assert mean_across_ranks([1.5, 2.0], alone) == [1.5, 2.0]
    assert not use_fsdp("auto", alone, 10**9)  # one process: nothing to shard across
    gpus = DistContext(world_size=4, device=torch.device("cuda", 0), backend="nccl")
    assert use_fsdp("auto", gpus, 10**9) and not use_fsdp("auto", gpus, 10**6)
    assert not use_fsdp(False, gpus, 10**9)
    cpus = DistContext(world_size=2, backend="gloo")
    assert not use_fsdp("auto", cpus, 10**9) and use_fsdp(True, cpus, 10)
    with pytest.raises(ConfigError):
        use_fsdp(True, alone, 10)
