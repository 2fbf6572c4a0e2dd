"""``pyvmx run`` driven as a user would (subprocess): serial output on stdout, the intercepts
named as people say them, the exit status telling how the run ended, trace and stat output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

HELLO = r"""
    .code64
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x80, %dx
    out %al, %dx             # not intercepted with --intercept io:0x3f8
    mov $0xc0000080, %ecx
    rdmsr
    wrmsr                    # the EFER write
    mov $0xf4, %dx
    mov $7, %al
    out %al, %dx             # debug-exit port: ends the run with code 7
msg: .asciz "hello from pyvmx run\n"
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_run_prints_serial_output_and_exits_with_the_debug_exit_code(tmp_path: Path) -> None:
    proc = run_cli("run", str(_write(tmp_path, "hello.S", HELLO)))
    assert proc.stdout == "hello from pyvmx run\n"
    assert proc.returncode == 7, proc.stderr
    assert "debug-exit" in proc.stderr


def test_run_only_port_3f8_and_only_efer_writes_exit_seed_002(tmp_path: Path) -> None:
    """Seed 002 through the CLI: with io:0x3f8 only the serial port exits (one exit per
    character, none for port 0x80) and with msr-write:IA32_EFER only the WRMSR exits (SDM 26.1.3)."""
    trace = tmp_path / "run.jsonl"
    proc = run_cli(
        "run", str(_write(tmp_path, "hello.S", HELLO)), "--intercept", "io:0x3f8",
        "--intercept", "msr-write:IA32_EFER", "--trace", str(trace), "--stat",
    )
    assert proc.returncode == 7, proc.stderr
    exits = [json.loads(line) for line in trace.read_text().splitlines()]
    exits = [e for e in exits if e.get("kind") == "exit"]
    io = [e for e in exits if e["reason"] == "IO_INSTRUCTION"]
    ports = {e["qualification"] >> 16 for e in io}
    assert ports == {0x3F8, 0xF4}
    assert len(io) == len("hello from pyvmx run\n") + 1
    assert [e["reason"] for e in exits].count("MSR_WRITE") == 1
    assert "MSR_READ" not in {e["reason"] for e in exits}
    timeline = json.loads((tmp_path / "run.json").read_text())
    assert any(ev.get("ph") == "X" for ev in timeline["traceEvents"])
    assert "IO_INSTRUCTION" in proc.stderr and "Samples" in proc.stderr  # the --stat table


@pytest.mark.parametrize(
    "source, status",
    [
        ("cli\nhlt\n", 128),  # halted with nothing to wake it
        ("lidt bad(%rip)\nint3\nbad: .word 0\n.quad 0\n", 129),  # empty IDT: triple fault (SDM 6.15 #DF)
        ("cli\n1: jmp 1b\n", 131),  # endless loop with interrupts off: the TSC limit still ends it
    ],
)
def test_run_exit_status_says_how_the_run_ended(tmp_path: Path, source: str, status: int) -> None:
    proc = run_cli("run", str(_write(tmp_path, "g.S", ".code64\n_start:\n" + source)), "--max-tsc", "2000000")
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_two_vcpus_on_one_pcpu(tmp_path: Path) -> None:
    proc = run_cli("run", str(_write(tmp_path, "hello.S", HELLO)), "--vcpus", "2", "--pcpus", "1")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.startswith("hello from pyvmx run\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "/nonexistent/guest.S"], "cannot read"),
        (["run", "{elf}"], "ELF"),
        (["run", "{hello}", "--intercept", "msr-write:NOT_AN_MSR"], "NOT_AN_MSR"),
        (["run", "{hello}", "--load-address", "zz"], "--load-address"),
        (["run", "{hello}", "--entry", "nowhere"], "nowhere"),
        (["run", "{hello}", "--memory", "0"], "--memory"),
    ],
)
def test_run_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    elf = tmp_path / "bad.elf"
    elf.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 20)
    hello = _write(tmp_path, "hello.S", HELLO)
    proc = run_cli(*[a.format(elf=elf, hello=hello) for a in args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("option", ["--trace", "--record"])
def test_run_unwritable_output_is_one_line_before_running(tmp_path: Path, option: str) -> None:
    proc = run_cli("run", str(_write(tmp_path, "hello.S", HELLO)), option, "/nonexistent/dir/out.jsonl")
    assert proc.returncode == 2 and proc.stdout == ""  # refused before the guest ran
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr
