"""``diffrl doctor [CONFIG.yaml] [key=value ...] [--check GROUP] [--device DEV]``: run the checks of
:mod:`diffrl.doctor`, printing each finding as it comes; exit 0, 1 (a check FAILs) or 2 (bad input)."""

from __future__ import annotations

import argparse

from .errors import FAILED, CommandErrors

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from diffrl.doctor import CHECKS

    parser = argparse.ArgumentParser(
        prog="diffrl doctor",
        description="Check the environment (and a config) before a long run: one line per check with the fix.",
    )
    parser.add_argument(
        "words", nargs="*", help="a YAML config, then dotted key=value overrides (e.g. sample.batch_size=4)"
    )
    parser.add_argument(
        "--check", action="append", choices=CHECKS, help="run only this group of checks (repeatable)"
    )
    parser.add_argument(
        "--device", default=None, help="device of the on-policy probe (default: cuda if available)"
    )
    return parser


def _config_and_overrides(words: list[str]) -> tuple[str | None, list[str]]:
    if words and "=" not in words[0]:
        return words[0], words[1:]
    return None, words


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffrl.doctor import STATUSES, run_doctor

    config, overrides = _config_and_overrides(args.words)
    with CommandErrors() as errors:
        findings = run_doctor(
            config,
            overrides,
            checks=args.check,
            device=args.device,
            on_finding=lambda f: print(f.line(), flush=True),
        )
        counts = {s: sum(f.status == s for f in findings) for s in STATUSES}
        print(f"doctor: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
        return FAILED if counts["FAIL"] else 0
    return errors.code
