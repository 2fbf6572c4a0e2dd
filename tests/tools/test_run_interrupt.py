"""Issue 14.4: ``--trace X.json`` writes the JSON lines *and* the Perfetto timeline and says where
(one line on stderr); Ctrl-C (SIGINT) ends a run cleanly -- the trace and the statistics so far
are written, the last RIP is printed, and the status is 130 (128 + SIGINT, as a shell reports
a process ended by Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tools.cli_helpers import SRC, run_cli

pytestmark = pytest.mark.machine

OUTS_THEN_EXIT = ".code64\n_start: mov $0x3f8, %dx\n out %al, %dx\n out %al, %dx\n mov $0xf4, %dx\n mov $5, %al\n out %al, %dx\n"
SPIN = r"""
    .code64
_start:
    mov $0x80, %dx
spin:
    out %al, %dx             # an exit each time round (io), and no end
    jmp spin
"""


@pytest.mark.parametrize("name", ["run.json", "run.jsonl", "run"])
def test_trace_writes_json_lines_and_perfetto_and_says_where(tmp_path: Path, name: str) -> None:
    guest = tmp_path / "g.S"
    guest.write_text(OUTS_THEN_EXIT)
    proc = run_cli("run", str(guest), "--trace", str(tmp_path / name))
    assert proc.returncode == 5, proc.stderr
    jsonl = tmp_path / ("run" if name == "run" else "run.jsonl")
    chrome = tmp_path / "run.json"
    assert f"pyvmx: trace: {jsonl} (JSON lines: pyvmx trace show/stats) and {chrome} (Perfetto: ui.perfetto.dev)" in proc.stderr.splitlines()
    assert json.loads(jsonl.read_text().splitlines()[0])["format"]  # the JSON-lines header
    assert "traceEvents" in json.loads(chrome.read_text())
    shown = run_cli("trace", "show", str(jsonl), "--reason", "IO_INSTRUCTION")
    assert shown.returncode == 0 and shown.stdout.count("IO_INSTRUCTION") == 3, shown.stdout + shown.stderr


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_until_running(pid: int) -> None:
    """Until the run is past start-up (imports, assembly, VM set-up: about 1-2 s of CPU) and has
    spun a while: measured in the process's own CPU time, so a loaded machine only makes it
    slower, never early."""
    start = time.monotonic()
    while time.monotonic() - start < 300:
        if time.monotonic() - start >= 4 and _cpu_seconds(pid) >= 4.0:
            return
        time.sleep(0.25)


def test_ctrl_c_ends_the_run_with_trace_stats_and_last_rip(tmp_path: Path) -> None:
    guest = tmp_path / "spin.S"
    guest.write_text(SPIN)
    env = dict(os.environ, PYTHONPATH=str(SRC), COLUMNS="160")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmx", "run", str(guest), "--intercept", "io", "--max-tsc", str(10**15),
         "--trace", str(tmp_path / "run.jsonl"), "--stat"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    _wait_until_running(proc.pid)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pyvmx: interrupted (Ctrl-C) at vCPU 0 RIP 0x"), err
    rip = int(last.split("RIP ")[1].split()[0], 16)
    symbols_start = 0x10000  # the default load address in long mode; the loop is OUT + JMP
    assert symbols_start + 5 <= rip <= symbols_start + 8, hex(rip)
    assert "Traceback" not in err
    events = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()[1:]]
    exits = [e for e in events if e["kind"] == "exit" and e["reason"] == "IO_INSTRUCTION"]
    assert len(exits) > 10
    assert "Total Samples: " in err and "IO_INSTRUCTION" in err  # the --stat tables
    assert (tmp_path / "run.json").exists()
