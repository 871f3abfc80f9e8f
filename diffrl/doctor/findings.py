"""The doctor's report: one :class:`Finding` per check, and the helpers that word findings."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STATUSES", "Finding", "split_fix", "gib", "count"]

STATUSES = ("OK", "WARN", "FAIL")
GiB = 1024**3


@dataclass
class Finding:
    """One line of the report: ``status`` is OK, WARN or FAIL; ``fix`` says what to do when it is not OK."""

    name: str
    status: str
    message: str
    fix: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r} must be one of {', '.join(STATUSES)}.")

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.message}"
        if self.status != "OK" and self.fix:
            text += f"  Fix: {self.fix}"
        return text

    def __str__(self) -> str:
        return self.line()


def split_fix(message: str, default_fix: str) -> tuple[str, str]:
    """Project errors read "what is wrong; what to do": split them into a finding's message and fix."""
    message = message.strip()
    if "; " in message:
        what, fix = message.split("; ", 1)
        return what, fix[:1].upper() + fix[1:]
    return message.rstrip("."), default_fix


def gib(nbytes: float) -> str:
    if nbytes >= 0.1 * GiB:
        return f"{nbytes / GiB:.1f} GiB"
    if nbytes >= 1024**2:
        return f"{nbytes / 1024**2:.1f} MiB"
    return f"{nbytes / 1024:.1f} KiB"


def count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if size > 1e3 else 1}f}{unit}"
    return str(int(n))
