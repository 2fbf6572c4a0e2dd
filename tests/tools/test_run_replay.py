"""``pyvmx run --record`` / ``pyvmx replay``: the machine is deterministic (guest time is retired
instructions; the 8254 PIT and host page-ins run on guest time), so a recorded run with timer
interrupts and an async page fault replays to the identical VM-exit sequence, and a tampered
record is caught at its first differing exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

HERE = Path(__file__).resolve().parent
DEMO_GUEST = HERE.parents[1] / "src" / "pyvmx" / "tools" / "guests" / "demo.S"


def test_run_with_pit_interrupts_replays_identically(tmp_path: Path) -> None:
    """Five PIT ticks (IRQ 0 through the 8259, injected by the hypervisor) wake a HLT loop; the
    replay sees the same exits at the same guest TSC and the same five injections."""
    rec = tmp_path / "timer.rec"
    proc = run_cli("run", str(HERE / "guests" / "pit_timer.S"), "--record", str(rec))
    assert proc.returncode == 5, proc.stderr  # the guest reports its tick count
    data = json.loads(rec.read_text())
    assert data["config"]["events"]["irq_injections"] == 5
    assert [e["reason"] for e in data["exits"]].count(12) == 5  # one HLT exit per tick
    again = run_cli("replay", str(rec))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"identical: {len(data['exits'])} exits")


def test_run_with_async_page_fault_replays_identically(tmp_path: Path) -> None:
    """Seed 001: the demo guest's touch of a swapped-out page takes an async "page not present"
    #PF and a "page ready" interrupt; replaying gives the same exits and events."""
    rec = tmp_path / "apf.rec"
    proc = run_cli(
        "run", str(DEMO_GUEST), "--mode", "real", "--load-address", "0x8000", "--swap-out", "0x400000",
        "--intercept", "io:0x3f8", "--record", str(rec), "--max-tsc", "20000000",
    )
    assert "task A got its page back" in proc.stdout, proc.stderr
    assert proc.returncode < 128  # the guest's own debug exit, not the TSC limit: "page ready" is
    # delivered when the page-in completes, even with no other exit to end the guest's run
    events = json.loads(rec.read_text())["config"]["events"]
    assert events["pf_guest"] == 1 and events["exception_injections"] >= 1
    again = run_cli("replay", str(rec))
    assert again.returncode == 0 and again.stdout.startswith("identical:"), again.stderr


def test_tampered_record_diverges_at_the_changed_exit(tmp_path: Path) -> None:
    rec = tmp_path / "timer.rec"
    assert run_cli("run", str(HERE / "guests" / "pit_timer.S"), "--record", str(rec)).returncode == 5
    data = json.loads(rec.read_text())
    data["exits"][3]["tsc"] += 1
    rec.write_text(json.dumps(data))
    proc = run_cli("replay", str(rec))
    assert proc.returncode == 1
    assert "diverged" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
