"""Run the ``pyvmx`` command as a user would: a subprocess, checking stdout/stderr/exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(*args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("COLUMNS", "160")
    return subprocess.run(
        [sys.executable, "-m", "pyvmx", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
    )
