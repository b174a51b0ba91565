"""Config machinery: strict keys, typed dotted overrides, YAML mirrors, every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from mega_trading.config import apply_overrides, from_dict, load_yaml, to_dict
from mega_trading.errors import ConfigError

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
    from mega_trading.train import TrainConfig

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
