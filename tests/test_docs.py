"""The documentation under docs/ stays true to the code (no model is loaded; the file runs in about a second).

* docs/config.md lists every field of every config dataclass and is exactly what docs/gen_config_reference.py
  renders now (so it cannot go stale: regenerate it with ``python docs/gen_config_reference.py``);
* each trainer page mentions every field of its own config section (``flow_grpo.clip_range``, ...);
* docs/rewards.md names every built-in reward of the registry;
* every relative Markdown link in docs/ and README.md points to an existing file.

Each checker is a small function that returns what is missing, and is tested on a broken example too, so the
checks themselves can fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from diffrl import config as c

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TRAINER_PAGES = {
    "flow_grpo": (c.FlowGRPOConfig, DOCS / "trainers" / "flow_grpo.md"),
    "diffusion_nft": (c.DiffusionNFTConfig, DOCS / "trainers" / "diffusion_nft.md"),
    "refl": (c.ReFLConfig, DOCS / "trainers" / "refl.md"),
    "awm": (c.AWMConfig, DOCS / "trainers" / "awm.md"),
    "dpo": (c.DPOConfig, DOCS / "trainers" / "dpo.md"),
}


# --------------------------------------------------------------------------------------------------- helpers


def config_keys(cls=c.TrainConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every field of ``cls`` and of its nested config dataclasses (``optim.lr``, ...)."""
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
    return keys


def missing_mentions(text: str, names: list[str]) -> list[str]:
    """The names that do not appear in ``text`` as a whole token (``lr`` does not count inside
    ``lr_scheduler``)."""
    return [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text)]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return load_generator()


@pytest.fixture(scope="module")
def rendered(gen):
    """What docs/gen_config_reference.py writes now (rendered once: it parses every dataclass's source)."""
    return gen.render()


_FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1\s*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)


