"""Config checks: the config (with its overrides) validates and its prompts read."""

from __future__ import annotations

from pathlib import Path

from .findings import Finding, split_fix

__all__ = ["read_config", "config_label", "check_data"]


def read_config(config, overrides: list[str]):
    """The validated config, or ``(None, Finding)`` when it does not validate; bad input raises ConfigError."""
    import yaml

    from ..config import ConfigError, load_config, parse_override

    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(
                f"config file {config} does not exist; pass a YAML preset such as configs/tiny/flow_grpo.yaml."
            )
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"config file {config} is not valid YAML{where}; fix its syntax (key: value, one per line)."
            ) from None
    for text in overrides:
        parse_override(text)  # raises ConfigError naming the override when it is not key=value
    try:
        return load_config(config, overrides), None
    except ConfigError as err:
        what, fix = split_fix(str(err), "Change that value in the config file or with a key=value override.")
        return None, Finding("config", "FAIL", what, fix)


def config_label(config) -> str:
    return str(config) if isinstance(config, (str, Path)) else "the config"


def check_data(cfg) -> Finding:
    from ..data import train_eval_prompts

    d = cfg.data
    if d.train.startswith("hf:"):
        return Finding("data", "OK", f"data.train={d.train} is a datasets dataset (not opened by doctor)")
    try:
        train, evals = train_eval_prompts(d.train, d.eval, d.eval_size, cfg.seed, d.prompt_key)
    except (OSError, ValueError, ImportError) as err:
        what, fix = split_fix(str(err), "Point data.train at a .txt or .jsonl prompt file.")
        return Finding("data", "FAIL", what, fix)
    message = f"{len(train)} training and {len(evals)} evaluation prompts from {d.train}"
    distinct = len(set(train.prompts))
    if distinct < len(train) and cfg.algorithm in ("flow_grpo", "diffusion_nft", "awm"):
        # the reference codes group advantages by prompt text; by slot, a text drawn twice in a step is two groups
        message += f" ({distinct} distinct texts: a step may draw one twice, and group_by={cfg.group_by} " + (
            "merges such draws into one advantage group, as the reference codes do)"
            if cfg.group_by != "slot"
            else "keeps them two advantage groups; group_by=text or tokens merges them, as the reference codes do)"
        )
    return Finding("data", "OK", message)
