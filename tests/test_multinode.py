"""Two "nodes" on one machine: `torchrun --nnodes 2 --nproc_per_node 1` with a c10d
rendezvous on 127.0.0.1, each node its own launcher process, as on two machines. The run
follows the single-process trajectory, and checkpoints move both ways between a multi-node
run and one process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from mega_trading.core.config import apply_overrides
from mega_trading.train.config import TrainConfig
from mega_trading.train.loop import train

# The single-process reference run and the tiny prepared data are test_distributed's fixtures.
from tests.test_distributed import (  # noqa: F401
    STEPS,
    TINY_ARGS,
    assert_same_trajectory,
    data_dir,
    single,
)

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*train_args: str) -> list[str]:
    """Start node 0 (hosts the c10d store) and node 1, wait for both; return their stderr."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc_per_node=1", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=mega-trading-test",
                   f"--rdzv_conf=is_host={int(node_rank == 0)}",
                   "-m", "mega_trading.cli", "train", *train_args]
        # Own process group per launcher: on a timeout the workers die with it.
        launchers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
    stderrs = []
    for launcher in launchers:
        try:
            _, stderr = launcher.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in launchers:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"two-node torchrun timed out:\n{launcher.communicate()[1][-3000:]}")
        assert launcher.returncode == 0, stderr[-3000:]
        stderrs.append(stderr)
    return stderrs


def test_two_nodes_match_one_process(tmp_path, data_dir, single):  # noqa: F811
    run = tmp_path / "two_nodes"
    node0, _ = two_nodes("--data", str(data_dir), "--out", str(run), "--steps", str(STEPS),
                         "--tracking", "none", *TINY_ARGS)
    assert "DDP x2" in node0
    assert_same_trajectory(run, single, range(1, STEPS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:06d}"


def test_one_process_checkpoint_resumes_on_two_nodes(tmp_path, single):  # noqa: F811
    run = tmp_path / "to_nodes"
    shutil.copytree(single, run)
    shutil.rmtree(run / "checkpoints" / "step_000006")  # as if stopped after step 3
    (run / "checkpoints" / "latest").write_text("step_000003\n")
    node0, _ = two_nodes("--out", str(run), "--resume")
    assert "resumed from checkpoint step 3" in node0
    assert_same_trajectory(run, single, range(1, STEPS + 1))


def test_two_node_checkpoint_resumes_in_one_process(tmp_path, data_dir, single):  # noqa: F811
    run = tmp_path / "from_nodes"
    two_nodes("--data", str(data_dir), "--out", str(run), "--steps", "3", "--tracking", "none",
              *TINY_ARGS)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    cfg = apply_overrides(TrainConfig(steps=STEPS, tracking="none"), TINY_ARGS)
    train(data_dir, run, cfg, resume=True, log=lambda _: None)
    assert_same_trajectory(run, single, range(1, STEPS + 1))
