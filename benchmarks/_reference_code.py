"""Reading the reference repositories' code for the parity scripts (parity_flow_grpo.py, parity_diffusion_nft.py).

The references are training scripts, not libraries: their configs import ``ml_collections`` (and ``imp``, gone in
Python 3.12), and their training scripts import wandb, absl and more at the top. These helpers let a parity script
execute the references' own functions and configs from a clone without those packages: stand-ins for the two
modules, the functions of a script compiled alone from its syntax tree, and the LoRA set-up read out of ``main()``.
Nothing here is the references' code.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
import warnings
from pathlib import Path

__all__ = ["stub_missing_modules", "load_module", "script_functions", "main_lora_setup"]


class AttrDict(dict):
    """Stands in for ``ml_collections.ConfigDict`` (attribute access to a dict), all the configs use of it."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def stub_missing_modules() -> None:
    """Stand-ins for ``ml_collections`` and ``imp`` when they are not installed."""
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        sys.modules["ml_collections"] = types.SimpleNamespace(ConfigDict=AttrDict)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import imp  # noqa: F401
    except ImportError:

        def load_source(name, path):
            module = load_module(Path(path), name)
            sys.modules[name] = module
            return module

        sys.modules["imp"] = types.SimpleNamespace(load_source=load_source)


def load_module(path: Path, name: str) -> types.ModuleType:
    """Execute the file ``path`` as module ``name`` (deprecation warnings of its imports silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def script_functions(script: Path, wanted: set[str], namespace: dict) -> dict:
    """The top-level functions ``wanted`` of ``script``, compiled alone from its syntax tree and executed in
    ``namespace`` (which must hold what they use); returns the namespace."""
    tree = ast.parse(script.read_text())
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if {n.name for n in found} != wanted:
        raise SystemExit(f"{script} does not define {sorted(wanted)}; this script knows another layout")
    exec(compile(ast.Module(body=found, type_ignores=[]), str(script), "exec"), namespace)
    return namespace


def main_lora_setup(script: Path) -> tuple[list[str], dict, int | None]:
    """From ``main()`` of ``script``: the LoRA ``target_modules`` list, the other ``LoraConfig`` keywords (literal
    ones) and the ``max_sequence_length`` of its first ``compute_text_embeddings`` call (None without one)."""
    tree = ast.parse(script.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    targets, lora_kwargs, max_sequence_length = None, None, None
    for node in ast.walk(main):
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "target_modules" for t in node.targets
        ):
            targets = ast.literal_eval(node.value)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "LoraConfig":
            lora_kwargs = {
                k.arg: ast.literal_eval(k.value)
                for k in node.keywords
                if k.arg != "target_modules" and isinstance(k.value, ast.Constant)
            }
        if (
            max_sequence_length is None
            and isinstance(node, ast.Call)
            and getattr(node.func, "id", "") == "compute_text_embeddings"
        ):
            for k in node.keywords:
                if k.arg == "max_sequence_length":
                    max_sequence_length = ast.literal_eval(k.value)
    if targets is None or lora_kwargs is None:
        raise SystemExit(f"could not find the LoRA set-up in main() of {script}")
    return targets, lora_kwargs, max_sequence_length
