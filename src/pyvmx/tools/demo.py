"""``pyvmx demo``: the intercepts and the async page fault, shown by one guest on the KVM-style hypervisor.

The guest (``guests/demo.S``, assembled at first use) boots from real mode to long mode on vCPU
0 while vCPU 1 counts; both share one physical CPU, sliced by the VMX-preemption timer.  Only
port 0x3F8 (and the debug-exit port) is intercepted, only writes of IA32_EFER (the KVM
paravirtual MSRs lie outside the MSR bitmap's ranges, so they always exit: SDM 25.6.9), only
CR0.PG.  Guest RAM is mapped by the TDP MMU on first touch (EPT
violations), and one page is swapped out on the host: with async page faults the guest parks
the task that touched it and runs the other one meanwhile.  It ends with kvm_stat-like tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from rich.console import Console
from rich.table import Table

from pyvmx.arch.x86 import Cr0
from pyvmx.tools.stats import per_vcpu_table

DEMO_RAM = 8 << 20
LOAD_ADDRESS = 0x8000
COLD_PAGE = 0x400000  # the page the host swaps out (COLD_PAGE in demo.S)
AP_TABLES = 0x20000  # where vCPU 1's boot GDT and page tables go (clear of the image)
SLICE_TSC = 50_000
DURATION_TSC = 40_000_000


@dataclass
class DemoResult:
    serial: str = ""
    exit_code: int | None = None
    ending: str = ""
    b_count_during_page_in: int | None = None
    exits: dict[int, dict[str, int]] = field(default_factory=dict)  # vcpu -> reason -> count
    run_tsc: dict[int, int] = field(default_factory=dict)
    slices: dict[int, int] = field(default_factory=dict)
    mmu: dict[str, int] = field(default_factory=dict)
    ap_counter: int = 0


def demo_image() -> Any:
    from pyvmx.guest.assemble import assemble

    source = resources.files("pyvmx.tools").joinpath("guests/demo.S").read_text()
    return assemble(source, LOAD_ADDRESS, name="demo")


def run_demo(*, async_pf: bool = True) -> DemoResult:
    """Boot the demo guest and schedule its two vCPUs until vCPU 0 writes the debug-exit port."""
    from pyvmx.kvm import exits as kx
    from pyvmx.kvm.boot import setup_long_mode, setup_real_mode
    from pyvmx.kvm.kvm import Kvm
    from pyvmx.kvm.loader import load_flat
    from pyvmx.kvm.scheduler import Scheduler

    image = demo_image()
    kvm = Kvm(cpus=1)
    vm = kvm.create_vm(name="demo")
    ram = vm.add_ram(0, DEMO_RAM, huge=False)  # 4-KiB host pages: one EPT violation per page
    load_flat(vm, image.code, LOAD_ADDRESS)
    bsp, ap = vm.create_vcpu(), vm.create_vcpu()
    setup_real_mode(bsp, image.symbols["_start"])
    setup_long_mode(ap, image.symbols["ap_main"], tables_gpa=AP_TABLES)
    bsp.intercept_io(0x3F8, only=True)
    bsp.intercept_io(0xF4)
    bsp.intercept_msr("IA32_EFER", read=False, only=True)
    if not async_pf:
        # A hypervisor without async PF: the guest's MSR_KVM_ASYNC_PF_EN write is accepted but
        # ignored, so a fault on a swapped-out page makes the vCPU wait for the page-in.
        bsp.msrs.async_pf = None
    bsp.intercept_cr0_bits(Cr0.PG, only=True)
    vm.write_guest(COLD_PAGE, b"cold")  # populate it, then push it out to the backing store
    kvm.host_mm.swap_out(ram + COLD_PAGE, 4096)

    result = DemoResult()

    def on_exit(vcpu: Any, exit: Any) -> bool:
        if isinstance(exit, kx.IoExit):
            return True
        if isinstance(exit, kx.DebugExit):
            result.exit_code = exit.code
        result.ending = type(exit).__name__
        scheduler.runqueue.clear()  # the VM is over
        scheduler.halted.clear()
        return False

    scheduler = Scheduler(kvm, slice_tsc=SLICE_TSC, on_exit=on_exit)
    scheduler.add(bsp)
    scheduler.add(ap)
    report = scheduler.run(duration=DURATION_TSC)
    result.ending = result.ending or report.stopped_because
    result.serial = bytes(vm.serial_output).decode("latin-1")
    if result.exit_code is not None:
        when = vm.read_guest(image.symbols["b_when_a_done"], 8)
        result.b_count_during_page_in = int.from_bytes(when, "little")
    result.ap_counter = int.from_bytes(vm.read_guest(0x500000, 8), "little")
    for vcpu in (bsp, ap):
        result.exits[vcpu.id] = dict(vcpu.stats.exits)
        result.run_tsc[vcpu.id] = report.share(vcpu).run_tsc
        result.slices[vcpu.id] = report.share(vcpu).slices
    result.mmu = dict(vm.mmu.stats)
    return result


def print_demo(console: Console) -> int:
    console.print("[bold]pyvmx demo[/bold]: a VT-x guest on a KVM-style hypervisor, in Python\n")
    result = run_demo()
    console.print("[bold]Guest serial output[/bold] (THR at 0x3F8 is the only intercepted UART port):")
    for line in result.serial.splitlines():
        console.print(f"  {line}", highlight=False)
    console.print()
    console.print(per_vcpu_table(result.exits))
    sched = Table(title="1 physical CPU, 2 vCPUs (preemption-timer slices)")
    for column in ("vCPU", "slices", "guest TSC in non-root", "share"):
        sched.add_column(column, justify="right")
    total = sum(result.run_tsc.values()) or 1
    for vcpu in sorted(result.run_tsc):
        sched.add_row(str(vcpu), str(result.slices[vcpu]), str(result.run_tsc[vcpu]), f"{100 * result.run_tsc[vcpu] / total:.0f}%")
    console.print(sched)
    mmu = result.mmu
    console.print(
        f"TDP MMU: pf_taken={mmu.get('pf_taken', 0)} pf_fixed={mmu.get('pf_fixed', 0)} "
        f"pf_spurious={mmu.get('pf_spurious', 0)} pf_guest (async)={mmu.get('pf_guest', 0)} "
        f"pages_4k={mmu.get('pages_4k', 0)}"
    )
    if result.b_count_during_page_in is not None:
        console.print(
            f"Async page fault: while task A's page was paged in, task B ran "
            f"{result.b_count_during_page_in} loop iterations (without async PF it runs none)."
        )
    console.print(f"Ended: {result.ending}" + (f" (debug-exit code {result.exit_code})" if result.exit_code is not None else ""))
    return 0 if result.exit_code is not None else 1
