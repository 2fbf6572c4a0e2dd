"""The built-in demo (``pyvmx demo``) tells the seeds' story on the hypervisor; each claim it
prints is checked here against the SDM / Linux behaviour it illustrates."""

from __future__ import annotations

import pytest

from pyvmx.tools.demo import run_demo
from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine


@pytest.fixture(scope="module")
def with_apf():  # type: ignore[no-untyped-def]
    return run_demo(async_pf=True)


def test_demo_boots_to_long_mode_and_prints_through_the_uart(with_apf) -> None:  # type: ignore[no-untyped-def]
    """Real -> protected -> long mode by the guest itself; the EFER write and the CR0.PG write
    exit (MSR bitmap write-high bit 0x80; CR0 guest/host mask = PG: SDM 26.1.3), the UART's THR
    writes exit (I/O bitmap A bit 0x3F8) while its LSR polls do not."""
    lines = with_apf.serial.splitlines()
    assert lines[0].startswith("pyvmx demo guest: real mode -> long mode done")
    assert lines[-1] == "task A got its page back; task B ran meanwhile"
    bsp = with_apf.exits[0]
    assert bsp["IO_INSTRUCTION"] == len(with_apf.serial) + 1  # every THR write + the debug exit
    assert bsp["CR_ACCESS"] == 2  # CR4.PAE (KVM owns CR4) and CR0.PG; CR0.PE does not exit
    assert "MSR_READ" not in bsp  # RDMSR of EFER is not intercepted


def test_demo_first_touch_faults_are_fixed_by_the_tdp_mmu(with_apf) -> None:  # type: ignore[no-untyped-def]
    """Seed 004: every EPT violation on a first touch is a pf_taken that ends pf_fixed, with 4-KiB
    leaves (the demo's host memory has no THP)."""
    mmu = with_apf.mmu
    assert mmu["pf_taken"] == mmu["pf_fixed"] >= 16 + 1  # the 16 touched pages and the image
    assert mmu["pages_4k"] == mmu["pf_fixed"] and mmu.get("pages_2m", 0) == 0


def test_demo_two_vcpus_share_one_cpu_by_preemption_timer(with_apf) -> None:  # type: ignore[no-untyped-def]
    """Seed 002's last question: both vCPUs are sliced by the VMX-preemption timer (exit 52) and
    get guest time within 10% of each other."""
    assert with_apf.exits[0]["PREEMPTION_TIMER"] > 0 and with_apf.exits[1]["PREEMPTION_TIMER"] > 0
    a, b = with_apf.run_tsc[0], with_apf.run_tsc[1]
    assert abs(a - b) <= 0.1 * max(a, b)
    assert with_apf.ap_counter > 0


def test_demo_async_page_fault_lets_the_other_task_run() -> None:
    """Seed 001 / Linux async_pf: with async PF the touching task is parked and task B runs
    while the page is paged in; without it the vCPU waits and task B runs not at all."""
    on = run_demo(async_pf=True)
    off = run_demo(async_pf=False)
    assert on.exit_code is not None and off.exit_code is not None
    assert on.mmu["pf_guest"] == 1 and off.mmu.get("pf_guest", 0) == 0
    assert on.b_count_during_page_in is not None and on.b_count_during_page_in > 1000
    assert off.b_count_during_page_in == 0


def test_pyvmx_demo_command_prints_output_and_tables() -> None:
    proc = run_cli("demo", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "task A got its page back" in proc.stdout
    assert "PREEMPTION_TIMER" in proc.stdout and "pf_fixed=" in proc.stdout
