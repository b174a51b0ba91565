"""Lineage and safe writes shared by every stage: content hashes, git commit, atomic files.

Every artifact records what produced it; every write goes to a temp name first and is
renamed into place, so a crash never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mega_trading import __version__


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Key-sorted, compact JSON: equal content gives equal bytes, hence equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def json_hash(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj))


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the source tree (with '-dirty' when it has local changes), or 'unknown'."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5,
            check=False,
        )
        if commit.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=5, check=False,
        )
        dirty = "-dirty" if status.stdout.strip() else ""
        return commit.stdout.strip() + dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(**extra: Any) -> dict[str, Any]:
    """The block every artifact carries: who made it, when, from which code."""
    return {
        "package_version": __version__,
        "git_commit": git_commit(),
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


_UMASK_LOCK = threading.Lock()
_PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux reports it in /proc/self/status (since 4.7): a read, so no other thread can ever
    see a changed umask. Elsewhere the only API is os.umask's set-and-restore round trip;
    the lock keeps two of our own readers from interleaving (which could leave a wrong umask
    set), and the window in which another thread's open() could see the temporary 0o077 is a
    few instructions wide and at worst makes that one file private, never more open.
    """
    try:
        with open(_PROC_STATUS) as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _apply_umask(path: Path, full_mode: int) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; give the mode open() / mkdir() would have."""
    os.chmod(path, full_mode & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _apply_umask(tmp, 0o666)
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a whole directory under a temp name, then swap it into place.

    A failed run leaves no half-written directory that looks complete: readers only ever
    see the old directory or the new, finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _apply_umask(tmp, 0o777)
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