def relative_links(markdown: str) -> list[str]:
    """Targets of the relative links of a Markdown text (code blocks and code spans are not links)."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = _INLINE_LINK.findall(text) + _REF_LINK.findall(text)
    return [t for t in targets if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", t) and not t.startswith("#")]


def broken_links(path: Path) -> list[str]:
    """Relative link targets of the Markdown file ``path`` that do not exist (anchors are not checked)."""
    out = []
    for target in relative_links(path.read_text()):
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            out.append(target)
    return out


def builtin_reward_names() -> list[str]:
    """The registry's built-in rewards: entries living in diffrl.rewards or diffrl.toy.rewards (rewards that other
    tests register at run time with register_reward are left out)."""
    from diffrl.rewards.registry import REWARDS

    names = []
    for name, entry in REWARDS.items():
        where = entry if isinstance(entry, str) else getattr(entry, "__module__", "")
        if where.startswith(("diffrl.rewards.", "diffrl.toy.rewards")):
            names.append(name)
    return names


def markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


# --------------------------------------------------------------------------------------------- (a) config.md


def test_config_reference_lists_every_field_of_every_section():
    text = (DOCS / "config.md").read_text()
    keys = config_keys()
    assert "optim.lr" in keys and "flow_grpo.clip_range" in keys and "max_steps" in keys
    missing = missing_mentions(text, [f"`{k}`" for k in keys])
    assert not missing, f"docs/config.md lacks {missing}; run python docs/gen_config_reference.py"


def test_config_reference_is_what_the_generator_writes_now(rendered):
    assert (DOCS / "config.md").read_text() == rendered, (
        "docs/config.md is out of date; run python docs/gen_config_reference.py"
    )


def test_config_reference_carries_every_field_docstring(gen, rendered):
    for cls in c.config_classes():
        for name, doc in c.field_docs(cls).items():
            assert gen._cell(doc) in rendered, f"{cls.__name__}.{name}: docstring missing from docs/config.md"


# ----------------------------------------------------------------------------------------- (b) trainer pages


@pytest.mark.parametrize("algo", sorted(TRAINER_PAGES))
def test_trainer_page_mentions_every_field_of_its_section(algo):
    cls, page = TRAINER_PAGES[algo]
    assert {a for a in c.ALGORITHMS} == set(TRAINER_PAGES)
    keys = [f"{algo}.{f.name}" for f in dataclasses.fields(cls)]
    missing = missing_mentions(page.read_text(), keys)
    assert not missing, f"{page.relative_to(ROOT)} does not mention {missing}"


# -------------------------------------------------------------------------------------------- (c) rewards.md


def test_rewards_page_names_every_builtin_reward():
    names = builtin_reward_names()
    assert {"hpsv2", "pickscore", "imagereward", "shapes_verifier", "jpeg_compressibility"} <= set(names)
    missing = missing_mentions((DOCS / "rewards.md").read_text(), [f"`{n}`" for n in names])
    assert not missing, f"docs/rewards.md does not describe the rewards {missing}"


# ------------------------------------------------------------------------------------------------- (d) links


def test_docs_exist():
    expected = {
        "index.md",
        "config.md",
        "rewards.md",
        "launch.md",
        "troubleshooting.md",
        "trainers/flow_grpo.md",
        "trainers/diffusion_nft.md",
        "trainers/refl.md",
        "trainers/awm.md",
    }
    assert expected <= {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)} links to missing files: {broken_links(path)}"


def test_every_page_is_reachable_from_the_index():
    index = DOCS / "index.md"
    linked = {(index.parent / t.split("#", 1)[0]).resolve() for t in relative_links(index.read_text())}
    pages = {p.resolve() for p in DOCS.rglob("*.md") if p != index}
    assert not pages - linked, f"docs/index.md does not link {sorted(p.name for p in pages - linked)}"


# --------------------------------------------------------------------------------------- the checks can fail


def test_the_checkers_catch_what_they_should(tmp_path):
    # a field named only as part of a longer name, or not at all, is missing
    assert missing_mentions("`optim.lr_scheduler` and `optim.eps`", ["`optim.lr`", "`optim.eps`"]) == [
        "`optim.lr`"
    ]
    assert missing_mentions("see refl.stop_min_x", ["refl.stop_min"]) == ["refl.stop_min"]
    assert missing_mentions("see refl.stop_min.", ["refl.stop_min"]) == []

    # broken relative links are found; URLs, anchors, code and existing files are not reported
    (tmp_path / "sub").mkdir()
    (tmp_path / "ok.md").write_text("x")
    page = tmp_path / "sub" / "page.md"
    page.write_text(
        "[good](../ok.md) [good anchor](../ok.md#part) [web](https://example.org/x.md) [here](#top)\n"
        "[bad](missing.md) ![img](../img.png 'title')\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[also not](nowhere2.md)\n```\n"
        "[ref]: ../gone.md\n"
    )
    assert sorted(broken_links(page)) == ["../gone.md", "../img.png", "missing.md"]


def test_a_stale_config_reference_is_detected(gen, rendered, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "render", lambda: rendered)
    target = tmp_path / "config.md"
    monkeypatch.setattr(gen, "OUTPUT", target)
    target.write_text(rendered.replace("`optim.lr`", "`optim.learning_rate`"))  # a field renamed in the code
    assert gen.main(["--check"]) == 1
    assert missing_mentions(target.read_text(), ["`optim.lr`"]) == ["`optim.lr`"]
    assert gen.main([]) == 0 and target.read_text() == rendered  # regenerating fixes it
    assert gen.main(["--check"]) == 0


def _train_commands() -> list[tuple[str, str, list[str], str]]:
    """``(page, config, overrides, accelerate config)`` of every training command in a shell block of the README and
    docs pages: ``-m diffrl.train`` or ``diffrl train`` with a shipped YAML preset (continuation lines joined), with
    the ``--config_file`` of an ``accelerate launch`` ("" without one)."""
    import shlex

    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "configs").rglob("*.md"))]:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split("#", 1)[0]) if line.strip() else []
                launch = words[words.index("--config_file") + 1] if "--config_file" in words[:-1] else ""
                for i, word in enumerate(words[:-1]):
                    if word in ("diffrl.train", "train") and words[i + 1].endswith(".yaml"):
                        config = words[i + 1]
                        overrides = [w for w in words[i + 2 :] if "=" in w and not w.startswith("-")]
                        if (ROOT / config).is_file() and "..." not in " ".join(overrides):
                            found.append((page.name, config, overrides, launch))
    return found


def test_training_commands_in_the_docs_pass_the_config_checks():
    # the checks of the launch too: an FSDP or DeepSpeed accelerate config refuses what they cannot run
    commands = _train_commands()
    assert len(commands) >= 5  # the parser found the documented launches
    assert any("fsdp" in launch for *_, launch in commands) and any(
        "deepspeed" in launch for *_, launch in commands
    )
    for page, config, overrides, launch in commands:
        try:
            cfg = c.load_config(ROOT / config, overrides)
            c.validate(
                cfg,
                sharded="fsdp" in launch or cfg.fsdp,
                zero_stage=2 if "zero2" in launch else cfg.zero_stage,
            )
        except c.ConfigError as err:
            pytest.fail(f"{page}: {config} {' '.join(overrides)} (launch {launch or 'none'}): {err}")


def test_architecture_page_names_every_module():
    """docs/architecture.md describes the house: every module of the package is named there (as ``diffrl.x.y``, or
    as its file name in the row of a package that holds it)."""
    text = (DOCS / "architecture.md").read_text()
    folders = {
        "diffrl": ROOT / "diffrl",
        "diffrl.rewards": ROOT / "rewards",
        "diffrl.samplers": ROOT / "samplers",
    }
    missing = []
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if rel.name in ("__init__", "__main__") or "assets" in rel.parts:
                continue
            dotted = ".".join([package, *rel.parts])
            if dotted.startswith(("diffrl.rewards.", "diffrl.samplers.")) and package == "diffrl":
                continue
            if f"`{dotted}`" in text:
                continue
            parts = dotted.split(".")
            ancestors = tuple(f"| `{'.'.join(parts[:i])}`" for i in range(2, len(parts)))
            rows = [line for line in text.splitlines() if line.startswith(ancestors)]
            if not any(f"`{rel.name}`" in row for row in rows):
                missing.append(dotted)
    assert not missing, f"docs/architecture.md does not name {missing}"
