"""Drive ``pyvmx run IMAGE --gdb PORT`` with a real gdb in batch mode, as a user would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tools.cli_helpers import SRC

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
TIMEOUT = 120


@dataclass
class Session:
    gdb: subprocess.CompletedProcess[str]
    status: int  # pyvmx run's exit status
    stdout: str  # the guest's serial output (pyvmx run's stdout)
    stderr: str

    @property
    def gdb_output(self) -> str:
        return self.gdb.stdout + self.gdb.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gdb_argv(port: int, commands: list[str], *, prelude: tuple[str, ...] = ()) -> list[str]:
    argv = ["gdb", "-nx", "-batch", "-ex", "set pagination off", *[a for c in prelude for a in ("-ex", c)],
            "-ex", f"target remote :{port}"]
    for command in commands:
        argv += ["-ex", command]
    return argv


def run_with_gdb(image: Path, commands: list[str], *extra: str, prelude: tuple[str, ...] = ()) -> Session:
    """``pyvmx run IMAGE --gdb PORT`` with gdb running ``commands`` (then detaching, as batch
    mode does at its end, after which the guest runs on to its end)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(SRC))
    server = subprocess.Popen([sys.executable, "-m", "pyvmx", "run", str(image), "--gdb", str(port), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert line.strip() == f"pyvmx run: gdb server listening on 127.0.0.1:{port}", line
        r = subprocess.run(gdb_argv(port, commands, prelude=prelude), capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        out, err = server.communicate(timeout=TIMEOUT)
        return Session(r, server.returncode, out, err)
    finally:
        server.kill()
        server.wait(timeout=10)


def registers(output: str, name: str) -> list[int]:
    """The values of ``info registers NAME`` lines in gdb's output."""
    return [int(line.split()[1], 16) for line in output.splitlines() if line.split()[:1] == [name]]
