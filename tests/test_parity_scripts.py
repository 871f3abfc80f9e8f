"""The by-hand parity scripts (benchmarks/parity_*.py, run with a clone of the reference code; docs/reproducing.md)
import and, without a reference clone, stop with one line that names the path, before any work."""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["parity_flow_grpo", "parity_diffusion_nft", "parity_awm", "parity_dpo", "parity_sa_solver"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_parity_script_without_its_reference_clone_stops_with_one_line(name, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-clone-here"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--reference", str(missing)])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "benchmarks" / f"{name}.py"), run_name="__main__")
    code = stop.value.code
    out = capsys.readouterr()
    message = str(code) if isinstance(code, str) else (out.err + out.out).strip()
    assert code not in (0, None), message
    assert str(missing) in message and "Traceback" not in message
    assert len(message.strip().splitlines()) == 1, message
