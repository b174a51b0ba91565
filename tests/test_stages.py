"""Stage stamps: a stage reruns when its code or the package version changes, not otherwise."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from mega_trading.core import stages
from mega_trading.core.stages import Stage, code_identity, run_stages
from mega_trading.pipeline import STAGE_SOURCES, RunConfig, build_stages


@pytest.fixture
def stage_modules(tmp_path, monkeypatch):
    """Two importable stage modules in a temp folder, and a counter of stage runs."""
    root = tmp_path / "src"
    (root / "fake_pkg").mkdir(parents=True)
    (root / "fake_stage_a.py").write_text("VALUE = 1\n")
    (root / "fake_pkg" / "__init__.py").write_text("")
    (root / "fake_pkg" / "core.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("fake_stage_a", "fake_pkg", "fake_pkg.core"):
        sys.modules.pop(name, None)


def pipeline(run_dir, out_dir, runs: list[str]) -> list[Stage]:
    def stage(name, sources):
        output = out_dir / f"{name}.txt"

        def run():
            runs.append(name)
            output.write_text(name)

        return Stage(name, run, (output,), lambda: {"config": 1}, sources)

    return [stage("a", ("fake_stage_a",)), stage("b", ("fake_pkg",))]


def statuses(run_dir, stage_list) -> dict[str, str]:
    summary = run_stages(run_dir, stage_list, console=Console(file=io.StringIO()))
    return {name: s["status"] for name, s in summary.items()}


def test_a_stage_whose_source_changed_reruns_and_an_unchanged_one_is_skipped(
        stage_modules, tmp_path, monkeypatch):
    runs: list[str] = []
    stage_list = pipeline(tmp_path / "run", tmp_path, runs)
    assert statuses(tmp_path / "run", stage_list) == {"a": "ran", "b": "ran"}
    assert statuses(tmp_path / "run", stage_list) == {"a": "skipped", "b": "skipped"}
    (stage_modules / "fake_pkg" / "core.py").write_text("VALUE = 3  # an upgrade\n")
    assert statuses(tmp_path / "run", stage_list) == {"a": "skipped", "b": "ran"}
    (stage_modules / "fake_stage_a.py").write_text("VALUE = 1\nOTHER = 2\n")
    assert statuses(tmp_path / "run", stage_list) == {"a": "ran", "b": "skipped"}
    monkeypatch.setattr(stages, "__version__", "99.0.0")  # a new release: everything reruns
    assert statuses(tmp_path / "run", stage_list) == {"a": "ran", "b": "ran"}
    assert runs == ["a", "b", "b", "a", "a", "b"]


def test_the_code_identity_covers_c_sources_and_not_the_checkout_path(stage_modules, tmp_path):
    before = code_identity(("fake_pkg",))
    (stage_modules / "fake_pkg" / "kernel.c").write_text("int f(void) { return 1; }\n")
    assert code_identity(("fake_pkg",))["sources_sha256"] != before["sources_sha256"]
    with pytest.raises(ValueError, match="no_such_stage_module"):
        code_identity(("no_such_stage_module",))


def test_every_pipeline_stage_keys_its_own_code(tmp_path):
    stage_list = build_stages(RunConfig(run_dir=str(tmp_path / "run")),
                              Console(file=io.StringIO()))
    assert [s.name for s in stage_list] == list(STAGE_SOURCES)
    for stage in stage_list:
        assert stage.sources == STAGE_SOURCES[stage.name] and stage.sources
        assert code_identity(stage.sources)["sources_sha256"]  # every module resolves
    identities = {code_identity(s.sources)["sources_sha256"] for s in stage_list}
    assert len(identities) == len(stage_list)
