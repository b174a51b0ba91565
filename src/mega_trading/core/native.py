"""Compile C sources on first use, cache the shared object per machine, load it with ctypes.

One implementation for every hand-written C part of the project (the CPU kernels in
`model/kernels/`, the book's scanner and loop in `book/book_scan.c` + `book/book_state.c`);
it imports no torch.

The object is built by the system C compiler (``$CC``, else ``cc``, else ``gcc``) into
``$XDG_CACHE_HOME/mega_trading/kernels`` (else ``~/.cache/...``), under a name keyed by
every source and every header beside them, the flags, the compiler's version and the CPU
(model and feature flags: ``-march=native`` depends on them). It is written to a temporary
file in the cache directory and renamed into place, so a concurrent build or a killed one
never leaves a half-written library that another process could load.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

BUILD_TIMEOUT_S = 300


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mega_trading" / "kernels"


def machine_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    parts = [platform.machine()]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("model name", "flags", "Features")):
                parts.append(line)
                if line.startswith(("flags", "Features")):
                    break
    return "\n".join(parts)


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(source: Path | tuple[Path, ...], flags: tuple[str, ...], tag: str = "",
          compiler: str | None = None, name: str | None = None) -> ctypes.CDLL:
    """`source` (one C file, or several linked into one library) compiled with `flags` on
    this machine (once: then found in the cache), loaded. The file is named `name` (default:
    the first source's stem) plus `tag` (to tell builds apart by eye); `compiler` defaults
    to `find_compiler()`. Raises RuntimeError when no compiler is found or the build fails,
    OSError when the library cannot be loaded."""
    sources = (source,) if isinstance(source, Path) else tuple(source)
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True,
                             text=True, timeout=60).stdout
    # every source and the headers they may include: editing any of them rebuilds
    headers = sorted({h for s in sources for h in s.parent.glob("*.h")})
    key = hashlib.sha256("\0".join([*(f.read_text() for f in (*sources, *headers)), *flags,
                                    version, machine_fingerprint()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name or sources[0].stem}{tag}_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *flags, *map(str, sources), "-o", str(built), "-lm"]
            result = subprocess.run(command, check=False, capture_output=True, text=True,
                                    timeout=BUILD_TIMEOUT_S)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)  # atomic: a concurrent build just wins the race
    return ctypes.CDLL(str(target))


def load_error(load) -> str | None:
    """Why load() (a build and a dlopen) fails here, or None."""
    try:
        load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return str(error)
    return None
