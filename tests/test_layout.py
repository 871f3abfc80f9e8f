"""The package layout and the direction of imports.

The rooms (README, "Layout"): ``diffrl.samplers`` and ``diffrl.rewards`` are the bottom layer and import nothing of
diffrl but themselves and ``diffrl.utils``; trainers never import one another or the command line; no module imports
another module's private name; and no chain of imports, lazy ones included, leads back to where it started.
"""

import ast
from pathlib import Path

import pytest

import diffrl
import diffrl.rewards
import diffrl.samplers

ROOT = Path(__file__).resolve().parents[1]
#: where each top-level package's files live (pyproject maps rewards/ and samplers/ into diffrl)
FOLDERS = {
    "diffrl": ROOT / "diffrl",
    "diffrl.rewards": ROOT / "rewards",
    "diffrl.samplers": ROOT / "samplers",
}
#: the algorithm files: each implements one trainer's step on the shared engine
ALGORITHMS = (
    "diffrl.trainers.flow_grpo",
    "diffrl.trainers.diffusion_nft",
    "diffrl.trainers.refl",
    "diffrl.trainers.awm",
    "diffrl.trainers.dpo",
)


def test_namespace_maps_top_level_folders():
    assert Path(diffrl.samplers.__file__).parent == ROOT / "samplers"
    assert Path(diffrl.rewards.__file__).parent == ROOT / "rewards"
    assert Path(diffrl.__file__).parent == ROOT / "diffrl"


def _module_files(folders: dict[str, Path] = FOLDERS) -> dict[str, Path]:
    """Module name -> file, for every Python file of the package (a package is its ``__init__``)."""
    modules = {}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "diffrl" and name.startswith(("diffrl.rewards", "diffrl.samplers")):
                continue
            modules[name] = path
    return modules


def _imports(path: Path, module: str, known: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in a file, at any depth (lazy imports
    inside functions count too); relative imports are resolved against ``module``; ``from pkg import sub`` with a
    submodule ``sub`` counts as importing ``pkg.sub``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None, node.lineno) if sub in known else (target, a.name, node.lineno))
    return found


def _graph() -> dict[str, list[tuple[str, str | None, int]]]:
    files = _module_files()
    known = set(files)
    return {
        m: [i for i in _imports(p, m, known) if i[0] in known or i[0].startswith("diffrl")]
        for m, p in files.items()
    }


def test_the_module_list_sees_the_mapped_folders():
    files = _module_files()
    assert (
        "diffrl.rewards.registry" in files
        and "diffrl.samplers.steps" in files
        and "diffrl.trainers.engine" in files
    )
    assert files["diffrl.rewards"] == ROOT / "rewards" / "__init__.py"


def test_the_import_check_resolves_relative_and_submodule_imports(tmp_path):
    probe = tmp_path / "samplers" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("from ..models import load_model\nfrom .steps import ode_step\nfrom . import rollout\n")
    known = {"diffrl.models", "diffrl.samplers.steps", "diffrl.samplers.rollout"}
    got = {(m, n) for m, n, _ in _imports(probe, "diffrl.samplers.probe", known)}
    assert got == {
        ("diffrl.models", "load_model"),
        ("diffrl.samplers.steps", "ode_step"),
        ("diffrl.samplers.rollout", None),
    }
    init = tmp_path / "pkg" / "__init__.py"
    init.parent.mkdir()
    init.write_text("from .steps import ode_step\n")
    assert [(m, n) for m, n, _ in _imports(init, "diffrl.samplers", known)] == [
        ("diffrl.samplers.steps", "ode_step")
    ]


#: what the bottom layer may import of the rest of diffrl: small helpers with no diffrl imports of their own
SMALL_UTILITIES = ("diffrl.utils", "diffrl.tiny_tokenizers")


