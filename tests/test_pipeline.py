"""The whole pipeline from one config: every artifact, skip-if-done, resume, ablation."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from mega_trading.core.config import to_dict
from mega_trading.core.lineage import write_json_atomic
from mega_trading.pipeline import RunConfig, run_pipeline, with_overrides

TINY = [
    "prepare.block_size=32", "prepare.stride=16", "prepare.workers=1",
    "train.steps=4", "train.batch_size=4", "train.block_size=32", "train.eval_every=2",
    "train.eval_batches=1", "train.log_every=1", "train.ckpt_every=2", "train.tracking=none",
    "train.warmup_steps=1", "train.device=cpu",
    "train.model={n_layer: 1, d_model: 32, n_head: 4, n_kv_head: 2, ffn_hidden: 64}",
    "generate.n=4", "generate.length=24", "generate.prompt_length=16", "generate.rollouts_per_prompt=2",
    "facts.n_boot=10", "facts.min_events=10", "facts.realism_boot=5",
    "sampling_search.n=4", "sampling_search.length=24", "sampling_search.prompt_length=16",
    "sampling_search.rollouts_per_prompt=2", "sampling_search.truncations=[none, min_p]",
    "calibrate.max_positions=500",
    "simulate.scenario.episodes=2", "simulate.scenario.prompt_length=16", "simulate.scenario.max_events=200",
    "simulate.scenario.bootstrap_samples=50", "simulate.horizon_s=2",
]


def tiny_config(run_dir) -> RunConfig:
    return with_overrides(RunConfig(), [f"run_dir={run_dir}", *TINY])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("pipe") / "run")
    summary = run_pipeline(cfg)
    return cfg, summary


def test_every_stage_runs_and_writes_its_artifact(finished):
    cfg, summary = finished
    assert list(summary) == ["prepare", "train", "calibrate", "sampling", "backtest", "generate",
                             "facts", "simulate", "report"]
    assert all(s["status"] == "ran" for s in summary.values())
    run = cfg.run_path
    for name in ("backtest.json", "rollouts.parquet", "facts.json", "simulate.json", "report.html",
                 "pipeline.yaml", "data/manifest.json", "calibration.json", "sampling.json"):
        assert (run / name).is_file(), name
    # the sampling stage chose on validation, and every later output says what it used
    chosen = json.loads((run / "sampling.json").read_text())
    assert chosen["split"] == "validation" and len(chosen["grid"]) in (4, 8)  # x tick support off / on
    assert chosen["score"] == min(c["geo_mean_ratio"] for c in chosen["grid"]
                                  if c["geo_mean_ratio"] is not None)
    facts = json.loads((run / "facts.json").read_text())
    assert facts["sampling"]["source"] == "measured" and facts["sampling"]["label"] == chosen["label"]
    assert "model" in facts["realism"]["sources"]
    simulated = json.loads((run / "simulate.json").read_text())
    assert simulated["sampling"]["source"] == "measured"
    assert simulated["sampling"]["settings"]["forbid_seg"] is True
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["after"]["nll_nats"] <= calibration["before"]["nll_nats"] + 1e-9
    assert chosen["fitted_temperature"] == pytest.approx(calibration["temperature"], abs=1e-3)
    assert "facts within 1.5x noise floor" in (run / "report.html").read_text()
    backtest = json.loads((run / "backtest.json").read_text())
    assert set(backtest["baselines"]) == {"uniform", "unigram", "copy_previous", "markov1", "markov3"}


def test_rerun_skips_finished_stages(finished):
    cfg, _ = finished
    summary = run_pipeline(cfg)
    assert all(s["status"] == "skipped" for s in summary.values())


def test_a_changed_setting_reruns_only_what_depends_on_it(finished):
    cfg, _ = finished
    summary = run_pipeline(with_overrides(cfg, ["generate.seed=7"]))
    status = {name: s["status"] for name, s in summary.items()}
    assert status["prepare"] == status["train"] == status["backtest"] == status["simulate"] == "skipped"
    assert status["calibrate"] == status["sampling"] == "skipped"
    assert status["generate"] == status["facts"] == status["report"] == "ran"


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path):
    """A crash after a checkpoint: the re-run resumes training instead of starting over."""
    from mega_trading.model.checkpoint import latest_step

    cfg = tiny_config(tmp_path / "run")
    crashing = with_overrides(cfg, ["train.steps=2"])  # stands for a run killed at step 2
    run_pipeline(crashing)
    # Make the run look like the 4-step run killed after its step-2 checkpoint: its
    # "started" stamp names the full config, and the stage never stamped itself done.
    manifest_hash = json.loads((cfg.data_path / "manifest.json").read_text())["manifest_hash"]
    write_json_atomic(cfg.run_path / ".stages" / "train.started.json",
                      {"manifest": manifest_hash, "train": to_dict(cfg.train)})
    (cfg.run_path / ".stages" / "train.json").unlink()
    assert latest_step(cfg.run_path) == 2
    summary = run_pipeline(cfg)
    assert summary["prepare"]["status"] == "skipped" and summary["train"]["status"] == "ran"
    assert latest_step(cfg.run_path) == 4
    steps = [json.loads(line)["step"] for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps))  # resumed: no step was trained twice


def test_force_redoes_everything(finished):
    cfg, _ = finished
    output = io.StringIO()
    summary = run_pipeline(with_overrides(cfg, ["simulate.enabled=false"]), force=True,
                           console=Console(file=output, width=200))
    assert "simulate" not in summary and all(s["status"] == "ran" for s in summary.values())
    assert "resumed from checkpoint" not in output.getvalue()  # trained again from step 0
    records = [json.loads(line) for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and steps


def test_ablation_grid_writes_table_chart_and_mlflow_runs(tmp_path):
    import mlflow

    from mega_trading.ablation import AblationConfig, run_ablation
    from mega_trading.core.config import dump_yaml

    base = tmp_path / "base.yaml"
    base.write_text(dump_yaml(tiny_config(tmp_path / "unused")))
    cfg = AblationConfig(base_config=str(base), out_dir=str(tmp_path / "abl"),
                         models=("micro:n_layer=1,d_model=32,n_head=4,n_kv_head=2,ffn_hidden=64",),
                         symbol_sets=("BTCUSDT", "BTCUSDT,ETHUSDT"), steps=(2,), tracking="mlflow")
    rows = run_ablation(cfg)
    assert [r["symbols"] for r in rows] == ["BTCUSDT", "BTCUSDT,ETHUSDT"]
    assert all(r["sampling"] == "measured" and r["n_facts"] == 11 and r["geo"] > 0 for r in rows)
    assert all(r["model_nll"] > 0 and r["markov3_nll"] > 0 for r in rows)
    out = tmp_path / "abl"
    assert (out / "ablation.csv").read_text().count("\n") == 3
    assert "plotly" in (out / "ablation.html").read_text()[:5000].lower()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("ablation")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["symbols"] for r in runs) == ["BTCUSDT", "BTCUSDT,ETHUSDT"]
    assert all("model_nll" in r.data.metrics for r in runs)


def test_realism_ablation_adds_contexts_early_stopping_and_sampling_variants(tmp_path):
    from mega_trading.ablation import AblationConfig, run_ablation
    from mega_trading.core.config import dump_yaml

    base = tmp_path / "base.yaml"
    base.write_text(dump_yaml(tiny_config(tmp_path / "unused")))
    cfg = AblationConfig(base_config=str(base), out_dir=str(tmp_path / "abl"),
                         models=("micro:n_layer=1,d_model=32,n_head=4,n_kv_head=2,ffn_hidden=64",),
                         symbol_sets=("BTCUSDT",), contexts=(32,), steps=(4,),
                         early_stop_patience=5, samplings=("measured", "top_k=16"), tracking="none")
    rows = run_ablation(cfg)
    assert [r["sampling"] for r in rows] == ["measured", "top_k=16"]
    assert rows[1]["sampling_label"] == "T=1, top-k 16" and rows[0]["sampling_label"] != rows[1]["sampling_label"]
    assert all(r["context"] == 32 and r["model_nll"] == rows[0]["model_nll"] for r in rows)
    assert all(r["best_step"] is not None and len(r["geo_ci95"]) == 2 for r in rows)
    out = tmp_path / "abl"
    assert (out / "ablation.csv").read_text().count("\n") == 3
    assert "realism" in (out / "ablation.html").read_text()
