"""Finding reward weights: a local file or directory, or files of a hub repository in the Hugging Face cache.

Every built-in declares the exact hub files it needs (:class:`HubFile`). With no network or ``HF_HUB_OFFLINE=1``
and a file absent from the cache, loading fails at once (no retry loop) with a :class:`WeightsNotFoundError`
naming the files and the command that fetches them (``diffrl download <reward>``, to run where there is network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubFile", "WeightsNotFoundError", "resolve_file", "resolve_snapshot", "fetch_hint"]


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository."""

    repo_id: str
    filename: str
    revision: str | None = None
    optional: bool = False  # skipped when the repository lacks it (or, offline, when it is not cached)

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}"


class WeightsNotFoundError(FileNotFoundError):
    """A reward's weights are neither local nor in the Hugging Face cache, and cannot be downloaded here."""


def fetch_hint(reward_name: str, files: list[HubFile]) -> str:
    listed = ", ".join(str(f) for f in files)
    repos = sorted({f.repo_id for f in files})
    hf_cmds = "; ".join(
        f"hf download {repo} {' '.join(f.filename for f in files if f.repo_id == repo)}" for repo in repos
    )
    return (
        f"reward {reward_name!r} needs {listed}, which are not in the Hugging Face cache and cannot be downloaded here "
        f"(offline or HF_HUB_OFFLINE=1); fetch them where there is network with `diffrl download {reward_name}` "
        f"(or `{hf_cmds}`) into the same HF cache, or pass a local path."
    )


def _download(file: HubFile, reward_name: str, all_files: list[HubFile]) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(file.repo_id, file.filename, revision=file.revision))
    except (LocalEntryNotFoundError, OSError) as err:
        if isinstance(err, (EntryNotFoundError, RepositoryNotFoundError)) and not isinstance(
            err, LocalEntryNotFoundError
        ):
            raise
        raise WeightsNotFoundError(fetch_hint(reward_name, all_files)) from err


def resolve_file(spec: str | Path | None, default: HubFile, reward_name: str) -> Path:
    """The local path of a weights file.

    ``spec`` is ``None`` (the default hub file), a local file, a local directory holding ``default.filename``,
    or a hub repo id whose ``default.filename`` is wanted.
    """
    if spec is None:
        return _download(default, reward_name, [default])
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / default.filename
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(
            f"reward {reward_name!r}: directory {path} has no {default.filename}; pass the file itself."
        )
    if str(spec).startswith((".", "/", "~")) or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        raise FileNotFoundError(
            f"reward {reward_name!r}: {spec} does not exist; pass an existing file or a hub repo id."
        )
    file = HubFile(str(spec), default.filename, default.revision)
    return _download(file, reward_name, [file])


def resolve_snapshot(
    spec: str | Path, files: list[str | HubFile], reward_name: str, revision: str | None = None
) -> Path:
    """A local directory with ``files`` of a hub repository (or ``spec`` itself when it is a local directory).

    Only the named files are fetched, so ``diffrl download --dry-run`` can list exactly what a reward needs.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if str(spec).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"reward {reward_name!r}: directory {spec} does not exist; pass a local directory or a hub id."
        )
    hub_files = [f if isinstance(f, HubFile) else HubFile(str(spec), f, revision) for f in files]
    hub_files = [HubFile(str(spec), f.filename, revision, f.optional) for f in hub_files]
    root = None
    for f in hub_files:
        try:
            p = _download(f, reward_name, [h for h in hub_files if not h.optional])
        except Exception:
            if f.optional:
                continue
            raise
        if root is None:
            root = p.parents[len(Path(f.filename).parts) - 1]
    if root is None:
        raise WeightsNotFoundError(fetch_hint(reward_name, hub_files))
    return root
