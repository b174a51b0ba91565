"""Training loop: schedule, config, learning on the real sample, guards, tracking, run folder."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from mega_trading.core.config import apply_overrides, from_dict
from mega_trading.core.errors import ConfigError
from mega_trading.data.shards import ShardSet
from mega_trading.train.config import NonFiniteLossError, TrainConfig, lr_scale, resolve_config
from mega_trading.train.loop import train

TINY = {"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1, "ffn_hidden": 64}


def tiny_config(**changes) -> TrainConfig:
    base = {"model": TINY, "block_size": 32, "batch_size": 8, "steps": 6, "warmup_steps": 2,
            "log_every": 1, "eval_every": 3, "eval_batches": 2, "ckpt_every": 3, "tracking": "none"}
    return from_dict(TrainConfig, {**base, **changes})


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
    return tiny_data_dir


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    scales = [lr_scale(s, cfg) for s in range(cfg.steps)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(scales[:10]))  # linear warmup
    assert all(a >= b for a, b in itertools.pairwise(scales[9:]))  # monotone cosine decay
    assert scales[-1] == pytest.approx(0.1) and min(scales) >= 0.1 - 1e-12
    midpoint = 10 + (cfg.steps - 1 - 10) // 2
    assert lr_scale(midpoint, cfg) == pytest.approx(0.55, abs=0.02)
    assert lr_scale(5, TrainConfig(steps=10, warmup_steps=0, min_lr_ratio=1.0)) == 1.0


def test_config_overrides_are_dotted_and_checked(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["model.n_layer=2", "steps=7", "lr=1e-3"])
    assert cfg.model == {"n_layer": 2} and cfg.steps == 7 and cfg.lr == 1e-3
    with pytest.raises(ConfigError, match="bogus"):
        apply_overrides(TrainConfig(), ["bogus=1"])
    with pytest.raises(ConfigError, match="model.bogus"):
        apply_overrides(TrainConfig(), ["model.bogus=1"])
    with pytest.raises(ConfigError, match="tokenizer"):
        TrainConfig(model={"vocab_size": 10})
    with pytest.raises(ConfigError):
        TrainConfig(min_lr_ratio=2.0)
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("steps: 11\nmodel:\n  d_model: 64\ntracking: none\n")
    cfg, data = resolve_config(tmp_path / "run", config_file=yaml_file, flags={"steps": 12},
                               overrides=["model.n_layer=3"], data_dir=tmp_path)
    assert (cfg.steps, cfg.tracking, cfg.model) == (12, "none", {"d_model": 64, "n_layer": 3})
    assert data == tmp_path
    with pytest.raises(ConfigError, match="data"):
        resolve_config(tmp_path / "run")


def test_short_run_learns_beats_unigram_and_sees_every_symbol(tmp_path, data_dir):
    run = tmp_path / "run"
    cfg = tiny_config(steps=300, warmup_steps=20, log_every=50, eval_every=100, eval_batches=4,
                      ckpt_every=0)
    summary = train(data_dir, run, cfg, log=quiet)
    shards = ShardSet.open(data_dir)
    # Baseline: cross-entropy of validation tokens under the add-one unigram of train tokens.
    counts = np.ones(shards.vocab_size)
    for symbol in shards.symbols("train"):
        counts += np.bincount(shards.tokens("train", symbol), minlength=shards.vocab_size)
    log_p = np.log(counts / counts.sum())
    val = np.concatenate([shards.tokens("validation", s) for s in shards.symbols("validation")])
    unigram = float(-log_p[val.astype(np.int64)].mean())
    assert summary["initial_val_loss"] > math.log(shards.vocab_size) - 0.5  # near uniform
    assert summary["val_loss"] < unigram - 0.3, (summary["val_loss"], unigram)
    assert summary["windows_seen"]["BTCUSDT"] > 0 and summary["windows_seen"]["ETHUSDT"] > 0
    assert sum(summary["windows_seen"].values()) == 300 * cfg.batch_size
    # The run folder: config with hashes, the data's tokenizer, metrics, final checkpoint.
    saved = json.loads((run / "config.json").read_text())
    assert saved["tokenizer_hash"] == shards.tokenizer_hash
    assert saved["manifest_hash"] == shards.manifest_hash
    assert saved["model"]["vocab_size"] == shards.vocab_size
    assert saved["derived"]["tokens_per_step"] == cfg.batch_size * 32
    assert (run / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 50, 100, 150, 200, 250, 300]
    assert all(r["tok_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records[1:])
    assert summary["checkpoint_step"] == 300
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000300"


def test_optimizer_state_holds_every_parameter_exactly_once(tmp_path, data_dir):
    from mega_trading.model.checkpoint import load_model

    run = tmp_path / "run"
    train(data_dir, run, tiny_config(steps=2), log=quiet)
    model, _ = load_model(run)
    optimizer_state = torch.load(run / "checkpoints" / "step_000002" / "optimizer.pt",
                                 weights_only=True)
    names = [n for group in optimizer_state["param_groups"] for n in group["params"]]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()}  # a tied weight counts once
    matrices = next(g for g in optimizer_state["param_groups"] if g["name"] == "matrix")
    assert "tok_embeddings.weight" not in matrices["params"]
    assert all(name.endswith("weight") and "norm" not in name for name in matrices["params"])


def test_non_finite_loss_stops_and_names_the_step(tmp_path, data_dir):
    from mega_trading.model.checkpoint import latest_step, load_model

    run = tmp_path / "run"
    cfg = tiny_config(steps=20, lr=1e6, muon_lr=1e6, warmup_steps=0, grad_clip=0.0, ckpt_every=1)
    with pytest.raises(NonFiniteLossError, match=r"diverged at step \d+") as info:
        train(data_dir, run, cfg, log=quiet)
    failed_at = int(re.search(r"diverged at step (\d+)", str(info.value)).group(1))
    assert 1 < failed_at < 20
    # The bad update was never applied: the last checkpoint is the step before, all finite.
    assert latest_step(run) == failed_at - 1
    assert f"last checkpoint: step {failed_at - 1}" in str(info.value)
    model, _ = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_refuses_to_overwrite_a_run_and_to_resume_with_another_config(tmp_path, data_dir):
    run = tmp_path / "run"
    train(data_dir, run, tiny_config(steps=3), log=quiet)
    with pytest.raises(ConfigError, match="--resume"):
        train(data_dir, run, tiny_config(steps=3), log=quiet)
    with pytest.raises(ConfigError, match="lr"):
        train(data_dir, run, tiny_config(steps=6, lr=1e-2), resume=True, log=quiet)
    summary = train(data_dir, run, tiny_config(steps=6), resume=True, log=quiet)
    assert summary["resumed_from"] == 3 and summary["checkpoint_step"] == 6


def test_cli_rejects_unknown_override(tmp_path, data_dir, capsys):
    from mega_trading.cli import main

    code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                 "--tracking", "none", "no_such_key=1"])
    assert code == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mlflow_store_in_run_folder_is_readable(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    from mega_trading.train.tracking import tracking_uri

    run = tmp_path / "run"
    train(data_dir, run, tiny_config(steps=3, tracking="mlflow"), log=quiet)
    assert (run / "mlruns.db").is_file()
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=tracking_uri(run))
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    expected = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    assert [s for s, _ in history] == [1, 2, 3]
    assert np.allclose([v for _, v in history], [v for _, v in expected])
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.steps"] == "3" and mlrun.data.params["model.n_layer"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "tokenizer.json", "train_summary.json"} <= artifacts
    assert (run / "mlartifacts").is_dir()


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_matches_eager_on_cpu(data_dir, tmp_path):
    """compile=true takes model + loss as one torch.compile graph (one process); it must
    train exactly like eager, step for step, within float rounding."""
    runs = {}
    for mode in (False, True):
        out = tmp_path / f"compile-{mode}"
        train(data_dir, out, tiny_config(compile=mode, steps=3, eval_every=3, ckpt_every=0),
              log=quiet)
        runs[mode] = read_metrics(out)
    for key in ("loss", "val_loss"):
        eager = [(r["step"], r[key]) for r in runs[False] if key in r]
        compiled = [(r["step"], r[key]) for r in runs[True] if key in r]
        assert [s for s, _ in eager] == [s for s, _ in compiled] and len(eager) >= 2
        for (_, a), (_, b) in zip(eager, compiled):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-5), key


def test_cpu_utilization_is_measured_against_the_peak_of_the_autocast_dtype(monkeypatch):
    """bf16 matmuls run 2x or more faster than float32 on CPUs with AVX512-BF16 / AMX:
    MFU against the float32 peak would overstate a bf16 run's utilization."""
    from mega_trading.train import metrics as train_module
    monkeypatch.setattr(train_module, "_measured_cpu_flops", {})
    seen = []
    real_mm = torch.mm

    def recording_mm(a, b, *args, **kwargs):
        seen.append(a.dtype)
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    cpu = torch.device("cpu")
    fp32_peak, fp32_source = train_module.peak_flops(cpu, None)
    assert set(seen) == {torch.float32} and "float32" in fp32_source
    seen.clear()
    bf16_peak, bf16_source = train_module.peak_flops(cpu, torch.bfloat16)
    assert set(seen) == {torch.bfloat16} and "bf16" in bf16_source
    assert fp32_peak > 0 and bf16_peak > 0


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, data_dir):
    # lr 0: the validation loss never improves after the first evaluation, so training
    # stops after `patience` more evaluations and `latest` names the first one
    frozen = tiny_config(steps=30, lr=0.0, muon_lr=0.0, early_stop_patience=2)
    summary = train(data_dir, tmp_path / "frozen", frozen, log=quiet)
    assert summary["early_stop"]["stopped_at"] == 9
    assert summary["early_stop"]["best"]["step"] == 3
    assert (tmp_path / "frozen" / "checkpoints" / "latest").read_text().strip() == "step_000003"
    # learning: no early stop within budget, and `latest` is the step of the best validation
    learning = tiny_config(steps=12, early_stop_patience=10)
    summary = train(data_dir, tmp_path / "learning", learning, log=quiet)
    records = [r for r in read_metrics(tmp_path / "learning") if r["step"] > 0 and "val_loss" in r]
    best = min(records, key=lambda r: r["val_loss"])
    assert summary["early_stop"]["stopped_at"] is None
    assert summary["checkpoint_step"] == best["step"] == summary["early_stop"]["best"]["step"]
    with pytest.raises(ConfigError, match="early_stop_patience"):
        tiny_config(early_stop_patience=-1)
