"""The notebooks in notebooks/: valid, stored without outputs, imports that resolve; run with --run-slow.

The fast checks only read the notebooks. The slow test runs each notebook top to bottom in a fresh kernel of
this interpreter (the default toy/tiny settings, offline, on the CPU) in a temporary working directory.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = [
    "01_quickstart.ipynb",
    "02_custom_rewards.ipynb",
    "03_inside_the_sampler.ipynb",
    "04_comparing_trainers.ipynb",
]
CELL_TIMEOUT_S = 600


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _python_source(source: str) -> str:
    """A code cell without IPython magics and shell escapes (``%...``, ``!...``), which ast cannot parse."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import statement: ``import a.b`` -> ``("a.b", [])``,
    ``from a import b, c`` -> ``("a", ["b", "c"])``."""
    out = []
    for node in ast.walk(ast.parse(_python_source(source))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module!r} in a notebook"
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def test_the_notebook_list_is_complete():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert nb.cells and nb.cells[0].cell_type == "markdown", "open with a Markdown cell saying what it does"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has stored outputs; clear them before committing"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count; clear outputs"
            ast.parse(_python_source(cell.source))  # every code cell is valid Python


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_one_settings_cell_before_the_model_is_loaded(name):
    """Switching to a real model means changing one cell: the only one that sets MODEL and DEVICE, on top."""
    cells = _code_cells(_read(name))

    def assigns(source: str, target: str) -> bool:
        for node in ast.walk(ast.parse(_python_source(source))):
            if isinstance(node, ast.Assign):
                names = [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                if target in names:
                    return True
        return False

    settings = [i for i, src in enumerate(cells) if assigns(src, "MODEL")]
    assert len(settings) == 1, f"{name}: MODEL is set in cells {settings}; set it in exactly one cell"
    assert assigns(cells[settings[0]], "DEVICE") and assigns(cells[settings[0]], "DTYPE")
    first_use = min(i for i, src in enumerate(cells) if "MODEL" in src and i != settings[0])
    assert settings[0] < first_use


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_imports_resolve(name):
    imports = [item for src in _code_cells(_read(name)) for item in _imports(src)]
    assert imports, f"{name} imports nothing?"
    for module_name, names in imports:
        module = importlib.import_module(module_name)
        for attr in names:
            if hasattr(module, attr):
                continue
            try:  # ``from package import submodule``
                importlib.import_module(f"{module_name}.{attr}")
            except ImportError:
                pytest.fail(f"{name}: `from {module_name} import {attr}`: {module_name} has no {attr}")


def _kernel_manager():
    """A kernel manager for the ``python3`` kernel of *this* interpreter.

    With no kernel directories to search, jupyter_client falls back to ipykernel's own spec, whose command is
    ``sys.executable -m ipykernel_launcher``; a ``python3`` spec installed elsewhere (e.g. a user-level one
    for another Python, without diffrl) cannot be picked up instead.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    _execute(name, _read(name), tmp_path)


#: every text-to-image family's tiny model; the quickstart's settings cell names each of them
FAMILIES = ["tiny:qwen_image", "tiny:flux", "tiny:z_image", "tiny:flux2", "tiny:flux2_klein", "tiny:wan"]


@pytest.mark.parametrize("family", FAMILIES)
def test_quickstart_settings_cell_names_every_family(family):
    nb = _read("01_quickstart.ipynb")
    settings = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("MODEL = "))
    assert f'"{family}"' in settings.source


def test_every_text_to_image_family_is_in_the_notebook_test():
    """A family added to the tiny builders joins FAMILIES, or this list of the ones whose prompts need more than the
    quickstart gives (a source image) or that the tiny Wan 2.1 already stands for."""
    from diffrl.models.loading import TINY_BUILDERS

    # image-conditioned (a source image per row), or a Wan variant that the tiny Wan 2.1 stands for
    not_text_to_image = {
        "qwen_image_edit",
        "qwen_image_edit_plus",
        "wan22",
        "wan22_ti2v",
        "wan_i2v",
        "wan22_i2v",
    }
    assert {f"tiny:{k}" for k in TINY_BUILDERS} == {"tiny:sd3", *FAMILIES} | {
        f"tiny:{k}" for k in not_text_to_image
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_quickstart_runs_on_every_tiny_family(family, tmp_path):
    """The quickstart with its settings cell switched to another family: nothing below the settings cell depends on
    the family. Each tiny model is random, so what is checked is that every cell runs, that the LoRA switched off
    gives the base images back and that the reloaded LoRA gives the trained images back (the cells print both)."""
    nb = _read("01_quickstart.ipynb")
    settings = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("MODEL = "))
    settings.source = f'MODEL = "{family}"\n' + settings.source.split("\n", 1)[1]
    _execute("01_quickstart.ipynb", nb, tmp_path)
    printed = "".join(
        out.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for out in c.outputs
        if out.output_type == "stream"
    )
    assert "LoRA switched off gives the base model back: True" in printed
    reload_diff = float(printed.split("the reloaded LoRA and the trained model: ")[1].split()[0])
    assert reload_diff < 1e-4


def _execute(name, nb, tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    km = _kernel_manager()
    client = NotebookClient(
        nb,
        km=km,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        pytest.fail(f"{name} failed:\n{err}")
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert all(cell.execution_count for cell in nb.cells if cell.cell_type == "code")
