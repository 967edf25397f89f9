"""The dependency rule between the packages (docs/architecture.md, "The contract between lowrank and
models"): lowrank reaches models only through models/__init__'s names; models takes from lowrank only its
leaf modules; kernels imports neither."""
import ast
from pathlib import Path

import pytest

from lowrank import models

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"errors", "checks", "files"}
SUBMODULES = {p.stem for p in (ROOT / "lowrank" / "models").glob("*.py")} - {"__init__"}


def _imports(file: Path):
    """(module, names) of every import in a file, relative ones as written ('.models.gpt2', '..files')."""
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or ""), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names)


@pytest.mark.parametrize("file", sorted((ROOT / "lowrank").glob("*.py")), ids=lambda p: p.name)
def test_lowrank_uses_models_through_its_exported_names_only(file):
    for module, names in _imports(file):
        assert not module.startswith((".models.", "lowrank.models.")), f"{file.name} imports {module}"
        if module in (".models", "lowrank.models"):
            assert set(names) <= set(models.__all__), f"{file.name} imports {set(names) - set(models.__all__)}"
    text = file.read_text()
    for sub in SUBMODULES:
        assert f"models.{sub}." not in text, f"{file.name} reaches into models.{sub}"


@pytest.mark.parametrize("file", sorted((ROOT / "lowrank" / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_take_only_the_leaf_modules_of_lowrank(file):
    for module, _ in _imports(file):
        if module.startswith("..") or module.startswith("lowrank"):
            assert module.lstrip(".").removeprefix("lowrank.") in LEAVES, f"{file.name} imports {module}"


@pytest.mark.parametrize("file", sorted(ROOT / "lowrank" / f"{leaf}.py" for leaf in LEAVES), ids=lambda p: p.name)
def test_the_leaf_modules_import_no_other_part_of_lowrank(file):
    for module, _ in _imports(file):
        assert not module.startswith(".") or module.lstrip(".") in LEAVES, f"{file.name} imports {module}"


@pytest.mark.parametrize("file", sorted((ROOT / "lowrank" / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_neither_lowrank_nor_models(file):
    for module, _ in _imports(file):
        assert not module.startswith(("..", "lowrank", "models")), f"{file.name} imports {module}"
