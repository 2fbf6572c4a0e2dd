"""Runaway guests and limits, driven through the CLI as a user would (issue 14 items 7-8, issue 11
items 4 and 8): a wall-clock ``--timeout`` for ``run`` and ``check`` that ends runs spending their
time in the engine's callbacks (where a SIGALRM never got through), option ranges refused with
one line and shown in ``--help``. Each subprocess has a timeout, so a regression fails instead of
hanging the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmx.tools import cli, run
from tests.tools.cli_helpers import run_cli

# MOV to CR3 flushes the TLB (SDM 4.10.4.1): every iteration refills it through the engine's
# Python TLB hook -- ~25,000 iterations a second, so 10^12 guest ticks would take days.
CR3_RELOAD_LOOP = """
1:  mov %cr3, %rax
    mov %rax, %cr3
    mov (%rsp), %rbx
    jmp 1b
"""


def _source(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "guest.S"
    path.write_text(".code64\n.globl _start\n_start:\n" + body)
    return path


def test_run_timeout_ends_a_cr3_reload_loop_with_status_133(tmp_path: Path) -> None:
    proc = run_cli("run", str(_source(tmp_path, CR3_RELOAD_LOOP)), "--max-tsc", str(10**12), "--timeout", "1", timeout=120)
    assert proc.returncode == run.EXIT_TIMEOUT == 133, proc.stderr
    assert "wall-clock limit of 1 s reached" in proc.stderr


def test_run_timeout_stops_native_code_with_no_exit(tmp_path: Path) -> None:
    """``jmp .`` with no timer armed runs in the engine's native code without a single callback
    into Python: only the deadline's thread stopping the engine (uc_emu_stop) can end it."""
    proc = run_cli("run", str(_source(tmp_path, "1: jmp 1b\n")), "--max-tsc", str(10**15), "--timeout", "1", timeout=120)
    assert proc.returncode == 133, proc.stderr


def test_run_timeout_with_several_vcpus(tmp_path: Path) -> None:
    proc = run_cli("run", str(_source(tmp_path, CR3_RELOAD_LOOP)), "--vcpus", "2", "--max-tsc", str(10**12), "--timeout", "1", timeout=120)
    assert proc.returncode == 133, proc.stderr
    assert "wall-clock limit of 1 s reached" in proc.stderr


def test_check_timeout_ends_a_scenario_stuck_in_engine_callbacks(tmp_path: Path) -> None:
    """``check --timeout 5`` used SIGALRM, whose handler raised inside a Unicorn callback where
    ctypes swallowed it: the CR3-reload loop ran on for minutes. Now the run ends as a failure
    of that scenario, and the others still run."""
    scenario = tmp_path / "cr3.toml"
    body = CR3_RELOAD_LOOP.replace("\n", "\n    ")
    scenario.write_text(f'name = "cr3 reload loop"\nmode = "long"\nintercept = ["hlt"]\nsource = """\n{body}\n"""\n\n[[expect]]\nreason = "HLT"\n')
    hlt = Path(__file__).resolve().parents[2] / "examples" / "scenarios" / "hlt.toml"
    proc = run_cli("check", str(scenario), str(hlt), "--timeout", "1", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  cr3.toml: cr3 reload loop" in proc.stdout
    assert "timed out after 1s (wall clock" in proc.stdout
    assert "PASS  hlt.toml" in proc.stdout and "1 passed, 1 failed" in proc.stdout


@pytest.mark.parametrize("value", ["0", "-5"])
def test_run_refuses_a_max_tsc_below_one(tmp_path: Path, value: str) -> None:
    proc = run_cli("run", str(_source(tmp_path, "hlt\n")), "--max-tsc", value, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"pyvmx: error: Invalid value for '--max-tsc': {value} is not in the range x>=1."


@pytest.mark.parametrize("option, value", [("--vcpus", "9"), ("--vcpus", "0"), ("--memory", "1025"), ("--memory", "0"), ("--timeout", "-1")])
def test_run_refuses_out_of_range_options(tmp_path: Path, option: str, value: str) -> None:
    proc = run_cli("run", str(_source(tmp_path, "hlt\n")), option, value, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and f"'{option}'" in proc.stderr


def test_run_help_shows_the_ranges_of_vcpus_memory_and_max_tsc() -> None:
    proc = run_cli("run", "--help", timeout=60)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert f"1<=x<={run.MAX_VCPUS}" in text and f"1<=x<={run.MAX_MEMORY_MIB}" in text and "x>=1" in text
    assert (cli.MAX_VCPUS, cli.MAX_MEMORY_MIB) == (run.MAX_VCPUS, run.MAX_MEMORY_MIB)


def test_run_refuses_more_memory_than_the_host_can_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest RAM the host cannot back is refused before anything runs, with the limit stated
    (a guest touching it all would otherwise fail half-way)."""
    monkeypatch.setattr(run, "host_backable_mib", lambda: 64)
    options = run.RunOptions(_source(tmp_path, "hlt\n"), memory_mib=128)
    with pytest.raises(run.RunError, match="--memory 128 MiB is more than this host can back: at most 64 MiB"):
        run.run(options)
    assert run.run(run.RunOptions(_source(tmp_path, "hlt\n"), memory_mib=64, max_tsc=10_000)).ending == "halted"
