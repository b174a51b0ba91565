"""The run behind the service: model, tokenizer and data loaded once, prompts resolved
to tokens and anchors, and each answer built with its provenance."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import polars as pl

from mega_trading import __version__
from mega_trading.core.config import to_dict
from mega_trading.core.errors import DataError, MegaTradingError
from mega_trading.core.lineage import git_commit, read_json, sha256_file
from mega_trading.data.shards import ShardSet
from mega_trading.data.tokenizer import Tokenizer
from mega_trading.generation.sampling import SamplingConfig, read_measured
from mega_trading.generation.support import TickSupport
from mega_trading.model.checkpoint import checkpoint_path, load_model
from mega_trading.serve.answers import Anchor, decode_answers, rollout_columns
from mega_trading.serve.batching import Batcher, Job, RolloutEngine
from mega_trading.serve.schemas import (
    DEFAULT_START_PRICE,
    DEFAULT_WINDOW,
    INLINE_ANSWER_TOKENS,
    MAX_PROMPT_TOKENS,
    SEGMENT_SPLITS,
    RolloutRequest,
    ServeError,
    ServeSettings,
    WindowRef,
)

log = logging.getLogger("mega_trading.serve")


class RolloutService:
    """Everything the handlers need: the loaded run, its hashes, prompts and the batcher."""

    def __init__(self, run_dir: str | Path, data_dir: str | Path | None = None,
                 settings: ServeSettings = ServeSettings()):

        self.run_dir, self.settings = Path(run_dir), settings
        if not self.run_dir.is_dir():
            raise DataError("run folder does not exist", self.run_dir)
        self.shards = self._open_data(data_dir)
        self.tokenizer = self._load_tokenizer()
        weights = checkpoint_path(self.run_dir, settings.step) / "model.safetensors"
        self.model, self.state = load_model(
            self.run_dir, step=settings.step, expect_tokenizer_hash=self.tokenizer.hash,
            expect_manifest_hash=self.shards.manifest_hash if self.shards else None,
            device=settings.device)
        if self.model.cfg.vocab_size != self.tokenizer.vocab_size:
            raise DataError(f"model vocabulary {self.model.cfg.vocab_size} != tokenizer "
                            f"vocabulary {self.tokenizer.vocab_size}", self.run_dir)
        self.model_sha256 = sha256_file(weights)
        self.git_commit = git_commit()
        self._identity: dict[str, Any] | None = None
        # One thread writes the answers, in the order their tokens are done: the first answer
        # of a batch leaves after one payload, not after all of them shared the GIL.
        self._answers: ThreadPoolExecutor | None = None  # from start() to stop()
        self.engine = RolloutEngine(self.model, self.tokenizer.pad_id, self.tokenizer.seg_id,
                                    settings.batch_rows, prepare=self.decode_together,
                                    support=TickSupport.from_tokenizer(
                                        self.tokenizer, self.model.tok_embeddings.weight.device))
        self.batcher = Batcher(self.engine, settings)

        self.measured = read_measured(self.run_dir)  # the run's sampling choice, if any
        self._windows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._windows_lock = threading.Lock()

    # startup ---------------------------------------------------------------------------
    def _run_config(self) -> dict[str, Any]:

        path = self.run_dir / "config.json"
        return read_json(path) if path.is_file() else {}

    def _open_data(self, data_dir: str | Path | None):
        """The prepared data: as given (a mismatch is an error), else the run's own if it
        still exists and matches (else None: named windows are then unavailable)."""

        if data_dir is not None:
            return ShardSet.open(data_dir)
        config = self._run_config()
        recorded = config.get("data_dir")
        if not recorded or not (Path(recorded) / "manifest.json").is_file():
            return None
        try:
            shards = ShardSet.open(recorded)
        except MegaTradingError:
            return None
        if shards.manifest_hash != config.get("manifest_hash"):
            log.warning("%s has changed since training; serving without data", recorded)
            return None
        return shards

    def _load_tokenizer(self):

        path = self.run_dir / "tokenizer.json"
        if path.is_file():
            return Tokenizer.load(path)
        if self.shards is not None:
            return self.shards.tokenizer
        raise DataError("run has no tokenizer.json and no data directory was given", self.run_dir)

    # requests --------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.model.cfg.block_size

    def build_job(self, req: RolloutRequest) -> tuple[Job, Anchor]:
        """Validate a request against this run and the limits; 422 (ServeError) if not."""

        if req.n > self.settings.batch_rows:
            raise ServeError(f"n={req.n} rollouts is over this server's limit of "
                             f"{self.settings.batch_rows} (batch_rows) per request")
        if req.n * req.length > self.settings.max_new_tokens:
            raise ServeError(f"n * length = {req.n * req.length} new tokens is over this "
                             f"server's limit of {self.settings.max_new_tokens} per request")
        prompt, anchor = self._prompt(req)
        if len(prompt) > self.block_size:
            raise ServeError(f"the prompt has {len(prompt)} tokens; the model's context "
                             f"(block size) is {self.block_size}")
        given = {"temperature": req.temperature, "top_k": req.top_k or 0, "top_p": req.top_p,
                 "min_p": req.min_p, "tick_support": req.tick_support}
        unset = [k for k in given if k not in req.model_fields_set]
        source = "request"
        if unset and self.measured is not None:  # the run's choice fills what was left out
            given.update({k: self.measured["chosen"][k] for k in unset
                          if k in self.measured["chosen"]})
            source = "measured"
        elif unset:
            source = "default" if len(unset) == len(given) else "request"
        sampling = SamplingConfig(**given, forbid_seg=req.forbid_seg)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return Job(prompt=prompt, n=req.n, length=req.length, sampling=sampling, seed=seed,
                   sampling_source=source, anchor=anchor), anchor

    def _prompt(self, req: RolloutRequest) -> tuple[np.ndarray, Anchor]:
        price = req.start_price if req.start_price is not None else DEFAULT_START_PRICE
        time_us = req.start_time_us if req.start_time_us is not None else 0
        if req.tokens is not None:
            tokens = self.tokenizer.check_tokens(np.asarray(req.tokens, dtype=np.int64))
            return tokens, Anchor("tokens", price, time_us)
        if req.events is not None:
            frame = pl.DataFrame({
                "side": [e.side for e in req.events],
                "move_bps": [e.move_bps for e in req.events],
                "log_size": [e.size for e in req.events],
                "dt_us": [e.dt_us for e in req.events],
            }, schema={"side": pl.Int8, "move_bps": pl.Float64, "log_size": pl.Float64,
                       "dt_us": pl.Int64})
            tokens = np.concatenate([[self.tokenizer.seg_id], self.tokenizer.encode(frame)])
            return tokens.astype(np.int64), Anchor("events", price, time_us)
        if req.window is not None:
            tokens, anchor = self._window(req.window)
        else:
            tokens, anchor = self._segment_start(req.symbol)
        return tokens, dataclasses.replace(
            anchor, price=req.start_price if req.start_price is not None else anchor.price,
            time_us=req.start_time_us if req.start_time_us is not None else anchor.time_us)

    def _shard(self, split: str, symbol: str) -> tuple[np.ndarray, np.ndarray]:
        """(memory-mapped tokens, SEG positions) of a shard: events are read one at a time."""
        if self.shards is None:
            raise ServeError("this server has no prepared data (start it with --data DIR), "
                             "so it cannot serve named windows")
        symbols = self.shards.symbols(split)
        if symbol not in symbols:
            raise ServeError(f"the data has no {split} shard for {symbol} "
                             f"(it has {', '.join(symbols) or 'none'})")
        with self._windows_lock:
            if (split, symbol) not in self._windows:
                self._windows[split, symbol] = (self.shards.tokens(split, symbol),
                                                self.shards.seg_positions(split, symbol))
            return self._windows[split, symbol]

    def _segment_start(self, symbol: str | None) -> tuple[np.ndarray, Anchor]:
        """No prompt: one SEG token, as before every segment of the data. With a symbol, the
        anchor is the first trade of its latest segment in the data, so the rollout opens a
        segment where a real one opened (price, time, and the size level that trade was
        measured against); without one, price 1 and time 0, like a token prompt."""
        seed = np.asarray([self.tokenizer.seg_id], dtype=np.int64)
        if symbol is None:
            return seed, Anchor("segment_start", DEFAULT_START_PRICE, 0)
        if self.shards is None:
            raise ServeError("this server has no prepared data (start it with --data DIR), "
                             f"so it cannot anchor a segment start at {symbol}")
        held = [split for split in SEGMENT_SPLITS if symbol in self.shards.symbols(split)]
        if not held:
            raise ServeError(f"the data has no shard for {symbol}")
        for split in held:  # the latest data first
            tokens, segs = self._shard(split, symbol)
            # The latest SEG before an event that opens a segment (a shard's opening SEG may
            # sit before the middle of a segment cut by the split boundary).
            first = None
            for seg in segs[::-1][:2]:
                if seg + 1 < len(tokens):
                    row = self.shards.event_at_token(split, symbol, int(seg) + 1, segs)
                    if bool(row["segment_start"][0]):
                        first = row.row(0, named=True)
                        break
            if first is not None:
                break
        else:
            raise ServeError(f"the data holds no segment start of {symbol}")
        level = math.exp(math.log(first["quote_qty"]) - first["log_size"])
        return seed, Anchor("segment_start", price=float(first["price"]),
                            time_us=int(first["time_us"]), size_level=level, split=split,
                            symbol=symbol, start=int(first["token_pos"]) - 1)

    def _window(self, ref: WindowRef) -> tuple[np.ndarray, Anchor]:
        """Tokens of a named window and the last real trade at or before its end (the same
        anchor rule as generate.prompt_from_split), read alone."""
        tokens, segs = self._shard(ref.split, ref.symbol)
        n_tokens = len(tokens)
        length = ref.length or min(DEFAULT_WINDOW, self.block_size, n_tokens)
        start = n_tokens - length if ref.start is None else ref.start
        if start < 0 or start + length > n_tokens:
            raise ServeError(f"window [{start}, {start + length}) does not fit in the "
                             f"{ref.split} {ref.symbol} shard of {n_tokens} tokens")
        try:
            prompt, last = self.shards.window(ref.split, ref.symbol, start, length, segs)
        except DataError:
            raise ServeError(f"window [{start}, {start + length}) holds no trade to start "
                             "from") from None
        anchor = Anchor("window", price=last.price, time_us=last.time_us,
                        size_level=last.size_level, split=ref.split, symbol=ref.symbol,
                        start=start)
        return prompt, anchor

    async def answer(self, job: Job, anchor: Anchor, new_tokens: np.ndarray) -> bytes:
        """The response body (`body`): a small one at once on the event loop (~0.1 ms, its
        rollouts decoded with the batch's others by `decode_together`), a larger one on the
        answer thread, so that it does not hold up the other requests."""
        if new_tokens.size <= INLINE_ANSWER_TOKENS:
            return self.body(job, anchor, new_tokens)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._answers, self.body, job, anchor, new_tokens)

    def body(self, job: Job, anchor: Anchor, new_tokens: np.ndarray) -> bytes:
        """`payload` as JSON bytes, encoded by msgspec (~4 us for a 32-token answer; the
        dict through FastAPI's response-model check and json.dumps took ~70 us). The
        payload is built to the RolloutResponse schema (tests check every answer)."""
        return msgspec.json.encode(self.payload(job, anchor, new_tokens))

    def start(self) -> None:
        self._answers = ThreadPoolExecutor(1, thread_name_prefix="rollout-answers")
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._answers is not None:
            self._answers.shutdown(wait=False, cancel_futures=True)

    def decode_together(self, finished: list[tuple[Job, np.ndarray]]) -> None:
        """`RolloutEngine.prepare`: the small answers of jobs that finish at one step, decoded
        in one pass per (prompt length, length) on the engine's thread (`decode_answers`):
        one pass each on the event loop held up the batch's last answer, and so the next
        batch, by ~0.4 ms per answer. Large answers stay on the answer thread."""
        groups: dict[tuple[int, int], list[tuple[Job, np.ndarray]]] = {}
        for job, new_tokens in finished:
            if job.anchor is not None and new_tokens.size <= INLINE_ANSWER_TOKENS:
                groups.setdefault((len(job.prompt), new_tokens.shape[1]), []).append(
                    (job, new_tokens))
        for group in groups.values():
            decoded = decode_answers(self.tokenizer, [(new_tokens, job.anchor, job.seed, job.prompt)
                                                      for job, new_tokens in group])
            for (job, _), rollouts in zip(group, decoded):
                job.decoded = rollouts

    def payload(self, job: Job, anchor: Anchor, new_tokens: np.ndarray) -> dict[str, Any]:
        """The response body: decoded rollouts, the prompt, provenance."""
        # in-bin draws seeded per request; each rollout decoded after its prompt (context)
        rollouts = rollout_columns(self.tokenizer, new_tokens, anchor, decode_seed=job.seed,
                                   context_tokens=job.prompt, decoded=job.decoded)
        cfg = job.sampling
        return {
            "rollouts": rollouts,
            "prompt": {"source": anchor.source, "n_tokens": len(job.prompt),
                       "tokens": job.prompt.tolist(), "split": anchor.split,
                       "symbol": anchor.symbol, "start": anchor.start,
                       "start_price": anchor.price, "start_time_us": anchor.time_us,
                       "size_level": anchor.size_level},
            "provenance": {
                **self.identity(),
                "sampling": {"temperature": cfg.temperature, "top_k": cfg.top_k or None,
                             "top_p": cfg.top_p, "min_p": cfg.min_p,
                             "tick_support": cfg.tick_support, "forbid_seg": cfg.forbid_seg,
                             "forbid_pad": cfg.forbid_pad,
                             "source": job.sampling_source,
                             "label": cfg.label},
                "seed": job.seed, "n": job.n, "length": job.length,
                "batch_rows": self.settings.batch_rows,
            },
        }

    def identity(self) -> dict[str, Any]:
        if self._identity is None:  # constant; the tokenizer hash alone costs ~1 ms
            self._identity = self._compute_identity()
        return dict(self._identity)

    def _compute_identity(self) -> dict[str, Any]:
        return {
            "run": self.run_dir.resolve().name,
            "checkpoint_step": self.state.get("step"),
            "model_sha256": self.model_sha256,
            "tokenizer_hash": self.tokenizer.hash,
            "manifest_hash": self.state.get("manifest_hash")
            or (self.shards.manifest_hash if self.shards else None),
            "git_commit": self.git_commit,
            "package_version": __version__,
        }

    # model card ------------------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:

        cfg = self.model.cfg
        tok = self.tokenizer
        return {
            "run": self.run_dir.resolve().name,
            "checkpoint_step": self.state.get("step"),
            "model": to_dict(cfg),
            "n_params": cfg.n_params(),
            "n_params_hidden": cfg.n_params(include_embeddings=False),
            "model_sha256": self.model_sha256,
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size,
                          "n_event_tokens": tok.n_event_tokens, "field_sizes": tok.field_sizes,
                          "pad_id": tok.pad_id, "seg_id": tok.seg_id},
            "training": self._training_summary(),
            "data": self._data_summary(),
            "backtest": self._backtest_headline(),
            "limits": {**dataclasses.asdict(self.settings), "block_size": cfg.block_size,
                       "max_prompt_tokens": min(cfg.block_size, MAX_PROMPT_TOKENS)},
            "provenance": self.identity(),
            # what a request that leaves the sampling fields out gets (RUN/sampling.json)
            "sampling_default": ({"source": "measured", "label": self.measured.get("label"),
                                  **{k: self.measured["chosen"][k] for k in self.measured["chosen"]},
                                  "score": self.measured.get("score"),
                                  "split": self.measured.get("split")}
                                 if self.measured else {"source": "default",
                                                        "label": SamplingConfig().label}),
        }

    def _training_summary(self) -> dict[str, Any] | None:

        config = self._run_config()
        if not config:
            return None
        summary_path = self.run_dir / "train_summary.json"
        summary = read_json(summary_path) if summary_path.is_file() else {}
        train = config.get("train", {})
        return {
            "preset": train.get("preset"), "steps": train.get("steps"),
            "batch_size": train.get("batch_size"), "lr": train.get("lr"),
            "seed": train.get("seed"), "data_dir": config.get("data_dir"),
            "final_loss": summary.get("loss"), "val_loss": summary.get("val_loss"),
            "tokens_seen": summary.get("tokens_seen"),
            "windows_seen": summary.get("windows_seen"),
        }

    def _data_summary(self) -> dict[str, Any] | None:
        if self.shards is None:
            return None
        manifest = self.shards.manifest
        splits = {}
        for split, by_symbol in manifest["shards"].items():
            splits[split] = {
                symbol: {key: info.get(key) for key in
                         ("n_events", "n_tokens", "n_windows", "start_time_us", "end_time_us")}
                for symbol, info in sorted(by_symbol.items())}
        return {"manifest_hash": self.shards.manifest_hash, "kind": manifest.get("kind"),
                "splits": splits, "token_stats": manifest.get("token_stats"),
                "data_dir": str(Path(self.shards.root).resolve())}

    def _backtest_headline(self) -> dict[str, Any] | None:

        path = self.run_dir / "backtest.json"
        if not path.is_file():
            return None
        doc = read_json(path)
        keys = ("nll_nats", "nll_nats_ci95", "bits_per_event", "top1", "top5", "ece")
        model = doc.get("model", {})
        baselines = {name: s.get("nll_nats") for name, s in doc.get("baselines", {}).items()}
        best = min((b for b in baselines if baselines[b] is not None),
                   key=lambda b: baselines[b], default=None)
        return {"split": doc.get("split"), "n_scored": doc.get("n_scored"),
                "model": {k: model.get(k) for k in keys if k in model},
                "baselines_nll_nats": baselines, "best_baseline": best,
                "vs_best_baseline": model.get("vs_baselines", {}).get(best) if best else None}


