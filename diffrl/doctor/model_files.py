"""Where the model's files are: a local diffusers directory or a hub id in the Hugging Face cache (``tiny:*`` and
``toy`` always present), and whether every component it names has its config and weights, without any network call."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..hub import cached_file, hf_cache_dir
from .findings import Finding

__all__ = ["ModelLocation", "locate_model", "weight_files", "supported_pipelines"]


def _looks_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def weight_files(directory: Path) -> list[Path]:
    """The weight files a component loads: the shards of its (non-variant) index, else its plain weight file."""
    if not directory.is_dir():
        return []
    for ext in ("safetensors", "bin"):
        indexes = sorted(directory.glob(f"*.{ext}.index.json"))
        if indexes:
            plain = [p for p in indexes if p.name.count(".") == 3]
            index = plain[0] if plain else indexes[0]
            try:
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            except (OSError, ValueError):
                shards = []
            return [directory / s for s in shards]
        files = sorted(p for p in directory.glob(f"*.{ext}") if p.exists())
        if files:
            plain = [p for p in files if p.name.count(".") == 1]
            return plain or files[:1]
    return []


def _pipeline_problems(root: Path) -> tuple[dict, list[str]]:
    """``(model_index, problems)``: what a diffusers pipeline directory lacks to load."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        return {}, [f"model_index.json cannot be read ({err.__class__.__name__})"]
    problems = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        cls = str(value[1])
        comp = root / name
        if not comp.is_dir():
            problems.append(f"{name}/ is missing")
        elif "Scheduler" in cls:
            if not (comp / "scheduler_config.json").is_file():
                problems.append(f"{name}/scheduler_config.json is missing")
        elif any(word in cls for word in ("Tokenizer", "Processor", "FeatureExtractor")):
            if not any(p.is_file() for p in comp.iterdir()):
                problems.append(f"{name}/ holds no files")
        else:
            if not (comp / "config.json").is_file():
                problems.append(f"{name}/config.json is missing")
            weights = weight_files(comp)
            missing = [w for w in weights if not w.is_file()]
            if not weights:
                problems.append(f"{name}/ has no weights (*.safetensors)")
            elif missing:
                problems.append(
                    f"{name}/{missing[0].name} is missing ({len(missing)} of {len(weights)} shards)"
                )
    return index, problems


@dataclass
class ModelLocation:
    """What :func:`locate_model` found: the model's kind, its pipeline directory when it loads offline, the finding."""

    spec: str
    kind: str  # "tiny", "local", "hub"
    root: Path | None  # a pipeline directory that loads offline, once known (tiny: built on demand)
    finding: Finding

    @property
    def available(self) -> bool:
        return self.finding.status != "FAIL"

    def directory(self) -> Path | None:
        if self.kind == "tiny" and self.root is None and self.available:
            from ..models.loading import tiny_model_dir

            self.root = tiny_model_dir(self.spec)
        return self.root


def supported_pipelines() -> dict[str, str]:
    from ..models.loading import ADAPTERS

    return {name: cls.family for name, cls in ADAPTERS.items()}


def locate_model(cfg, label: str) -> ModelLocation:
    spec = cfg.model.path
    download = (
        f"Run `diffrl download {label}` where there is network (into the same HF cache), then run offline."
        if label != "the config"
        else "Run `diffrl download <your config.yaml>` where there is network (into the same HF cache)."
    )
    from diffrl.utils import SHIPPED_PIPELINES, shipped_checkpoint

    if spec in SHIPPED_PIPELINES:  # a toy-world model shipped in the package
        try:
            spec = str(shipped_checkpoint(spec))
        except FileNotFoundError as err:
            return ModelLocation(
                spec, "local", None, Finding("model", "FAIL", str(err), "Re-create it with that command.")
            )
    if spec.startswith("tiny:"):
        from ..models.loading import TINY_BUILDERS

        family = spec.split(":", 1)[1]
        if family not in TINY_BUILDERS:
            return ModelLocation(
                spec,
                "tiny",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"{spec} is not a tiny model",
                    f"Use one of {', '.join('tiny:' + f for f in TINY_BUILDERS)}.",
                ),
            )
        return ModelLocation(
            spec,
            "tiny",
            None,
            Finding("model", "OK", f"{spec}: a tiny offline test pipeline (always available)"),
        )
    if _looks_local(spec):
        root = Path(spec).expanduser()
        if not root.is_dir():
            return ModelLocation(
                spec,
                "local",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"model.path={spec}: the local directory does not exist",
                    "Point model.path at a diffusers pipeline directory (one holding model_index.json) or at a "
                    "hub id that is in the Hugging Face cache.",
                ),
            )
        if not (root / "model_index.json").is_file():
            return ModelLocation(
                spec,
                "local",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"model.path={spec} has no model_index.json",
                    "Point model.path at a diffusers pipeline directory (saved with save_pretrained).",
                ),
            )
        where, fix = f"model.path={spec}", "Save the complete pipeline there again with save_pretrained."
    else:
        index = cached_file(spec, "model_index.json")
        if index is None:
            return ModelLocation(
                spec,
                "hub",
                None,
                Finding(
                    "model",
                    "FAIL",
                    f"model.path={spec}: its model_index.json is not in the Hugging Face cache ({hf_cache_dir()})",
                    download,
                ),
            )
        root = index.parent
        where, fix = f"model.path={spec} (HF cache {root})", download
    kind = "hub" if not _looks_local(spec) else "local"
    index, problems = _pipeline_problems(root)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        return ModelLocation(spec, kind, None, Finding("model", "FAIL", f"{where}: {shown}", fix))
    cls = index.get("_class_name")
    supported = supported_pipelines()
    if cls not in supported:
        return ModelLocation(
            spec,
            kind,
            None,
            Finding(
                "model",
                "FAIL",
                f"{where} is a {cls} pipeline, which diffrl does not train",
                f"Use a {' or '.join(sorted(supported))} checkpoint.",
            ),
        )
    comps = [
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
    ]
    return ModelLocation(
        spec,
        kind,
        root,
        Finding("model", "OK", f"{where}: {cls}, {len(comps)} components present offline"),
    )
