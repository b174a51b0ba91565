"""Config machinery: strict keys, typed dotted overrides, YAML mirrors, every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mega_trading.core.config import apply_overrides, from_dict, load_yaml, to_dict
from mega_trading.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_typed_and_strict():
    from mega_trading.pipeline import RunConfig

    cfg = apply_overrides(RunConfig(), ["train.steps=200", "prepare.splits=[0.7,0.2,0.1]",
                                        "generate.sampling.top_p=0.9", "train.model.n_layer=2"])
    assert cfg.train.steps == 200 and cfg.prepare.splits == (0.7, 0.2, 0.1)
    assert cfg.generate.sampling.top_p == 0.9 and cfg.train.model == {"n_layer": 2}
    with pytest.raises(ConfigError, match="train.stepz"):
        apply_overrides(RunConfig(), ["train.stepz=3"])
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(RunConfig(), ["train.steps=many"])


def test_overrides_never_mutate_the_original():
    from mega_trading.train.config import TrainConfig

    base = TrainConfig(model={"d_model": 32})
    changed = apply_overrides(base, ["model.d_model=64"])
    assert base.model == {"d_model": 32} and changed.model == {"d_model": 64}


def test_round_trip_through_dict():
    from mega_trading.pipeline import RunConfig

    cfg = RunConfig()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from mega_trading.ablation import AblationConfig
    from mega_trading.pipeline import RunConfig
    from mega_trading.simulate import SimConfig

    cls = {"scenarios": SimConfig}.get(
        path.parent.name, AblationConfig if path.name.startswith("ablation") else RunConfig)
    load_yaml(cls, path)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    from mega_trading.pipeline import RunConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.bogus"):
        load_yaml(RunConfig, bad)


# --- issue 18: typed configs with declared bounds, one loader, --config/--set everywhere ---------

EXEMPT_COMMANDS = {"version"}  # prints the version: nothing to configure


def _cli_commands():
    """(name, click command) for every command of the Typer app, sub-commands included."""
    import typer.main

    from mega_trading.cli import app

    def walk(command, prefix):
        for name, sub in getattr(command, "commands", {}).items():
            full = f"{prefix} {name}".strip()
            if getattr(sub, "commands", None):
                yield from walk(sub, full)
            else:
                yield full, sub

    return list(walk(typer.main.get_command(app), ""))


def test_every_command_takes_config_and_set():
    commands = _cli_commands()
    assert len(commands) >= 15  # a broken walk must not pass vacuously
    missing = []
    for name, command in commands:
        if name in EXEMPT_COMMANDS:
            continue
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        if not {"--config", "--set"} <= options:
            missing.append(name)
    assert not missing, f"commands without --config/--set: {missing}"


def test_every_command_has_a_config_class_that_rejects_unknown_keys(capsys):
    from mega_trading.cli import main
    from mega_trading.cli.config import COMMANDS

    names = {name for name, _ in _cli_commands()} - EXEMPT_COMMANDS - {"config show"}
    assert names == set(COMMANDS)  # a new command must say what its --config mirrors
    for name in sorted(COMMANDS):
        assert main(["config", "show", "--command", name, "--set", "no_such_key=1"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert "unknown config key 'no_such_key'" in err and "\n" not in err, (name, err)


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be <= 1"),
    ("generate.sampling.top_p=0", "generate.sampling.top_p must be > 0"),
    ("generate.sampling.temperature=-1", "generate.sampling.temperature must be >= 0"),
    ("simulate.scenario.vol_top_fraction=2", "simulate.scenario.vol_top_fraction must be <= 1"),
    ("prepare.block_size=1", "prepare.block_size must be >= 2, got 1"),
    ("prepare.tokenizer.dt_bins=1", "prepare.tokenizer.dt_bins must be >= 2"),
    ("facts.n_bins=1", "facts.n_bins must be >= 2"),
    ("train.liger=sometimes", "train.liger must be auto, true or false, got 'sometimes'"),
    ("generate.prompt_from=test", "generate.prompt_from must be one of"),
    ("prepare.splits=[0.5,0.6,0]", "splits must be three non-negative fractions summing to 1"),
])
def test_bounds_are_declared_and_errors_are_one_line(override, message):
    from mega_trading.pipeline import RunConfig

    with pytest.raises(ConfigError) as caught:
        apply_overrides(RunConfig(), [override])
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_direct_construction_checks_bounds_too():
    from mega_trading.serve.schemas import ServeSettings
    from mega_trading.simulate import PolicyConfig
    from mega_trading.train.config import TrainConfig

    with pytest.raises(ConfigError, match="steps must be >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="queue_timeout_s must be a finite number"):
        ServeSettings(queue_timeout_s=float("inf"))
    with pytest.raises(ConfigError, match="min_child_fraction=0.5 must be <= max_child_fraction=0.1"):
        PolicyConfig(min_child_fraction=0.5)
    assert TrainConfig(steps=3).steps == 3


def test_unknown_keys_rejected_top_level_and_nested(tmp_path):
    from mega_trading.pipeline import RunConfig

    for override, key in [("bogus=1", "bogus"), ("train.bogus=1", "train.bogus"),
                          ("generate.sampling.bogus=1", "generate.sampling.bogus"),
                          ("simulate.scenario.impact.bogus=1", "simulate.scenario.impact.bogus"),
                          ("train.model.bogus=1", "model.bogus")]:
        with pytest.raises(ConfigError, match=f"unknown config key.*'?{key}") as caught:
            apply_overrides(RunConfig(), [override])
        assert "\n" not in str(caught.value)
    bad = tmp_path / "nested.yaml"
    bad.write_text("prepare:\n  tokenizer:\n    size_binz: 3\n")
    with pytest.raises(ConfigError, match=r"nested.yaml: unknown config key 'prepare.tokenizer.size_binz'"):
        load_yaml(RunConfig, bad)


def test_dotted_overrides_nested_and_lists():
    from mega_trading.core.config import load_config
    from mega_trading.pipeline import RunConfig

    cfg = load_config(RunConfig, CONFIGS / "demo.yaml", [
        "simulate.scenario.impact.coef_bps=5", "simulate.policies=[twap,immediate]",
        "facts.event_horizons=[2,8]", "prepare.holdout_symbols=BTCUSDT,NEXOUSDT",
        "train.model.n_layer=2", "generate.sampling.forbid_seg=true"])
    assert cfg.simulate.scenario.impact.coef_bps == 5.0
    assert cfg.simulate.policies == ("twap", "immediate")
    assert cfg.facts.event_horizons == (2, 8)
    assert cfg.prepare.holdout_symbols == ("BTCUSDT", "NEXOUSDT")  # comma list
    assert cfg.train.model == {"n_layer": 2} and cfg.train.steps == 250  # file value kept
    # the demo leaves sampling to the run's measured choice: one dotted key makes an explicit
    # block from the built-in defaults (plain sampling)
    assert cfg.generate.sampling.forbid_seg is True and cfg.generate.sampling.top_k == 0


def test_loader_layers_defaults_file_flags_overrides(tmp_path):
    from mega_trading.core.config import load_config
    from mega_trading.generation.generate import GenerateConfig

    path = tmp_path / "gen.yaml"
    path.write_text("n: 4\nlength: 64\nsampling:\n  top_k: 4\n")
    cfg = load_config(GenerateConfig, path, ["length=32"], base={"seed": 9, "n": 2},
                      flags={"n": 8, "sampling.top_p": 0.5, "symbol": None})
    assert (cfg.seed, cfg.n, cfg.length) == (9, 8, 32)  # base < file < flags < overrides
    assert (cfg.sampling.top_k, cfg.sampling.top_p, cfg.symbol) == (4, 0.5, None)
    path.write_text("n: 0\n")
    with pytest.raises(ConfigError, match=r"gen.yaml: n must be >= 1, got 0"):
        load_config(GenerateConfig, path)


def test_train_has_no_yaml_reader_of_its_own():
    import inspect

    import mega_trading.train.loop as train_module

    source = inspect.getsource(train_module)
    assert "yaml" not in source  # the one loader is mega_trading.core.config.load_config


def test_block_size_disagreement_is_one_line_error_naming_both():
    from mega_trading.pipeline import RunConfig

    with pytest.raises(ConfigError) as caught:
        apply_overrides(RunConfig(), ["prepare.block_size=128", "train.block_size=256"])
    text = str(caught.value)
    assert "train.block_size=256" in text and "prepare.block_size=128" in text and "\n" not in text
    with pytest.raises(ConfigError, match=r"train.model.block_size=64 .*prepare.block_size=128"):
        apply_overrides(RunConfig(), ["prepare.block_size=128", "train.model.block_size=64"])
    same = apply_overrides(RunConfig(), ["prepare.block_size=128", "train.block_size=128"])
    assert same.train.block_size == 128  # repeating the one value is allowed
    with pytest.raises(ConfigError, match=r"generate.prompt_length=96 exceeds the run's block_size "
                                          r"\(prepare.block_size=64\)"):
        load_yaml(RunConfig, CONFIGS / "demo.yaml", ["prepare.block_size=64"])


def test_demo_sets_block_size_once():
    import yaml

    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert demo["prepare"]["block_size"] == 128
    assert "block_size" not in demo["train"] and "block_size" not in demo["train"].get("model", {})


def test_train_reads_block_size_from_the_data(tiny_data_dir, tmp_path):
    from mega_trading.data.shards import ShardSet
    from mega_trading.train.config import TrainConfig
    from mega_trading.train.loop import _model_config

    shards = ShardSet.open(tiny_data_dir)
    assert shards.block_size == 32
    cfg = _model_config(TrainConfig(preset="micro"), shards, log=lambda _: None)
    assert cfg.block_size == 32  # not the micro preset's 256
    with pytest.raises(ConfigError, match=r"train.block_size=64 disagrees with the data's block_size .*=32"):
        _model_config(TrainConfig(block_size=64), shards, log=lambda _: None)


def test_train_cli_block_size_disagreement_writes_nothing(tiny_data_dir, tmp_path, capsys):
    from mega_trading.cli import main

    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_data_dir), "--out", str(run), "--set", "block_size=64",
                 "--set", "tracking=none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.block_size=64" in err and "=32" in err and "\n" not in err
    assert not (run / "checkpoints").exists()


def test_stage_command_reads_its_section_of_a_pipeline_file(tmp_path):
    from mega_trading.cli.config import command_config

    gen = command_config("generate", CONFIGS / "demo.yaml", ["seed=3"], flags={"n": 8, "length": None})
    assert (gen.n, gen.length, gen.prompt_length, gen.rollouts_per_prompt, gen.seed) == (8, 256, 96, 2, 3)
    sim = command_config("simulate", CONFIGS / "demo.yaml")
    assert (sim.symbol, sim.episodes, sim.max_events) == ("BTCUSDT", 16, 5000)
    with pytest.raises(ConfigError, match="pipeline config"):
        command_config("serve", CONFIGS / "demo.yaml")
    bad = tmp_path / "bad_run.yaml"
    bad.write_text("train:\n  steps: 3\nprepare:\n  block_size: 64\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad_run.yaml: unknown config key 'prepare.bogus'"):
        command_config("train", bad)  # the whole pipeline file is checked, not only its section


def test_config_show_prints_resolved_yaml_with_derived_numbers(capsys):
    import yaml

    from mega_trading.cli import main
    from mega_trading.core.config import from_dict
    from mega_trading.pipeline import RunConfig

    assert main(["config", "show", "--config", str(CONFIGS / "demo.yaml"),
                 "--set", "train.steps=100", "--set", "generate.n=8"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)  # derived numbers are comments: the output is a config again
    cfg = from_dict(RunConfig, shown)
    assert cfg.train.steps == 100 and cfg.generate.n == 8 and cfg.prepare.block_size == 128
    derived = yaml.safe_load("\n".join(line[2:] for line in out.splitlines()
                                       if line.startswith("# ") and "---" not in line
                                       and not line.startswith("# mega-trading")))["derived"]
    assert derived["block_size"] == 128
    assert derived["tokens_per_step"] == 16 * 128  # demo batch_size x block_size
    assert derived["train_tokens"] == 100 * 16 * 128
    assert derived["model"]["n_params_hidden"] == 738_432  # the micro preset
    assert derived["generate_new_tokens"] == 8 * 256

    assert main(["config", "show", "--command", "generate", "--set", "sampling.top_k=4"]) == 0
    gen = yaml.safe_load(capsys.readouterr().out)
    assert gen["sampling"]["top_k"] == 4 and gen["n"] == 32  # GenerateConfig defaults
    assert main(["config", "show", "--command", "facts"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["on_degenerate"] == "flag"  # what `facts` uses


def test_a_real_command_layers_file_flags_and_set(tmp_path, capsys):
    """prepare: the file's values, beaten by a flag given, beaten by --set."""
    import json

    from mega_trading.cli import main

    config = tmp_path / "prepare.yaml"
    config.write_text("block_size: 48\nstride: 24\nworkers: 1\ntokenizer:\n  size_bins: 6\n")
    out = tmp_path / "data"
    assert main(["prepare", "--out", str(out), "--config", str(config), "--block-size", "40",
                 "--set", "stride=16"]) == 0
    recorded = json.loads((out / "manifest.json").read_text())["config"]
    assert (recorded["block_size"], recorded["stride"], recorded["workers"]) == (40, 16, 1)
    assert recorded["tokenizer"]["size_bins"] == 6 and recorded["kind"] == "trades"  # file, default
    capsys.readouterr()
    assert main(["prepare", "--out", str(tmp_path / "bad"), "--config", str(config),
                 "--set", "tokenizer.size_bins=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer.size_bins must be >= 1, got 0" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
