"""The architecture's rules, checked on the source: layering, file size, the callbacks' declared surface, packaging.

- the library (``dapo_lightning/``) never imports its scripts (``callbacks/``, ``data_prep/``);
- no source file of ``dapo_lightning/``, ``callbacks/`` or ``data_prep/`` is over 400 lines;
- a callback reads nothing of the Lightning module outside ``hooks.RolloutModule`` and calls that
  module ``pl_module`` in every hook;
- the installed distribution puts one top-level package in site-packages, ``dapo_lightning``.
"""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dapo_lightning import hooks

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, CALLBACKS, DATA_PREP = ROOT / "dapo_lightning", ROOT / "callbacks", ROOT / "data_prep"
SCRIPTS = ("callbacks", "data_prep", "dapo_lightning.callbacks", "dapo_lightning.data_prep")
MAX_LINES = 400


def sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


# --- layering ---------------------------------------------------------------------------------------


def script_imports(source: str) -> list[str]:
    """The modules of ``callbacks``/``data_prep`` that ``source`` imports (absolute or as dapo_lightning subpackages)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            if node.level:  # relative: inside the library, "..callbacks" reaches the scripts too
                names = [name.lstrip(".") for name in names]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in SCRIPTS[:2] or name.startswith(SCRIPTS[2:])]
    return found


def test_the_import_scan_finds_every_spelling():
    assert script_imports("import data_prep.synthetic") == ["data_prep.synthetic"]
    assert script_imports("from dapo_lightning import callbacks") == ["dapo_lightning.callbacks"]
    assert script_imports("def f():\n    from dapo_lightning.data_prep.tiny_model import x") == [
        "dapo_lightning.data_prep.tiny_model", "dapo_lightning.data_prep.tiny_model.x"]
    assert script_imports("from dapo_lightning import metrics\nimport torch") == []


@pytest.mark.parametrize("path", sources(LIBRARY), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_its_scripts(path):
    assert script_imports(path.read_text()) == [], f"{path.relative_to(ROOT)} imports the scripts"


# --- size -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sources(LIBRARY, CALLBACKS, DATA_PREP), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by concern"


# --- the callbacks' surface -------------------------------------------------------------------------


def surface() -> set[str]:
    """The members ``hooks.RolloutModule`` declares (annotated attributes and methods)."""
    declared = set(hooks.RolloutModule.__annotations__)
    declared |= {name for name, _ in inspect.getmembers(hooks.RolloutModule, inspect.isfunction)
                 if not name.startswith("_")}
    return declared


def surface_violations(source: str, allowed: set[str]) -> list[str]:
    """What ``source`` does with a hook's Lightning module outside ``allowed``: one line per violation."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if "module" in [a.arg for a in node.args.args]:
                problems.append(f"line {node.lineno}: {node.name} names its Lightning module 'module', not 'pl_module'")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pl_module":
            if node.attr not in allowed:
                problems.append(f"line {node.lineno}: pl_module.{node.attr} is not in hooks.RolloutModule")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "pl_module":
                problems.append(f"line {node.lineno}: {node.func.id}(pl_module, ...) reaches past hooks.RolloutModule")
        elif isinstance(node, (ast.Assign, ast.NamedExpr)) and isinstance(node.value, ast.Name):
            if node.value.id == "pl_module":
                problems.append(f"line {node.lineno}: pl_module is aliased (the check could not follow it)")
    return problems


def test_the_surface_check_catches_a_callback_that_reaches_in():
    bad = (
        "class Sneaky:\n"
        "    def on_rollout_scored(self, trainer, pl_module, rollout):\n"
        "        pl_module.optim_cfg.learning_rate\n"
        "        getattr(pl_module, 'reward_specs')\n"
        "        m = pl_module\n"
        "    def on_train_start(self, trainer, module):\n"
        "        pass\n"
    )
    found = surface_violations(bad, surface())
    assert len(found) == 4, found
    assert "line 3: pl_module.optim_cfg is not in hooks.RolloutModule" in found
    good = "def on_rollout_scored(self, trainer, pl_module, rollout):\n    pl_module.log('x', pl_module.num_generations)\n"
    assert surface_violations(good, surface()) == []


def test_the_surface_is_what_the_module_offers():
    from dapo_lightning.config import PolicyConfig
    from dapo_lightning.module import DAPOModule

    module = DAPOModule(policy=PolicyConfig(model_name_or_path="not/loaded"))  # no model is loaded before fit
    missing = sorted(name for name in surface() if name not in dir(module))
    assert missing == [], f"hooks.RolloutModule declares {missing}, which DAPOModule lacks"


@pytest.mark.parametrize("path", sources(CALLBACKS), ids=lambda p: str(p.relative_to(ROOT)))
def test_callbacks_read_only_the_declared_surface(path):
    assert surface_violations(path.read_text(), surface()) == []


# --- packaging --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_with_every_source_file(tmp_path):
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in (LIBRARY, CALLBACKS, DATA_PREP):
        shutil.copytree(folder, source / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("dapo_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"dapo_lightning"}
    expected = {f"dapo_lightning/{p.relative_to(LIBRARY)}" for p in sources(LIBRARY)}
    expected |= {f"dapo_lightning/callbacks/{p.relative_to(CALLBACKS)}" for p in sources(CALLBACKS)}
    expected |= {f"dapo_lightning/data_prep/{p.relative_to(DATA_PREP)}" for p in sources(DATA_PREP)}
    assert sorted(expected - set(names)) == []  # every package is listed in setup.cfg
