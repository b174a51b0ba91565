"""What `--config FILE` and `--set key=value` mean for each command, and `config show`.

Every command resolves its settings the same way (`command_config`): the command's config
class defaults < the YAML file < the flags given on the command line < ``--set``
overrides. A flag left unset means "the config's value", so no command restates a
default. The file mirrors the command's config class (`COMMANDS`), or it is a pipeline
file (`RunConfig`, e.g. configs/demo.yaml): then the whole file is checked and the
command takes its own section (``train:`` for train, ``simulate.scenario`` for simulate).

Config classes are named by import path so that `mega-trading --help` imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mega_trading.core.config import config_dataclass, dump_yaml, load_config, read_yaml_mapping
from mega_trading.core.errors import ConfigError


# --- settings of the commands whose core takes plain arguments -----------------------------------
@config_dataclass
class IngestOptions:
    symbol: str | None = None  # None: read from each file name
    kind: str | None = None  # trades or aggTrades; None: detected
    market: str | None = None  # spot or um; None: detected


@config_dataclass
class ExportOptions:
    step: int | None = None  # checkpoint step; None: the latest


@config_dataclass
class ReportOptions:
    data: str | None = None  # prepared data dir; None: the one in RUN/config.json
    out: str | None = None  # HTML file; None: RUN/report.html


@config_dataclass
class BookOptions:
    facts: bool = True  # also compute the order-book facts


# command -> (config class "module:Class", its section in a pipeline YAML or None)
COMMANDS: dict[str, tuple[str, str | None]] = {
    "download": ("mega_trading.data.ingest.download:DownloadConfig", None),
    "ingest": ("mega_trading.cli.config:IngestOptions", None),
    "prepare": ("mega_trading.data.prepare:PrepareConfig", "prepare"),
    "train": ("mega_trading.train.config:TrainConfig", "train"),
    "export-hf": ("mega_trading.cli.config:ExportOptions", None),
    "backtest": ("mega_trading.eval.backtest:BacktestConfig", "backtest"),
    "generate": ("mega_trading.generation.generate:GenerateConfig", "generate"),
    "facts": ("mega_trading.eval.statistics:FactsConfig", "facts"),
    "report": ("mega_trading.cli.config:ReportOptions", None),
    "run": ("mega_trading.pipeline:RunConfig", ""),
    "ablate": ("mega_trading.ablation:AblationConfig", None),
    "serve": ("mega_trading.serve.schemas:ServeSettings", None),
    "simulate": ("mega_trading.simulate.config:SimConfig", "simulate.scenario"),
    "book": ("mega_trading.cli.config:BookOptions", None),
    "record": ("mega_trading.book.record:RecordConfig", None),
}


# Where a command's defaults differ from its class's: the facts command (and the pipeline)
# flag degenerate sources instead of raising; record listens to spot unless told otherwise.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "facts": {"on_degenerate": "flag"},
    "record": {"market": "spot"},
}


def config_class(command: str) -> type:
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; one of {', '.join(sorted(COMMANDS))}")
    module, _, name = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), name)


def _is_pipeline_file(data: Mapping[str, Any], cls: type) -> bool:
    from mega_trading.pipeline import RunConfig

    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    own_keys = {f.name for f in dataclasses.fields(cls)}
    return cls is not RunConfig and bool(data) and set(data) <= run_keys and not set(data) <= own_keys


def _section(run_cfg: Any, path: str) -> Any:
    value = run_cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def command_config(command: str, config_file: str | Path | None = None,
                   overrides: Iterable[str] = (), *, flags: Mapping[str, Any] | None = None,
                   base: Any = None) -> Any:
    """The resolved config of `command`: defaults (or `base`) < file < flags < overrides."""
    cls = config_class(command)
    if base is None:
        base = COMMAND_DEFAULTS.get(command)
    section = COMMANDS[command][1]
    if config_file is not None and _is_pipeline_file(read_yaml_mapping(config_file), cls):
        if not section:
            raise ConfigError(f"{config_file} is a pipeline config (RunConfig); `{command}` "
                              f"takes a YAML mirroring {cls.__name__}")
        from mega_trading.pipeline import RunConfig

        run_cfg = load_config(RunConfig, config_file)  # the whole file is checked
        base, config_file = _section(run_cfg, section), None
    return load_config(cls, config_file, list(overrides), base=base, flags=flags)


# --- config show ----------------------------------------------------------------------------------

def derived_numbers(command: str, cfg: Any) -> dict[str, Any]:
    """Numbers that follow from the settings (what a run will do), for `config show`."""
    from mega_trading.model.transformer import PRESETS, ModelConfig

    out: dict[str, Any] = {}
    if command == "run":
        out["data_dir"] = str(cfg.data_path)
        out["block_size"] = cfg.prepare.block_size
        train = cfg.train
    elif command == "train":
        train = cfg
    elif command == "prepare":
        out["block_size"] = cfg.block_size
        out["gap_events"] = cfg.gap
        return out
    else:
        return out
    block = train.block_size or out.get("block_size")
    if train.preset in PRESETS:
        model = {**PRESETS[train.preset], **train.model}
        model.pop("block_size", None)
        hidden = ModelConfig(vocab_size=1, **model).n_params(include_embeddings=False)
        out["model"] = {**model, "n_params_hidden": hidden}  # embeddings: vocab x d_model more
    if block is None:
        out["block_size"] = "from the data (prepare.block_size in its manifest)"
        out["windows_per_step"] = train.batch_size * train.grad_accum
        return out
    out["block_size"] = block
    tokens_per_step = train.batch_size * train.grad_accum * block
    out["tokens_per_step"] = tokens_per_step
    out["train_tokens"] = tokens_per_step * train.steps
    out["warmup_fraction"] = round(train.warmup_steps / train.steps, 4)
    if command == "run":
        gen = cfg.generate
        out["generate_new_tokens"] = gen.n * gen.length
        out["generate_prompts"] = -(-gen.n // gen.rollouts_per_prompt)
    return out


def show(command: str, cfg: Any) -> str:
    """The resolved config as YAML (usable as --config), derived numbers as comments."""
    text = f"# mega-trading {command}: resolved config ({type(cfg).__name__})\n" + dump_yaml(cfg)
    derived = derived_numbers(command, cfg)
    if derived:
        import yaml

        lines = yaml.safe_dump({"derived": derived}, sort_keys=False).splitlines()
        text += "# --- derived from the settings above (not settings) ---\n"
        text += "".join(f"# {line}\n" for line in lines)
    return text

