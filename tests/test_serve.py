"""The rollout service: prompts, determinism under batching, limits, batching, schema."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient

from mega_trading.serve.app import create_app
from mega_trading.serve.schemas import ServeSettings

REPO = Path(__file__).resolve().parents[1]
BLOCK = 64
ROWS = 4


def build_tiny_run(root: Path) -> tuple[Path, Path]:
    """A prepared copy of the bundled sample and a 2-step tiny run trained on it."""
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.prepare import PrepareConfig, prepare
    from mega_trading.train.config import TrainConfig
    from mega_trading.train.loop import train

    data, run = root / "data", root / "run"
    prepare(sample_files("trades"), data, PrepareConfig(block_size=BLOCK, stride=32, workers=1))
    cfg = TrainConfig(preset="micro", steps=2, batch_size=4, block_size=BLOCK, warmup_steps=1,
                      eval_every=0, eval_batches=1, tracking="none", device="cpu",
                      compile=False, model={"n_layer": 2, "d_model": 32, "n_head": 4,
                                            "n_kv_head": 2, "ffn_hidden": 64, "init_std": 0.3})
    train(data, run, cfg, log=lambda message: None)
    return run, data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_run(tmp_path_factory.mktemp("serve"))


SETTINGS = ServeSettings(batch_rows=ROWS, max_new_tokens=256, max_body_bytes=64 * 1024,
                         batch_window_ms=5)


@pytest.fixture(scope="module")
def client(tiny_run):
    run, data = tiny_run
    with TestClient(create_app(run, data, SETTINGS)) as test_client:
        yield test_client


def service_of(test_client: TestClient):
    return test_client.app.state.service


def post(test_client: TestClient, body: dict):
    return test_client.post("/v1/rollouts", json=body)


# --- basics ----------------------------------------------------------------------------------

def test_healthz(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["queued"] == 0
    assert {"batches", "requests", "rows", "max_requests_in_batch"} <= set(body)


def test_model_card_describes_the_run(client, tiny_run):
    from mega_trading.core.lineage import sha256_file
    from mega_trading.data.shards import ShardSet
    from mega_trading.model.checkpoint import checkpoint_path

    run, data = tiny_run
    card = client.get("/v1/model").json()
    shards = ShardSet.open(data)
    service = service_of(client)
    assert card["model"]["block_size"] == BLOCK and card["model"]["d_model"] == 32
    assert card["n_params"] == service.model.cfg.n_params()
    assert card["n_params"] == sum(p.numel() for p in service.model.parameters())
    assert card["checkpoint_step"] == 2
    assert card["model_sha256"] == sha256_file(checkpoint_path(run) / "model.safetensors")
    assert card["tokenizer"]["hash"] == shards.tokenizer_hash
    assert card["tokenizer"]["vocab_size"] == shards.vocab_size
    assert card["data"]["manifest_hash"] == shards.manifest_hash
    assert set(card["data"]["splits"]) == {"train", "validation", "backtest"}
    assert card["data"]["splits"]["train"]["ETHUSDT"]["n_tokens"] == shards.n_tokens("train", "ETHUSDT")
    assert card["training"]["steps"] == 2 and card["training"]["final_loss"] > 0
    assert card["backtest"] is None  # no RUN/backtest.json yet
    assert card["limits"]["batch_rows"] == ROWS and card["limits"]["max_prompt_tokens"] == BLOCK


def test_sampling_left_out_takes_the_runs_measured_choice(tiny_run, tmp_path):
    from mega_trading.generation.sampling import SAMPLING_FORMAT

    run, data = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    body = {"n": 1, "length": 8, "seed": 3}
    with TestClient(create_app(copy, data, SETTINGS)) as test_client:
        plain = post(test_client, body).json()["provenance"]["sampling"]
    assert plain["source"] == "default" and plain["label"] == "T=1, full"
    (copy / "sampling.json").write_text(json.dumps({
        "format": SAMPLING_FORMAT, "split": "validation", "score": 1.2,
        "chosen": {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.02}}))
    with TestClient(create_app(copy, data, SETTINGS)) as test_client:
        measured = post(test_client, body).json()["provenance"]["sampling"]
        partly = post(test_client, {**body, "min_p": 0.0}).json()["provenance"]["sampling"]
        off = post(test_client, {**body, "top_k": None}).json()["provenance"]["sampling"]
        card = test_client.get("/v1/model").json()["sampling_default"]
    assert card["source"] == "measured" and card["min_p"] == 0.02 and card["split"] == "validation"
    assert (measured["temperature"], measured["min_p"], measured["source"]) == (0.9, 0.02, "measured")
    assert (partly["temperature"], partly["min_p"], partly["source"]) == (0.9, 0.0, "measured")
    assert off["top_k"] is None and off["min_p"] == 0.02


def test_model_card_backtest_headline(tiny_run, tmp_path):
    run, data = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "backtest.json").write_text(json.dumps({
        "split": "backtest", "n_scored": 1234,
        "model": {"nll_nats": 3.2, "nll_nats_ci95": [3.1, 3.3], "bits_per_event": 4.6,
                  "top1": 0.21, "top5": 0.48, "ece": 0.01, "reliability": [1, 2, 3],
                  "vs_baselines": {"unigram": {"delta_nll_nats": -0.9, "ci95": [-1, -0.8]},
                                   "kn3": {"delta_nll_nats": -0.2, "ci95": [-0.3, -0.1]}}},
        "baselines": {"unigram": {"nll_nats": 4.1}, "kn3": {"nll_nats": 3.4}},
    }))
    with TestClient(create_app(copy, data, SETTINGS)) as test_client:
        headline = test_client.get("/v1/model").json()["backtest"]
    assert headline["n_scored"] == 1234
    assert headline["model"] == {"nll_nats": 3.2, "nll_nats_ci95": [3.1, 3.3],
                                 "bits_per_event": 4.6, "top1": 0.21, "top5": 0.48, "ece": 0.01}
    assert headline["best_baseline"] == "kn3"
    assert headline["vs_best_baseline"]["delta_nll_nats"] == -0.2


# --- rollouts by each kind of prompt ------------------------------------------------------------

def check_paths(rollout: dict, start_price: float, start_time_us: int) -> None:
    """Price and time paths integrate the decoded moves and gaps from the start."""
    price, time_us = start_price, start_time_us
    for i, is_event in enumerate(rollout["is_event"]):
        if is_event:
            price *= 1 + rollout["move_bps"][i] / 1e4
            time_us += rollout["dt_us"][i]
        else:
            assert rollout["move_bps"][i] is None and rollout["side"][i] is None
        assert rollout["price"][i] == pytest.approx(price, rel=1e-12)
        assert rollout["time_us"][i] == time_us


def test_rollout_by_tokens(client):
    service = service_of(client)
    seg = service.tokenizer.seg_id
    body = {"tokens": [seg, 5, 17, 300], "n": 3, "length": 20, "seed": 7, "start_price": 250.0,
            "start_time_us": 1_700_000_000_000_000, "temperature": 0.8, "top_k": 50}
    response = post(client, body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert [r["index"] for r in out["rollouts"]] == [0, 1, 2]
    for rollout in out["rollouts"]:
        assert len(rollout["tokens"]) == 20
        assert all(0 <= t < service.tokenizer.vocab_size for t in rollout["tokens"])
        assert service.tokenizer.pad_id not in rollout["tokens"]  # PAD is never sampled
        check_paths(rollout, 250.0, 1_700_000_000_000_000)
    assert out["prompt"]["source"] == "tokens" and out["prompt"]["tokens"] == body["tokens"]
    prov = out["provenance"]
    assert prov["seed"] == 7 and prov["n"] == 3 and prov["length"] == 20
    assert prov["sampling"] == {"temperature": 0.8, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                                "tick_support": False, "forbid_seg": False, "forbid_pad": True, "source": "request",
                                "label": "T=0.8, top-k 50"}
    assert prov["tokenizer_hash"] == service.tokenizer.hash
    assert prov["manifest_hash"] == service.shards.manifest_hash
    assert prov["model_sha256"] == service.model_sha256 and len(prov["model_sha256"]) == 64
    assert prov["git_commit"]


def test_rollout_by_events_encodes_them_after_a_segment_start(client):
    service = service_of(client)
    events = [{"side": 1, "move_bps": 0.0, "size": 0.2, "dt_us": 0},
              {"side": -1, "move_bps": -1.5, "size": -0.7, "dt_us": 1500},
              {"side": 1, "move_bps": 2.0, "size": 1.1, "dt_us": 40}]
    response = post(client, {"events": events, "n": 2, "length": 8, "seed": 3})
    assert response.status_code == 200, response.text
    out = response.json()
    frame = pl.DataFrame({"side": [1, -1, 1], "move_bps": [0.0, -1.5, 2.0],
                          "log_size": [0.2, -0.7, 1.1], "dt_us": [0, 1500, 40]})
    expected = [service.tokenizer.seg_id] + service.tokenizer.encode(frame).tolist()
    assert out["prompt"]["tokens"] == expected and out["prompt"]["source"] == "events"
    assert len(out["rollouts"]) == 2 and all(len(r["tokens"]) == 8 for r in out["rollouts"])
    check_paths(out["rollouts"][0], 1.0, 0)


def test_rollout_by_named_window(client, tiny_run):
    from mega_trading.data.shards import ShardSet

    shards = ShardSet.open(tiny_run[1])
    tokens = np.asarray(shards.tokens("validation", "BTCUSDT"))
    events = shards.events("validation", "BTCUSDT").sort("token_pos")
    start, length = 100, 30
    response = post(client, {"window": {"split": "validation", "symbol": "BTCUSDT",
                                        "start": start, "length": length},
                             "n": 2, "length": 10, "seed": 1})
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["prompt"]["tokens"] == tokens[start:start + length].tolist()
    last = events.filter(pl.col("token_pos") < start + length).tail(1)
    assert out["prompt"]["start_price"] == last["price"][0]
    assert out["prompt"]["start_time_us"] == last["time_us"][0]
    assert out["prompt"]["size_level"] > 0
    for rollout in out["rollouts"]:
        check_paths(rollout, last["price"][0], last["time_us"][0])
        qty = [q for q, e in zip(rollout["quote_qty"], rollout["is_event"]) if e]
        assert all(q is not None and q > 0 for q in qty)  # sizes in quote currency

    latest = post(client, {"window": {"split": "backtest", "symbol": "ETHUSDT"}, "length": 4,
                           "seed": 1}).json()
    n_tokens = shards.n_tokens("backtest", "ETHUSDT")
    width = min(128, BLOCK)
    assert latest["prompt"]["start"] == n_tokens - width
    assert latest["prompt"]["tokens"] == np.asarray(
        shards.tokens("backtest", "ETHUSDT"))[-width:].tolist()


def test_a_request_without_a_prompt_starts_a_segment(client, tiny_run):
    """The beginning-of-sequence seed: one SEG token, anchored at a real segment start."""
    from mega_trading.data.shards import ShardSet

    seg = service_of(client).tokenizer.seg_id
    bare = post(client, {"n": 2, "length": 12, "seed": 4})
    assert bare.status_code == 200, bare.text
    out = bare.json()
    assert out["prompt"]["source"] == "segment_start" and out["prompt"]["tokens"] == [seg]
    assert (out["prompt"]["start_price"], out["prompt"]["start_time_us"]) == (1.0, 0)
    check_paths(out["rollouts"][0], 1.0, 0)
    same = post(client, {"tokens": [seg], "n": 2, "length": 12, "seed": 4}).json()
    assert [r["tokens"] for r in out["rollouts"]] == [r["tokens"] for r in same["rollouts"]]

    anchored = post(client, {"symbol": "BTCUSDT", "length": 12, "seed": 4}).json()
    prompt = anchored["prompt"]
    shards = ShardSet.open(tiny_run[1])
    events = shards.events(prompt["split"], "BTCUSDT").sort("token_pos")
    first = events.filter(pl.col("segment_start")).tail(1)  # the latest segment start
    assert prompt["tokens"] == [seg] and prompt["symbol"] == "BTCUSDT"
    assert np.asarray(shards.tokens(prompt["split"], "BTCUSDT"))[prompt["start"]] == seg
    assert prompt["start"] == first["token_pos"][0] - 1
    assert prompt["start_price"] == first["price"][0]
    assert prompt["start_time_us"] == first["time_us"][0]
    assert prompt["size_level"] == pytest.approx(first["quote_qty"][0] / np.exp(first["log_size"][0]))
    check_paths(anchored["rollouts"][0], first["price"][0], first["time_us"][0])
    qty = [q for q, e in zip(anchored["rollouts"][0]["quote_qty"], anchored["rollouts"][0]["is_event"]) if e]
    assert qty and all(q is not None and q > 0 for q in qty)  # sizes in quote currency
    moved = post(client, {"symbol": "BTCUSDT", "length": 4, "start_price": 9.0}).json()
    assert moved["prompt"]["start_price"] == 9.0


@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("size_level", [None, 37.5])
def test_answers_hold_the_values_of_rollouts_to_events(client, size_level, with_prompt):
    """The service decodes answers on numpy (serve.rollout_columns), not through the polars
    frame of generate.rollouts_to_events: the same values, specials and nulls included."""
    from mega_trading.generation.rollouts import rollouts_to_events
    from mega_trading.serve.answers import Anchor, rollout_columns

    tokenizer = service_of(client).tokenizer
    tokens = np.random.default_rng(3).integers(0, tokenizer.vocab_size, (3, 40))
    tokens[0, :2] = [tokenizer.seg_id, tokenizer.pad_id]
    anchor = Anchor("tokens", price=250.0, time_us=1_700_000_000_000_000, size_level=size_level)
    # a prompt is decoded first (the move's context), as the service does
    prompt = np.random.default_rng(4).integers(0, tokenizer.vocab_size - 2, 24) if with_prompt else None
    columns = rollout_columns(tokenizer, tokens, anchor, decode_seed=11, context_tokens=prompt)
    frame = rollouts_to_events(tokens, tokenizer, anchor.price, anchor.time_us, None,
                               size_level, decode_seed=11,
                               context_tokens=None if prompt is None else np.tile(prompt, (3, 1)))
    assert [rollout["index"] for rollout in columns] == [0, 1, 2]
    for name in ("tokens", "is_event", "segment_start", "side", "move_bps", "log_size", "dt_us",
                 "time_us", "price", "quote_qty"):
        column = frame["token" if name == "tokens" else name]
        expected = (column.fill_nan(None) if column.dtype.is_float() else column).to_list()
        assert [v for rollout in columns for v in rollout[name]] == expected, name
    assert columns[0]["side"][0] is None and columns[0]["quote_qty"][1] is None


def test_answers_decoded_together_equal_answers_decoded_alone(client):
    """The answers of jobs that finish at one step are decoded in one pass (each from its
    own seed, `answers.SplitDraws`): bit for bit what a pass per answer gives, specials,
    several rollouts per answer and anchors with and without a size level included."""
    from mega_trading.generation.rollouts import decode_rollouts
    from mega_trading.serve.answers import Anchor, SplitDraws, decode_answers

    tokenizer = service_of(client).tokenizer
    rng = np.random.default_rng(12)
    answers = []
    for i, n in enumerate((1, 3, 1, 2, 1)):
        new = rng.integers(0, tokenizer.vocab_size, (n, 17))
        prompt = rng.integers(0, tokenizer.vocab_size, 9)
        prompt[i % 3] = tokenizer.seg_id
        anchor = Anchor("tokens", price=float(rng.uniform(1, 500)), time_us=int(rng.integers(1e15)),
                        size_level=None if i % 2 else float(rng.uniform(1, 100)))
        answers.append((new, anchor, int(rng.integers(1 << 62)), prompt))
    together = decode_answers(tokenizer, answers)
    for (new, anchor, seed, prompt), got in zip(answers, together):
        alone = decode_rollouts(new, tokenizer, anchor.price, anchor.time_us, anchor.size_level,
                                seed, context_tokens=prompt)
        for name in ("tokens", "price", "time_us", "quote_qty"):
            np.testing.assert_array_equal(getattr(got, name), getattr(alone, name), name)
        for name, values in alone.fields.items():
            np.testing.assert_array_equal(got.fields[name], values, name)
    with pytest.raises(ValueError):  # a draw that is not one per token of every answer
        SplitDraws([np.random.default_rng(0)], [4]).random(3)


def test_the_service_decodes_a_step_s_answers_on_the_engine_thread(client):
    """`RolloutService.decode_together` (the engine's prepare hook) fills job.decoded for
    the small answers of each (prompt length, length) group; the bodies are those of
    answers decoded alone. A large answer is left to the answer thread."""
    from mega_trading.serve.schemas import RolloutRequest

    service = service_of(client)
    rng = np.random.default_rng(13)
    finished, alone = [], []
    for i, (prompt_len, length) in enumerate(((5, 8), (5, 8), (7, 8), (5, 6), (5, 8))):
        request = RolloutRequest(tokens=rng.integers(0, 1790, prompt_len).tolist(), length=length,
                                 seed=i, n=1 + i % 2)
        job, anchor = service.build_job(request)
        new_tokens = rng.integers(0, service.tokenizer.vocab_size, (job.n, length))
        alone.append(service.body(job, anchor, new_tokens))
        finished.append((job, new_tokens))
    service.decode_together(finished)
    assert all(job.decoded is not None for job, _ in finished)
    assert [service.body(job, job.anchor, new) for job, new in finished] == alone
    big = dataclasses.replace(finished[0][0], n=ROWS, length=300, decoded=None)  # > 1024
    service.decode_together([(big, np.zeros((ROWS, 300), dtype=np.int64))])
    assert big.decoded is None


@pytest.mark.parametrize("body", [
    {"tokens": [3, 1, 4, 1, 5], "n": 2, "length": 9, "seed": 2, "top_k": 7},
    {"symbol": "BTCUSDT", "length": 6, "seed": 1},
    {"window": {"split": "backtest", "symbol": "ETHUSDT"}, "length": 5, "temperature": 0},
    {"events": [{"side": 1, "move_bps": 1.5, "size": 0.2, "dt_us": 40}], "length": 3}])
def test_answers_are_exactly_the_response_model(client, body):
    """Answers leave as JSON encoded by msgspec, past FastAPI's response-model check: each
    is what RolloutResponse makes of it (no field missing, added or of another type)."""
    from mega_trading.serve.schemas import RolloutResponse

    response = post(client, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert RolloutResponse.model_validate(answer, strict=True).model_dump(mode="json") == answer


def test_rollouts_equal_generate_when_a_request_fills_the_batch(client):
    """The batched decode loop is generate.generate's: same tokens for the same seed,
    through a sliding window (prompt 40 + 60 new > block 64)."""
    from mega_trading.generation.generate import SamplingConfig, generate

    service = service_of(client)
    prompt = torch.randint(0, service.tokenizer.n_event_tokens, (40,),
                           generator=torch.Generator().manual_seed(11))
    body = {"tokens": prompt.tolist(), "n": ROWS, "length": 60, "seed": 123,
            "temperature": 1.3, "top_k": 40, "top_p": 0.9}
    out = post(client, body).json()
    cfg = SamplingConfig(temperature=1.3, top_k=40, top_p=0.9)
    expected = generate(service.model, prompt.repeat(ROWS, 1), 60, cfg,
                        torch.Generator().manual_seed(123),
                        specials=(service.tokenizer.pad_id, service.tokenizer.seg_id))
    assert [r["tokens"] for r in out["rollouts"]] == expected[:, 40:].tolist()


# --- determinism ---------------------------------------------------------------------------------

def test_same_seed_same_rollouts_other_seed_others(client):
    body = {"tokens": [1793, 10, 20, 30], "n": 2, "length": 24, "seed": 42}
    first, again = post(client, body).json(), post(client, body).json()
    assert first == again
    other = post(client, {**body, "seed": 43}).json()
    assert other["rollouts"] != first["rollouts"]
    drawn = post(client, {k: v for k, v in body.items() if k != "seed"}).json()
    replay = post(client, {**body, "seed": drawn["provenance"]["seed"]}).json()
    assert replay["rollouts"] == drawn["rollouts"]  # a server-drawn seed reproduces too


@pytest.fixture(scope="module")
def batching_client(tiny_run):
    run, data = tiny_run
    settings = ServeSettings(batch_rows=8, max_batch_requests=8, batch_window_ms=200,
                             max_new_tokens=256)
    with TestClient(create_app(run, data, settings)) as test_client:
        yield test_client


def concurrently(test_client: TestClient, bodies: list[dict]):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: post(test_client, body), bodies))


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.005)


def queued_in_order(test_client: TestClient, bodies: list[dict]) -> list:
    """Send bodies so that they wait in the queue in this order, then run them: the worker
    is held on a blocker request meanwhile, so they surely form one batch, rows in order."""
    service = service_of(test_client)
    engine, batcher = service.engine, service.batcher
    real_run_batch, gate, held = engine.run_batch, threading.Event(), threading.Event()

    def hold_first(jobs, on_done):
        if not gate.is_set():
            held.set()
            gate.wait(30)
        real_run_batch(jobs, on_done)

    engine.run_batch = hold_first
    try:
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            blocker = pool.submit(post, test_client, {"tokens": [1793], "length": 1})
            wait_until(held.is_set)
            futures = []
            for body in bodies:
                before = batcher.queued
                futures.append(pool.submit(post, test_client, body))
                wait_until(lambda expected=before + 1: batcher.queued == expected)
            gate.set()
            assert blocker.result().status_code == 200
            return [future.result() for future in futures]
    finally:
        gate.set()
        del engine.run_batch  # back to the class's method


def test_same_seed_same_rollouts_when_batched_with_others(batching_client):
    """Determinism under batching: a request alone, on rows 0..1 of a batch and on rows
    3..4 of a batch gets the same rollouts (its own generator, fixed forward shape)."""
    stats = service_of(batching_client).batcher.stats
    a = {"tokens": [1793, 10, 20, 30], "n": 2, "length": 16, "seed": 5, "temperature": 1.0}
    b = {"tokens": [1793, 11, 21, 31], "n": 3, "length": 30, "seed": 6, "top_p": 0.8}
    alone = post(batching_client, a).json()

    batches = stats.batches
    b_then_a = queued_in_order(batching_client, [b, a])
    assert stats.batches == batches + 2, "blocker + one batch holding both requests"
    assert b_then_a[1].json() == alone

    batches = stats.batches
    a_then_b = queued_in_order(batching_client, [a, b])
    assert stats.batches == batches + 2
    assert a_then_b[0].json() == alone
    assert a_then_b[1].json() == b_then_a[0].json()  # b is stable too
    assert alone["rollouts"][0]["tokens"] != alone["rollouts"][1]["tokens"]


def test_a_row_does_not_depend_on_the_other_rows_of_its_batch(client):
    """The property the fixed batch shape buys, checked bit for bit on the logits."""
    service = service_of(client)
    model = service.model
    rows = torch.randint(0, 1790, (ROWS, 20), generator=torch.Generator().manual_seed(0))
    other = rows.clone()
    other[0], other[2:] = rows[1], torch.randint(0, 1790, (ROWS - 2, 20))
    with torch.inference_mode():
        cache = model.new_cache(ROWS)
        model(rows, cache=cache, start_pos=0)
        step = model(rows[:, -1:], cache=cache, start_pos=20)[:, -1]
        cache = model.new_cache(ROWS)
        model(other, cache=cache, start_pos=0)
        moved = model(other[:, -1:], cache=cache, start_pos=20)[:, -1]
    assert torch.equal(step[1], moved[0])  # same row, other position, other neighbours
    assert torch.equal(step[1], moved[1])


def test_concurrent_requests_are_batched(batching_client):
    stats = service_of(batching_client).batcher.stats
    batches, requests = stats.batches, stats.requests
    bodies = [{"tokens": [1793, i, i + 1], "length": 12, "seed": i} for i in range(8)]
    responses = concurrently(batching_client, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert stats.requests - requests == 8
    assert stats.batches - batches < 8
    assert stats.max_requests_in_batch >= 2
    assert post(batching_client, bodies[3]).json() == responses[3].json()

    batches = stats.batches
    responses = queued_in_order(batching_client, bodies)
    assert stats.batches - batches == 2  # the blocker, then all 8 requests at once
    assert stats.max_requests_in_batch == 8


def test_requests_of_other_prompt_lengths_still_get_answered(batching_client):
    bodies = [{"tokens": [1793] + list(range(1, k + 1)), "length": 5 + k, "seed": k}
              for k in (1, 2, 1, 3, 2)]
    responses = concurrently(batching_client, bodies)
    assert [r.status_code for r in responses] == [200] * 5
    assert [len(r.json()["rollouts"][0]["tokens"]) for r in responses] == [6, 7, 6, 8, 7]


# --- limits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"tokens": [1, 2, 5000]}, "token 5000 at position 2 is outside the vocabulary"),
    ({"tokens": [-1]}, "token -1 at position 0 is outside the vocabulary"),
    ({"tokens": [1] * (BLOCK + 1)}, f"the prompt has {BLOCK + 1} tokens; the model's context"),
    ({"tokens": [1], "n": 4, "length": 65}, "n * length = 260 new tokens is over"),
    ({"tokens": [1], "n": ROWS + 1}, f"n={ROWS + 1} rollouts is over this server's limit"),
    ({"tokens": [1], "top_p": 0}, "top_p: Input should be greater than 0"),
    ({"tokens": [1], "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"tokens": [1], "temperature": -0.1}, "temperature: Input should be greater than or equal"),
    ({"tokens": [1], "top_k": 0}, "top_k: Input should be greater than or equal to 1"),
    ({"tokens": [1], "length": 0}, "length: Input should be greater than or equal to 1"),
    ({"tokens": [1], "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"tokens": []}, "tokens: List should have at least 1 item"),
    ({"tokens": [1], "events": [{"side": 1, "move_bps": 0, "size": 0, "dt_us": 0}]},
     "give at most one prompt"),
    ({"tokens": [1], "symbol": "BTCUSDT"}, "symbol only anchors a request without a prompt"),
    ({"symbol": "DOGEUSDT"}, "the data has no shard for DOGEUSDT"),
    ({"events": [{"side": True, "move_bps": 0, "size": 0, "dt_us": 0}]}, "events.0.side: a boolean"),
    ({"events": [{"side": 1, "move_bps": False, "size": 0, "dt_us": 0}]}, "events.0.move_bps"),
    ({"tokens": [1, True]}, "tokens.1: a boolean"),
    ({"n": True}, "n: a boolean"),
    ({"events": [{"side": 0, "move_bps": 0, "size": 0, "dt_us": 0}]}, "events.0.side"),
    ({"tokens": [1], "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"window": {"split": "backtest", "symbol": "DOGEUSDT"}}, "no backtest shard for DOGEUSDT"),
    ({"window": {"split": "backtest", "symbol": "ETHUSDT", "start": 10**9}}, "does not fit"),
])
def test_invalid_requests_get_422_with_a_clear_message(client, body, message):
    response = post(client, body)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_non_finite_numbers_get_422(client):
    raw = b'{"tokens": [1], "temperature": NaN}'
    response = client.post("/v1/rollouts", content=raw,
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "temperature" in response.json()["detail"]


def test_undecodable_body_gets_422(client):
    response = client.post("/v1/rollouts", content=b"\xff\xfe{",
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid UTF-8 JSON" in response.json()["detail"]
    response = client.post("/v1/rollouts", content=b'{"tokens": [1,',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]


def test_huge_body_gets_413_before_parsing(client):
    huge = json.dumps({"tokens": [1] * 40_000}).encode()  # 120 kB > 64 kB limit
    response = client.post("/v1/rollouts", content=huge,
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "at most 65536 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(20):
            yield b" " * 4096

    response = client.post("/v1/rollouts", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert post(client, {"tokens": [1], "length": 2}).status_code == 200  # still serving


def test_queue_timeout_and_a_failing_batch_never_hang(tiny_run, monkeypatch):
    run, data = tiny_run
    settings = ServeSettings(batch_rows=2, max_batch_requests=1, batch_window_ms=0,
                             queue_timeout_s=0.3, max_new_tokens=64)
    # raise_server_exceptions=False: the simulated bug below must come back as a 500
    with TestClient(create_app(run, data, settings), raise_server_exceptions=False) as test_client:
        engine = service_of(test_client).engine
        real_run_batch = engine.run_batch
        release = threading.Event()

        def blocked(jobs, on_done):
            release.wait(10)
            real_run_batch(jobs, on_done)

        monkeypatch.setattr(engine, "run_batch", blocked)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, test_client, {"tokens": [1, 2], "length": 3, "seed": 1})
            time.sleep(0.1)
            queued = post(test_client, {"tokens": [1, 2, 3], "length": 3, "seed": 1})
            release.set()
            assert first.result().status_code == 200
        assert queued.status_code == 503
        assert "waited more than 0.3 s in the queue" in queued.json()["detail"]

        def broken(jobs, on_done):
            raise RuntimeError("simulated failure")

        monkeypatch.setattr(engine, "run_batch", broken)
        assert post(test_client, {"tokens": [1], "length": 2}).status_code == 500
        monkeypatch.setattr(engine, "run_batch", real_run_batch)
        assert post(test_client, {"tokens": [1], "length": 2}).status_code == 200


def test_named_windows_need_data(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data_dir"] = str(tmp_path / "gone")
    (copy / "config.json").write_text(json.dumps(config))
    with TestClient(create_app(copy, None, SETTINGS)) as test_client:
        assert test_client.get("/v1/model").json()["data"] is None
        response = post(test_client, {"window": {"split": "backtest", "symbol": "ETHUSDT"}})
        assert response.status_code == 422 and "--data" in response.json()["detail"]
        assert post(test_client, {"tokens": [1, 2], "length": 3}).status_code == 200


def test_mismatched_data_is_refused_at_startup(tiny_run, tmp_path):
    from mega_trading.core.errors import ArtifactMismatchError
    from mega_trading.data.bundled import sample_files
    from mega_trading.data.prepare import PrepareConfig, prepare

    other = tmp_path / "other"
    prepare(sample_files("trades")[:1], other, PrepareConfig(block_size=BLOCK, stride=32, workers=1))
    with pytest.raises(ArtifactMismatchError):
        create_app(tiny_run[0], other, SETTINGS)


# --- schema and a live server ----------------------------------------------------------------------

def test_committed_openapi_equals_the_served_schema(client):
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert client.get("/openapi.json").json() == committed, (
        "docs/openapi.json is stale: run `python -m mega_trading.serve docs/openapi.json`")
    request = committed["components"]["schemas"]["RolloutRequest"]
    assert request["properties"]["top_p"]["exclusiveMinimum"] == 0
    assert set(committed["paths"]["/v1/rollouts"]["post"]["responses"]) >= {"200", "413", "422"}


def test_live_uvicorn_server_on_loopback(tiny_run):
    import httpx
    import uvicorn

    run, data = tiny_run
    app = create_app(run, data, SETTINGS)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            body = {"tokens": [1793, 3, 4], "n": 2, "length": 6, "seed": 9}
            live = http.post("/v1/rollouts", json=body)
            assert live.status_code == 200
            assert http.post("/v1/rollouts", json=body).json() == live.json()
            big = http.post("/v1/rollouts", content=b"[" + b"1," * 40_000 + b"1]",
                            headers={"content-type": "application/json"})
            assert big.status_code == 413
    finally:
        server.should_exit = True
        thread.join(10)


def test_tick_support_request_draws_only_supported_tokens(client):
    from mega_trading.data.binning import MoveMemory, move_ranks

    tokenizer = service_of(client).tokenizer
    body = {"tokens": list(range(0, 2 * 40, 2)), "n": 3, "length": 40, "seed": 11,
            "tick_support": True}
    response = post(client, body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["provenance"]["sampling"]["tick_support"] is True
    assert out["provenance"]["sampling"]["label"].endswith("tick support")
    allowed = tokenizer.tick_support()
    n_classes = allowed.shape[0] - 1
    for row in out["rollouts"]:
        tokens = np.array(body["tokens"] + row["tokens"])
        move = tokenizer.field_indices(tokens)["move"]
        classes = MoveMemory(int(tokenizer.config["tick_window"]), n_classes, 0).tick_classes(
            move_ranks(move, tokenizer.move.n_neg, n_classes),
            np.zeros(len(tokens), dtype=np.int64), tokens == tokenizer.seg_id)
        new = slice(len(body["tokens"]), None)
        events = tokens[new] < tokenizer.n_event_tokens
        assert allowed[classes[new][events], tokens[new][events]].all()
