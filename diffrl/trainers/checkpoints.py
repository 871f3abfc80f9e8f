"""Checkpoint directories on disk: the completion marker, checksums, finding the newest good one, the safe swap.

A checkpoint is a directory ``checkpoint-<step>`` holding the run's tensors and state (written by
:meth:`diffrl.trainers.engine.Trainer.save_checkpoint`). It is first written under a hidden temporary name; the last
file written is ``checksums.json`` (the SHA-256 of every other file), which marks it complete; then it is renamed into
place. A kill at any moment therefore leaves either a complete checkpoint or a hidden directory that is never read.
Loading verifies the checksums: a checkpoint whose files changed (a flipped bit, a truncated copy) is refused, and
``latest`` falls back to the newest checkpoint that verifies. Checkpoints written before the marker existed have no
``checksums.json``; they are read as before, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

__all__ = [
    "CHECKPOINT_PREFIX",
    "CHECKSUMS",
    "write_checksums",
    "verify",
    "checkpoints",
    "find_latest",
    "swap_into_place",
    "prune",
]

CHECKPOINT_PREFIX = "checkpoint-"
CHECKSUMS = "checksums.json"  # written last: a checkpoint with it is complete
_REQUIRED = ("trainable.safetensors", "optim.pt", "state.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Write ``checksums.json`` (SHA-256 and size of every file in ``directory``) through a temporary file and
    ``fsync``, so the marker exists only once every file it names is on disk."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKSUMS)
    for p in files:  # the data reach the disk before the marker that vouches for them
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    table = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    tmp = directory / f".{CHECKSUMS}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / CHECKSUMS)


def verify(directory: Path) -> str | None:
    """``None`` when ``directory`` is a complete checkpoint whose files match their checksums, else the reason in a
    few words (a missing file, a size or checksum mismatch, no completion marker). A checkpoint from before the
    marker (no ``checksums.json`` but every required file) verifies as ``None``."""
    missing = [name for name in _REQUIRED if not (directory / name).is_file()]
    marker = directory / CHECKSUMS
    if not marker.is_file():
        return f"{missing[0]} is missing" if missing else None
    try:
        table = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS} cannot be read"
    for name, entry in sorted(table.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, not the {entry.get('bytes')} it was written with"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its checksum (the file changed after it was written)"
    if missing:
        return f"{missing[0]} is missing"
    return None


def checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` directories of ``output_dir``, oldest first (hidden temporary ones excluded)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    return sorted(found, key=lambda p: _step_of(p))


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(CHECKPOINT_PREFIX) :])
    except ValueError:
        return -1


def find_latest(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``output_dir`` that verifies (``None`` if none does), and the newer ones skipped
    with their reasons."""
    skipped = []
    for path in reversed(checkpoints(output_dir)):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete checkpoint ``tmp`` to ``final``. An existing ``final`` (the same step written again) is
    first moved aside and only removed once the new one is in place, so no moment leaves the step without a complete
    copy on disk (a kill between the renames leaves it under ``.old-<name>`` and the new one under ``tmp``)."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(output_dir: Path, limit: int, known_good: Path | None = None) -> list[Path]:
    """Delete all but the newest ``limit`` checkpoints (0: keep all), but never the newest one that verifies;
    ``known_good`` is one just written (not hashed again). Returns what was deleted."""
    if limit <= 0:
        return []
    found = checkpoints(output_dir)
    doomed = found[: max(0, len(found) - limit)]
    kept = found[len(doomed) :]
    if doomed and known_good not in kept and all(verify(p) is not None for p in reversed(kept)):
        good, _ = find_latest(output_dir)  # every kept one is bad: keep the newest good one as well
        doomed = [p for p in doomed if p != good]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
