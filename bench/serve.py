"""Benchmark: requests/s and latency of the rollout service, batching on vs off.

Starts `mega-trading serve` as a subprocess on 127.0.0.1 (a free port; loopback only),
once with batching on and once with it off, and drives each with 1 and with 16
concurrent clients (httpx + asyncio), every request a different seed and prompt of the
same length. Each cell stops after `--requests` requests or `--max-seconds`, whichever
comes first, and the servers are stopped at the end, so the script ends by itself.

* batching on:  batch_window_ms=5, max_batch_requests=16, batch_rows=16
* batching off: batch_window_ms=0, max_batch_requests=1,  batch_rows=1 (one request at a
                time, each forward pass exactly its own row)

Without --run, a micro-preset run is trained for one step on the bundled sample in a
temporary folder (speed does not depend on the weights).

    .venv/bin/python bench/serve.py                      # micro, 64 requests per cell
    .venv/bin/python bench/serve.py --run RUN --data DIR --requests 200 --length 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = {
    "on": ["batch_window_ms=5", "max_batch_requests=16", "batch_rows=16"],
    "off": ["batch_window_ms=0", "max_batch_requests=1", "batch_rows=1"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="default: a fresh micro run")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--requests", type=int, default=64, help="requests per cell (max)")
    parser.add_argument("--max-seconds", type=float, default=45.0, help="time per cell (max)")
    parser.add_argument("--clients", default="1,16", help="concurrency levels")
    parser.add_argument("--length", type=int, default=32, help="new tokens per request")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def build_run(root: Path, preset: str) -> tuple[Path, Path]:
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.prepare import PrepareConfig, prepare
    from mega_trading.train.config import TrainConfig
    from mega_trading.train.loop import train

    data, run = root / "data", root / "run"
    prepare(sample_files("trades"), data, PrepareConfig(block_size=256, stride=128, workers=1))
    train(data, run, TrainConfig(preset=preset, steps=1, batch_size=2, warmup_steps=1,
                                 eval_every=0, eval_batches=1, tracking="none", device="cpu",
                                 compile=False), log=lambda message: None)
    return run, data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, data: Path | None, overrides: list[str], threads: int,
                 log_path: Path, cpus: set[int] | None = None) -> tuple[subprocess.Popen, str]:
    """The server in a child process (on ``cpus`` only, when given) -> (process, base URL)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "mega_trading.cli", "serve", "--run", str(run),
               "--host", "127.0.0.1", "--port", str(port)]
    if data is not None:
        command += ["--data", str(data)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log_file:  # the child keeps its own copy of the handle
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if cpus:  # at once, before the child starts its threads (they inherit the mask)
        os.sched_setaffinity(process.pid, cpus)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not come up in 120 s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def request_body(i: int, args: argparse.Namespace, vocab_events: int) -> dict:
    rng = np.random.default_rng(i)
    return {"tokens": rng.integers(0, vocab_events, args.prompt).tolist(), "n": 1,
            "length": args.length, "seed": i, "temperature": 1.0, "top_k": 16,
            **({"tick_support": True} if getattr(args, "tick_support", False) else {})}


def json_bytes(document: dict) -> bytes:
    return json.dumps(document).encode()


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, one connection per client:
    the load generator at its cheapest (httpx spends ~2 ms of CPU per request here, on the
    same cores as the server). Only what the rollout service answers: a Content-Length body."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, json: dict) -> int:
        """POST a JSON body; the status code (the body is read and dropped)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json_bytes(json)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                          + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
        await self.reader.readexactly(length)
        return int(head[0].split()[1])

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(base: str, clients: int, args: argparse.Namespace, vocab_events: int,
                client: str = "httpx") -> dict:
    """`clients` concurrent loops sharing a budget of requests and seconds; `client`:
    "httpx" (one AsyncClient, a pool of `clients` connections), "httpx-each" (an
    AsyncClient of one connection per client: httpx's pool scans all its connections for
    every request) or "raw" (`RawHTTP`). The clients are made before the clock starts."""
    import httpx

    if client == "raw":
        https = [RawHTTP(base) for _ in range(clients)]
    elif client == "httpx-each":
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        https = [httpx.AsyncClient(base_url=base, timeout=120, limits=one)
                 for _ in range(clients)]
    else:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        https = [httpx.AsyncClient(base_url=base, timeout=120, limits=limits)] * clients
    latencies: list[float] = []
    errors = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + args.max_seconds

    async def client_loop(http: httpx.AsyncClient | RawHTTP) -> None:
        nonlocal issued, errors
        while issued < args.requests and time.perf_counter() < deadline:
            body = request_body(issued, args, vocab_events)
            issued += 1
            sent = time.perf_counter()
            try:
                response = await http.post("/v1/rollouts", json=body)
                ok = (response if isinstance(http, RawHTTP) else response.status_code) == 200
            except (httpx.HTTPError, OSError, ValueError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1

    await asyncio.gather(*(client_loop(http) for http in https))
    elapsed = time.perf_counter() - start
    for http in set(https):
        await http.aclose()
    lat = np.asarray(latencies) * 1e3
    done = len(latencies)
    return {"clients": clients, "requests": done + errors, "ok": done, "errors": errors,
            "seconds": elapsed, "req_per_s": done / elapsed,
            "new_tok_per_s": done * args.length / elapsed,
            "p50_ms": float(np.percentile(lat, 50)) if done else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if done else float("nan")}


def table(rows: list[dict]) -> str:
    lines = ["| batching | clients | requests | errors | req/s | new tok/s | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                     f"{r['req_per_s']:.1f} | {r['new_tok_per_s']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import httpx

    args = parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        run, data = (args.run, args.data) if args.run else build_run(Path(tmp), args.preset)
        for mode, overrides in MODES.items():
            process, base = start_server(run, data, overrides, args.threads,
                                         Path(tmp) / f"server_{mode}.log")
            try:
                card = httpx.get(base + "/v1/model", timeout=10).json()
                vocab_events = card["tokenizer"]["n_event_tokens"]
                asyncio.run(drive(base, 1, argparse.Namespace(**{**vars(args), "requests": 2}),
                                  vocab_events))  # warm-up
                for clients in levels:
                    result = asyncio.run(drive(base, clients, args, vocab_events))
                    rows.append({"batching": mode, **result})
                    print(f"batching {mode}, {clients} clients: {result['req_per_s']:.1f} req/s",
                          file=sys.stderr)
            finally:
                stop_server(process)
    model = card["model"]
    print(f"\nrollout service, {card['n_params']:,}-parameter model (d_model {model['d_model']}, "
          f"{model['n_layer']} layers), prompt {args.prompt} + {args.length} new tokens, n=1 per "
          f"request, server torch threads {args.threads}, loopback HTTP\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
