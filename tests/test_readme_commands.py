"""Issue 14.14: every shell command the README shows works as written.  The ```sh blocks are
extracted and each command is run with bash in a fresh directory holding the files the README
assumes (``guest.S`` -- examples/guests/hello_uart.S, which ends on the debug-exit port with code
0, so ``run ... && pyvmx replay run.rec`` goes on to the replay --, ``kernel.elf`` built from it
with GNU as/ld, and ``examples/``), in order (``trace show run.jsonl`` reads the first run's
trace).  Each must exit 0, as the README documents (the guest's debug-exit code 0; ``check``
with every scenario passing).  The examples/guests sources run with the exit status and output
their comments state."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Commands not run here, each with the reason.
EXCLUDED = {
    "make demo": "builds .venv from nothing (minutes); the demo itself is tests/test_demo.py",
    "make test": "builds .venv and runs this very suite",
    "make accel && PYVMX_ENGINE=accel .venv/bin/pyvmx demo": "builds Unicorn from source (minutes); CI runs the suite on both engines",
    "pyvmx gdbserver examples/scenarios/hlt.toml --port 1234": "waits for gdb to connect: tests/tools/test_gdbstub.py drives it with gdb",
    "pyvmx run guest.S --gdb 1234": "waits for gdb to connect: tests/tools/test_gdb_run.py drives it with gdb",
    "../shared/kvm-unit-tests/build.sh /tmp/kut": "builds kvm-unit-tests from ../shared (a minute): tests/kvm_unit_tests builds and runs them",
    "pyvmx unittests /tmp/kut/kvm-unit-tests/x86 msr tsc smptest --timeout 120 --logs logs/": "needs that build: tests/kvm_unit_tests runs its CI subset",
}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def test_the_readme_shows_commands_and_every_exclusion_is_one_of_them() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    assert set(EXCLUDED) <= set(commands)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    shutil.copy(ROOT / "examples/guests/hello_uart.S", work / "guest.S")
    shutil.copytree(ROOT / "examples", work / "examples")
    subprocess.run(["as", "--64", "-o", str(work / "kernel.o"), str(work / "guest.S")], check=True)
    subprocess.run(["ld", "-Ttext=0x10000", "-e", "_start", "-o", str(work / "kernel.elf"), str(work / "kernel.o")], check=True)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "pyvmx"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pyvmx "$@"\n')
    wrapper.chmod(0o755)
    return work


@pytest.mark.machine
def test_every_readme_command_runs_as_written(workdir: Path) -> None:
    env = dict(os.environ, PATH=f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}", COLUMNS="160",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ran = []
    for command in readme_commands():
        if command in EXCLUDED:
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, command
        ran.append(command)
    assert ran[0].startswith("pyvmx run guest.S")
    assert (workdir / "run.jsonl").exists() and (workdir / "run.json").exists()  # what the tour's comment opens
    assert (workdir / "run.rec").exists()


@pytest.mark.machine
@pytest.mark.parametrize(("guest", "args", "status", "stdout"), [
    ("hello_uart.S", (), 0, "hello from a pyvmx guest\n"),
    ("efer_cr0.S", ("--intercept", "msr-write:IA32_EFER", "--intercept", "cr0:TS", "--stat"), 0, ""),
    ("page_fault.S", (), 1, ""),
    ("pit_interrupts.S", ("--stat",), 5, ""),
])
def test_example_guests_end_as_their_comments_say(guest: str, args: tuple[str, ...], status: int, stdout: str) -> None:
    from tests.tools.cli_helpers import run_cli

    r = run_cli("run", str(ROOT / "examples/guests" / guest), *args)
    assert r.returncode == status, r.stderr
    assert r.stdout == stdout
    if guest == "efer_cr0.S":  # only the EFER write and the CR0 write that flips TS exit
        rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in r.stderr.splitlines() if line.count("│") == 3}
        assert rows.get("MSR_WRITE") == "1" and rows.get("CR_ACCESS") == "1", r.stderr
