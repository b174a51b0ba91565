"""The whole pipeline from one YAML config: prepare -> train -> calibrate -> sampling ->
backtest -> generate -> facts -> simulate -> report.

``calibrate`` fits one temperature on the validation split (RUN/calibration.json);
``sampling`` chooses the sampling defaults by a realism score on the validation split
(RUN/sampling.json), which generate, facts and simulate then use unless the config sets
sampling explicitly.

Each stage is skipped when its output already exists for the same inputs and config (see
`stages.py`), so a re-run after a crash continues where it stopped; training itself resumes
from its last checkpoint. ``force=True`` redoes every stage.
"""

from __future__ import annotations

import shutil
from dataclasses import field, replace
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from rich.console import Console

from mega_trading.core.config import (
    NonNegativeFloat,
    PositiveFloat,
    apply_overrides,
    config_dataclass,
    dump_yaml,
    load_config,
    to_dict,
)
from mega_trading.core.lineage import read_json, sha256_file, write_json_atomic, write_text_atomic
from mega_trading.core.stages import Stage, code_identity, run_stages, stamp_path
from mega_trading.data.bundled import resolve_input, sample_files
from mega_trading.data.parts import expand_inputs
from mega_trading.data.prepare import PrepareConfig, prepare
from mega_trading.data.shards import ShardSet
from mega_trading.eval.backtest import BacktestConfig, resolve_device, run_backtest
from mega_trading.eval.calibrate import CalibrateConfig, run_calibration
from mega_trading.eval.sampling_search import SamplingSearchConfig, run_sampling_search
from mega_trading.eval.scorecard import run_facts
from mega_trading.eval.statistics import FactsConfig
from mega_trading.generation.generate import GenerateConfig
from mega_trading.generation.sampling import resolve_sampling
from mega_trading.model.checkpoint import checkpoints_dir, latest_step, load_model, step_dir_name
from mega_trading.report import build_report
from mega_trading.simulate import SimConfig, policy_configs, run_simulation
from mega_trading.train.config import TrainConfig, check_block_size
from mega_trading.train.loop import train


@config_dataclass
class SimulateStage:
    """Closed-loop execution episodes on the trained model (`simulate/`)."""

    enabled: bool = True
    policies: tuple[Literal["immediate", "twap", "twap_limit", "participation"], ...] = (
        "immediate", "twap", "participation")
    side: Literal["buy", "sell"] = "buy"
    qty: PositiveFloat = 0.05  # base units
    horizon_s: NonNegativeFloat = 30.0
    seed: int = 0
    scenario: SimConfig = field(default_factory=lambda: SimConfig(symbol="BTCUSDT", episodes=16))


@config_dataclass
class RunConfig:
    run_dir: str = "runs/demo"
    data_dir: str = ""  # default: <run_dir>/data
    inputs: tuple[str, ...] = ()  # trade files or folders (or bundled:sample, bundled:demo); default: the bundled real sample
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    sampling_search: SamplingSearchConfig = field(default_factory=SamplingSearchConfig)
    backtest: BacktestConfig = field(default_factory=BacktestConfig)
    backtest_split: Literal["validation", "backtest"] = "backtest"
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    facts: FactsConfig = field(default_factory=lambda: FactsConfig(on_degenerate="flag"))
    simulate: SimulateStage = field(default_factory=SimulateStage)

    @model_validator(mode="after")
    def _one_block_size(self) -> RunConfig:
        """prepare.block_size is the run's one block_size; train may only repeat it."""
        for name, value in (("train.block_size", self.train.block_size),
                            ("train.model.block_size", self.train.model.get("block_size"))):
            check_block_size(name, value, self.prepare.block_size, "prepare.block_size")
        for name, length in (("generate.prompt_length", self.generate.prompt_length),
                             ("simulate.scenario.prompt_length", self.simulate.scenario.prompt_length)):
            if length > self.prepare.block_size:  # a prompt must fit the model's context
                raise ValueError(f"{name}={length} exceeds the run's block_size "
                                 f"(prepare.block_size={self.prepare.block_size})")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else self.run_path / "data"


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return load_config(RunConfig, path, overrides)


def _input_files(cfg: RunConfig) -> list[Path]:

    if cfg.inputs:
        return expand_inputs([resolve_input(item) for item in cfg.inputs])
    return sample_files(cfg.prepare.kind)


def _checkpoint_identity(run_dir: Path) -> dict:

    step = latest_step(run_dir)
    if step is None:
        return {"step": None}
    weights = checkpoints_dir(run_dir) / step_dir_name(step) / "model.safetensors"
    return {"step": step, "weights_sha256": sha256_file(weights)}


def _file_identity(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


# The modules that implement each stage: a change to their source reruns it (stages.py).
STAGE_SOURCES = {
    "prepare": ("mega_trading.data.ingest", "mega_trading.data.events", "mega_trading.data.tokenizer", "mega_trading.data.field_bins",
                "mega_trading.data.binning", "mega_trading.data.windows", "mega_trading.data.shards",
                "mega_trading.data.parts", "mega_trading.data.prepare"),
    "train": ("mega_trading.model.transformer", "mega_trading.model.kernels", "mega_trading.train.accel",
              "mega_trading.train.optim", "mega_trading.train.config", "mega_trading.train.loss",
              "mega_trading.train.metrics", "mega_trading.train.loop", "mega_trading.model.checkpoint",
              "mega_trading.train.distributed"),
    "calibrate": ("mega_trading.eval.calibrate", "mega_trading.model.transformer", "mega_trading.model.checkpoint"),
    "sampling": ("mega_trading.eval.sampling_search", "mega_trading.generation.sampling", "mega_trading.eval.realism",
                 "mega_trading.eval.statistics", "mega_trading.eval.facts",
                 "mega_trading.eval.distances", "mega_trading.eval.scorecard", "mega_trading.generation.generate", "mega_trading.generation.rollouts", "mega_trading.data.tokenizer", "mega_trading.data.field_bins",
                 "mega_trading.data.binning"),
    "backtest": ("mega_trading.eval.baselines", "mega_trading.eval.scoring", "mega_trading.eval.backtest",
                 "mega_trading.model.transformer", "mega_trading.model.checkpoint"),
    "generate": ("mega_trading.generation.generate", "mega_trading.generation.rollouts", "mega_trading.generation.engine", "mega_trading.model.decode", "mega_trading.model.transformer",
                 "mega_trading.model.kernels", "mega_trading.data.tokenizer", "mega_trading.data.field_bins", "mega_trading.data.binning",
                 "mega_trading.generation.sampling"),
    "facts": ("mega_trading.eval.statistics", "mega_trading.eval.facts",
                 "mega_trading.eval.distances", "mega_trading.eval.scorecard", "mega_trading.eval.hawkes", "mega_trading.eval.baselines",
              "mega_trading.generation.generate", "mega_trading.generation.rollouts", "mega_trading.eval.realism"),
    "simulate": ("mega_trading.simulate", "mega_trading.generation.generate", "mega_trading.generation.rollouts", "mega_trading.model.decode",
                 "mega_trading.model.transformer", "mega_trading.generation.sampling", "mega_trading.data.binning"),
    "report": ("mega_trading.report",),
}


def build_stages(cfg: RunConfig, console: Console) -> list[Stage]:
    run, data = cfg.run_path, cfg.data_path
    files = _input_files(cfg)

    def manifest_hash() -> str | None:
        manifest = data / "manifest.json"
        return read_json(manifest)["manifest_hash"] if manifest.is_file() else None

    def do_prepare() -> None:

        prepare(files, data, cfg.prepare, show_progress=True)

    def do_train() -> None:

        # Same data and config as an interrupted run: resume it; anything else starts over.
        stale = stamp_path(run, "train.started")
        key = {"manifest": manifest_hash(), "train": to_dict(cfg.train),
               "code": code_identity(STAGE_SOURCES["train"])}  # new code: start over
        resumable = stale.is_file() and read_json(stale) == key and (run / "checkpoints" / "latest").is_file()
        if not resumable:
            for old in ("checkpoints", "metrics.jsonl", "config.json"):
                target = run / old
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()

            write_json_atomic(stale, key)
        train(data, run, cfg.train, resume=resumable, show_progress=True, log=console.print)

    def do_calibrate() -> None:

        run_calibration(run, data, cfg.calibrate, device=resolve_device(cfg.train.device),
                        log=console.print)

    def do_sampling() -> None:

        run_sampling_search(run, data, cfg.sampling_search, cfg.generate, cfg.facts,
                            device=resolve_device(cfg.train.device), log=console.print)

    def do_backtest() -> None:

        run_backtest(run, data, cfg.backtest_split, None, cfg.backtest, log=console.print)

    def do_generate() -> None:
        from mega_trading.generation.generate import generate_rollouts, rollout_lineage
        from mega_trading.generation.rollouts import write_rollouts

        shards = ShardSet.open(data)
        model, state = load_model(run, expect_tokenizer_hash=shards.tokenizer_hash,
                                  expect_manifest_hash=shards.model_manifest_hash)
        sampling, sampling_info = resolve_sampling(cfg.generate.sampling, run)
        console.print(f"generate: sampling {sampling_info['label']} ({sampling_info['source']})")
        events, prompts = generate_rollouts(model, shards, cfg.generate, sampling=sampling)
        write_rollouts(events, run / "rollouts.parquet",
                       rollout_lineage(cfg.generate, shards, prompts, run=str(run), step=state.get("step"),
                                       sampling=sampling_info))

    def do_facts() -> None:

        run_facts(data, run / "rollouts.parquet", run / "facts.json", cfg.facts, cfg.generate.seed,
                  gen_cfg=cfg.generate)

    def do_simulate() -> None:

        sim = cfg.simulate
        policies = policy_configs(",".join(sim.policies), side=sim.side, qty=sim.qty, horizon_s=sim.horizon_s)
        run_simulation(data, policies, sim.scenario, seed=sim.seed, run_dir=run,
                       device=resolve_device(cfg.train.device),
                       out=run / "simulate.json", log=console.print)

    def do_report() -> None:

        path = build_report(run, data, run / "report.html", log=console.print)
        console.print(f"[bold green]report:[/] {path.resolve()}")

    artifacts = ("backtest.json", "rollouts.parquet", "facts.json", "simulate.json",
                 "calibration.json", "sampling.json")
    stages = [
        Stage("prepare", do_prepare, (data / "manifest.json",),
              lambda: {"inputs": [sha256_file(f) for f in files], "prepare": _hashable(cfg.prepare)}),
        Stage("train", do_train, (run / "checkpoints" / "latest",),
              lambda: {"manifest": manifest_hash(), "train": to_dict(cfg.train)}),
    ]
    if cfg.calibrate.enabled:
        stages.append(Stage("calibrate", do_calibrate, (run / "calibration.json",),
                            lambda: {"model": _checkpoint_identity(run), "manifest": manifest_hash(),
                                     "calibrate": to_dict(cfg.calibrate)}))
    if cfg.sampling_search.enabled:
        stages.append(Stage("sampling", do_sampling, (run / "sampling.json",),
                            lambda: {"model": _checkpoint_identity(run), "manifest": manifest_hash(),
                                     "calibration": _file_identity(run / "calibration.json"),
                                     "search": to_dict(cfg.sampling_search), "facts": to_dict(cfg.facts)}))
    stages += [
        Stage("backtest", do_backtest, (run / "backtest.json",),
              lambda: {"model": _checkpoint_identity(run), "manifest": manifest_hash(),
                       "split": cfg.backtest_split, "backtest": to_dict(cfg.backtest),
                       "calibration": _file_identity(run / "calibration.json")}),
        Stage("generate", do_generate, (run / "rollouts.parquet",),
              lambda: {"model": _checkpoint_identity(run), "generate": to_dict(cfg.generate),
                       "sampling": _file_identity(run / "sampling.json")}),
        Stage("facts", do_facts, (run / "facts.json",),
              lambda: {"manifest": manifest_hash(), "rollouts": _file_identity(run / "rollouts.parquet"),
                       "facts": to_dict(cfg.facts)}),
    ]
    if cfg.simulate.enabled:
        stages.append(Stage("simulate", do_simulate, (run / "simulate.json",),
                            lambda: {"model": _checkpoint_identity(run), "simulate": to_dict(cfg.simulate),
                                     "sampling": _file_identity(run / "sampling.json")}))
    stages.append(Stage("report", do_report, (run / "report.html",),
                        lambda: {name: _file_identity(run / name) for name in (*artifacts, "metrics.jsonl")}))
    return [replace(stage, sources=STAGE_SOURCES[stage.name]) for stage in stages]


def _hashable(cfg) -> dict:
    data = to_dict(cfg)
    data.pop("workers", None)  # how fast, not what
    return data


def run_pipeline(cfg: RunConfig, force: bool = False, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    cfg.run_path.mkdir(parents=True, exist_ok=True)

    write_text_atomic(cfg.run_path / "pipeline.yaml", dump_yaml(cfg))
    if force:  # training starts over too, rather than resuming a finished run
        stamp_path(cfg.run_path, "train.started").unlink(missing_ok=True)
    return run_stages(cfg.run_path, build_stages(cfg, console), force=force, console=console)


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    return apply_overrides(cfg, overrides)