@pytest.mark.parametrize("package", ["diffrl.samplers", "diffrl.rewards"])
def test_lower_layers_import_only_themselves_and_small_utilities(package):
    graph = _graph()
    for utility in SMALL_UTILITIES:
        assert not [t for t, _, _ in graph[utility] if t.startswith("diffrl")], f"{utility} must stay a leaf"
    bad = [
        f"{m} imports {target} (line {line})"
        for m, imports in graph.items()
        if _inside(m, package)
        for target, _, line in imports
        if target.startswith("diffrl") and not _inside(target, package) and target not in SMALL_UTILITIES
    ]
    assert not bad, (
        f"{package} must depend on nothing of diffrl but itself and small utilities: " + "; ".join(bad)
    )


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_trainers_import_neither_each_other_nor_the_command_line():
    graph = _graph()
    bad = [
        f"{m} imports {target} (line {line})"
        for m, imports in graph.items()
        if m.startswith("diffrl.trainers")
        for target, _, line in imports
        if target.startswith("diffrl.cli") or (m in ALGORITHMS and target in ALGORITHMS and target != m)
    ]
    assert not bad, "; ".join(bad)


def _private_to(target: str, name: str | None) -> str | None:
    """The package a private name or module is private to, or None when it is public: ``_x`` in module ``m`` is
    private to ``m``; a module ``pkg._m`` (and what it holds) is private to ``pkg``."""
    if name and name.startswith("_"):
        return target
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_"):
            return ".".join(parts[:i])
    return None


def test_no_module_imports_another_modules_private_name():
    graph = _graph()
    bad = []
    for m, imports in graph.items():
        for target, name, line in imports:
            if target not in graph or target == m:
                continue
            private_name = bool(name) and name.startswith("_")
            owner = _private_to(target, None)  # the package a private module belongs to
            if private_name or (owner is not None and not _inside(m, owner)):
                bad.append(f"{m} imports {name or target} from {target} (line {line})")
    assert not bad, "make the name public where it is shared: " + "; ".join(bad)


def test_the_privacy_rule():
    assert _private_to("diffrl.config", "_parse") == "diffrl.config"
    assert _private_to("diffrl.rewards._clip", "helper") == "diffrl.rewards"
    assert _private_to("diffrl.rewards._clip", None) == "diffrl.rewards"
    assert _private_to("diffrl.config", "parse") is None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_between_modules():
    """A package's ``__init__`` re-exporting its submodules is not a circle; a submodule importing its own package's
    ``__init__`` back would be, and so is any longer chain (lazy imports inside functions included)."""
    graph = {
        m: {t for t, _, _ in imports if t in _graph_keys() and t != m} for m, imports in _graph().items()
    }
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _graph_keys() -> set[str]:
    return set(_module_files())


#: diffrl.trainers in layers: the engine's collaborators below it, the algorithm files above it; a module imports only
#: from lower layers
TRAINERS_LAYERS = {
    "common": 0,
    "objectives": 0,
    "eval_grid": 0,
    "zero": 0,
    "tracking": 0,
    "monitor": 0,
    "preferences": 0,
    "stopping": 0,
    "distributed": 1,
    "evaluation": 1,
    "checkpoints": 2,
    "engine": 3,
    "flow_grpo": 4,
    "diffusion_nft": 4,
    "refl": 4,
    "awm": 4,
    "dpo": 4,
}


def test_trainers_modules_import_only_downward():
    graph = _graph()
    modules = {m.rsplit(".", 1)[1] for m in graph if m.startswith("diffrl.trainers.")}
    assert modules == set(TRAINERS_LAYERS), "place a new module of diffrl/trainers in TRAINERS_LAYERS"
    bad = [
        f"{m} imports {target} (line {line}), which is not below it"
        for m, imports in graph.items()
        if m.startswith("diffrl.trainers.")
        for target, _, line in imports
        if target.startswith("diffrl.trainers.")
        and TRAINERS_LAYERS[target.rsplit(".", 1)[1]] >= TRAINERS_LAYERS[m.rsplit(".", 1)[1]]
    ]
    assert not bad, "; ".join(bad)


def test_the_library_does_not_depend_on_the_toy_world():
    """The toy world sits on top of the library (its verifier, CLIP and pre-training use rewards, models and
    sampling); below it, only the table of shipped checkpoints in diffrl.utils knows where its weights are."""
    below = (
        "diffrl.samplers",
        "diffrl.rewards",
        "diffrl.models",
        "diffrl.trainers",
        "diffrl.config",
        "diffrl.data",
    )
    below += ("diffrl.sampling", "diffrl.hub", "diffrl.doctor")
    graph = _graph()
    bad = [
        f"{m} imports {target} (line {line})"
        for m, imports in graph.items()
        if any(_inside(m, b) for b in below)
        for target, _, line in imports
        if _inside(target, "diffrl.toy")
    ]
    assert not bad, "; ".join(bad)
