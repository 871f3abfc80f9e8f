"""The package layout and the direction of imports (rewards and samplers know nothing of models or trainers)."""

import ast
from pathlib import Path

import pytest

import diffrl
import diffrl.rewards
import diffrl.samplers

ROOT = Path(__file__).resolve().parents[1]


def test_namespace_maps_top_level_folders():
    assert Path(diffrl.samplers.__file__).parent == ROOT / "samplers"
    assert Path(diffrl.rewards.__file__).parent == ROOT / "rewards"
    assert Path(diffrl.__file__).parent == ROOT / "diffrl"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package (diffrl.samplers / diffrl.rewards)
                pkg = "diffrl." + path.parent.name
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["samplers", "rewards"])
def test_lower_layers_do_not_import_upper_ones(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for f in files:
        bad = [
            n
            for n in _imports(f)
            if n.startswith(("diffrl.models", "diffrl.trainers", "diffrl.train", "diffrl.cli"))
        ]
        assert not bad, (
            f"{f.relative_to(ROOT)} imports {bad}; samplers and rewards must not depend on upper layers"
        )


def test_the_import_check_sees_relative_imports(tmp_path):
    probe = tmp_path / "samplers" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("from ..models import load_model\nfrom .steps import ode_step\n")
    assert _imports(probe) == {"diffrl.models", "diffrl.samplers.steps"}


# the engine's collaborators below it, the trainers above it; a module imports only from lower layers
TRAINERS_LAYERS = {
    "common": 0,
    "objectives": 0,
    "eval_grid": 0,
    "zero": 0,
    "tracking": 0,
    "distributed": 1,
    "evaluation": 1,
    "checkpoints": 2,
    "engine": 3,
    "flow_grpo": 4,
    "diffusion_nft": 4,
    "refl": 4,
}


def _trainers_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module in diffrl.trainers, names imported from it)`` for each import of a sibling module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.append((node.module.split(".")[0], [a.name for a in node.names]))
            else:  # from . import a, b
                found.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffrl.trainers."):
            found.append((node.module.split(".")[2], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend(
                (a.name.split(".")[2], []) for a in node.names if a.name.startswith("diffrl.trainers.")
            )
    return found


def test_trainers_modules_import_only_downward_and_no_private_names():
    files = sorted((ROOT / "diffrl" / "trainers").glob("*.py"))
    modules = {f.stem for f in files} - {"__init__"}
    assert modules == set(TRAINERS_LAYERS), "place a new module of diffrl/trainers in TRAINERS_LAYERS"
    for f in files:
        if f.stem == "__init__":
            continue
        for module, names in _trainers_imports(f):
            assert TRAINERS_LAYERS[module] < TRAINERS_LAYERS[f.stem], (
                f"diffrl/trainers/{f.name} imports {module}, which is not below it"
            )
            private = [n for n in names if n.startswith("_")]
            assert not private, f"diffrl/trainers/{f.name} imports private names {private} from {module}"
