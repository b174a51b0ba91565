"""Data flows one way: raw -> events -> tokens -> shards -> model -> metrics/rollouts ->
report. No module imports a module of a later stage, not even lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import mega_trading

PACKAGE = Path(mega_trading.__file__).parent

# The stage order lives with the code (mega_trading.LAYERS), declared once.
STAGES = mega_trading.LAYERS


def stage_of(module: str) -> int:
    """module: dotted name inside the package, e.g. 'data.ingest.reader' or 'report'. The
    longest entry that is the module or one of its packages decides (a sub-module's own
    entry wins over its package's)."""
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        prefix = ".".join(parts[:depth])
        for rank, names in enumerate(STAGES):
            if prefix in names:
                return rank
    raise AssertionError(f"module {module!r} has no stage in tests/test_layering.py: add it")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def package_imports(path: Path) -> set[str]:
    """Dotted names (inside the package) that the file imports, anywhere in it. The
    package uses absolute imports only, so a relative one fails the test."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import, use mega_trading.<module>"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "mega_trading":
                found.add("__init__")
            elif name.startswith("mega_trading."):
                found.add(name.removeprefix("mega_trading."))
    return found


def test_every_module_has_a_stage():
    modules = [module_name(p) for p in PACKAGE.rglob("*.py")]
    assert len(modules) > 20
    for module in modules:
        stage_of(module)


def test_no_module_imports_a_later_stage():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for imported in package_imports(path):
            if (stage_of(imported) > stage_of(module)
                    and (module, imported) not in mega_trading.FACADE_IMPORTS):
                violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_the_check_sees_a_late_import_inside_a_function(tmp_path, monkeypatch):
    """The scanner itself: a lazy import of a later stage is caught."""
    fake = tmp_path / "mega_trading"
    fake.mkdir()
    (fake / "data").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "data" / "events.py").write_text("def f():\n    from mega_trading.report import x\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert package_imports(fake / "data" / "events.py") == {"report"}
    assert stage_of("report") > stage_of(module_name(fake / "data" / "events.py"))
