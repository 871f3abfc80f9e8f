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
