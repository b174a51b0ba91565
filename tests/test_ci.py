""".ci/run: the suite, then the kernel tests again from an empty kernel cache."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Stands in for the venv's pytest: logs its cache dir (and whether it started empty) and
# its arguments, prints a closing line; from an empty cache it exits with $FAKE_PYTEST_RC.
FAKE_PYTEST = """#!/usr/bin/env bash
cache="${XDG_CACHE_HOME:-unset}"
state=warm; [ -d "$cache" ] && [ -z "$(ls -A "$cache")" ] && state=empty
echo "$cache $state $*" >> "$CI_LOG"
echo "== 3 passed in 0.01s =="
[ "$state" = empty ] && exit "${FAKE_PYTEST_RC:-0}"
exit 0
"""
FAKE_MAKE = """#!/usr/bin/env bash
echo "make $*" >> "$CI_LOG"
XDG_CACHE_HOME="$HOME/.cache" .venv/bin/pytest -n 2 -q
"""


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def checkout(tmp_path) -> tuple[Path, dict]:
    """A copy of .ci/run in a fake checkout, with make, pytest and chromium stubbed."""
    repo, tools = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    tools.mkdir()
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    executable(repo / ".venv" / "bin" / "pytest", FAKE_PYTEST)
    executable(tools / "make", FAKE_MAKE)
    executable(tools / "chromium", "#!/bin/sh\n")
    (tmp_path / "home" / ".cache" / "mega_trading").mkdir(parents=True)  # a warm cache
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "CI_LOG": str(tmp_path / "ci.log"), "TMPDIR": str(tmp_path)}
    return repo, env


def run_ci(repo: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_ci_reruns_the_kernel_tests_from_an_empty_cache_and_ends_with_pytest(checkout):
    repo, env = checkout
    result = run_ci(repo, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "== 3 passed in 0.01s =="
    lines = Path(env["CI_LOG"]).read_text().splitlines()
    assert lines[0] == "make test"
    assert lines[1].endswith("-n 2 -q")  # the README's suite first
    cache, state, *args = lines[2].split()
    assert state == "empty" and cache != str(Path(env["HOME"]) / ".cache")
    assert {"tests/test_kernels.py", "tests/test_decode.py"} <= set(args)
    assert not Path(cache).exists()  # the throwaway cache is removed


def test_ci_fails_when_only_the_build_from_scratch_fails(checkout):
    repo, env = checkout
    result = run_ci(repo, {**env, "FAKE_PYTEST_RC": "1"})
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1] == "== 3 passed in 0.01s =="
