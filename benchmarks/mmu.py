"""EPT-violation handling throughput of the TDP MMU (pyvmx.kvm.mmu), on the VT-x machine.

A long-mode guest writes one quadword into every 4-KiB page of a large range of its RAM. With
the MMU's EPT and nothing mapped up front, each first touch exits with an EPT violation that
kvm_mmu_page_fault() fixes before the guest re-executes the store -- once per 4-KiB page
without huge pages, once per 2-MiB block with THP-backed memory and huge pages on. The same
guest is then run again with the range pre-mapped (KVM_PRE_FAULT_MEMORY), and the two times are
printed side by side:

    python benchmarks/mmu.py [--mib-4k 16] [--mib-2m 128]

Columns: EPT-violation faults handled, wall time of the faulting run, faults per second over
that run (exit + MMU + re-entry), the MMU's own time per fault, the pre-mapped run's time, and
the ratio faulting / pre-mapped.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import VmxSandbox
from pyvmx.kvm.host_mm import HostMm
from pyvmx.kvm.memslots import Memslots
from pyvmx.kvm.mmu import RetPf, TdpMmu, ept_violation_error_code
from pyvmx.vmx.memory import PAGE_SIZE, PageAllocator

MIB = 1 << 20
TOUCH_BASE = 4 * MIB  # the range starts above the block holding the guest's tables and code
MMU_TABLES = (0x600000, 0xA00000)
HOST_POOL = 0xA00000


def touch_loop(pages: int) -> str:
    return f"""
        mov ${TOUCH_BASE:#x}, %rdi
        mov ${pages}, %rcx
    1:  movq %rcx, (%rdi)
        add $0x1000, %rdi
        dec %rcx
        jnz 1b
        hlt
    """


@dataclass
class Run:
    seconds: float
    faults: int
    mmu_seconds: float


def guest(touch_mib: int, huge: bool) -> tuple[VmxSandbox, TdpMmu, int]:
    ram = TOUCH_BASE + touch_mib * MIB
    sb = VmxSandbox("long", touch_loop(touch_mib * MIB // PAGE_SIZE), map_all=False, memory=HOST_POOL + ram + 8 * MIB)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    host_mm = HostMm(PageAllocator(sb.memory, HOST_POOL))
    memslots = Memslots()
    mmu = TdpMmu(sb.memory, PageAllocator(sb.memory, *MMU_TABLES), memslots, host_mm,
                 invept=lambda: sb.cpu.invept(2, 0), huge_pages=huge)
    hva = host_mm.mmap(ram, huge=huge)
    for gpa in range(0, sb.guest_ram, PAGE_SIZE):
        data = sb.read_memory(gpa, PAGE_SIZE)
        if any(data):
            host_mm.write(hva + gpa, data)
    memslots.set_user_memory_region(0, 0, 0, ram, hva)
    sb.write(F.EPT_POINTER, mmu.eptp)
    return sb, mmu, ram


def run(sb: VmxSandbox, mmu: TdpMmu) -> Run:
    faults = 0
    in_mmu = 0.0
    start = time.perf_counter()
    while True:
        exit = sb.run()
        if exit.exit_reason is not ExitReason.EPT_VIOLATION:
            assert exit.exit_reason is ExitReason.HLT, exit
            break
        t = time.perf_counter()
        outcome = mmu.page_fault(exit.guest_physical_address, ept_violation_error_code(exit.qualification))
        in_mmu += time.perf_counter() - t
        assert outcome.result in (RetPf.FIXED, RetPf.SPURIOUS), outcome
        faults += 1
    return Run(time.perf_counter() - start, faults, in_mmu)


def case(label: str, touch_mib: int, huge: bool) -> None:
    sb, mmu, _ = guest(touch_mib, huge)
    faulting = run(sb, mmu)
    stats = mmu.stats
    sb2, mmu2, ram = guest(touch_mib, huge)
    mmu2.pre_fault_memory(0, ram)
    premapped = run(sb2, mmu2)
    assert premapped.faults == 0, premapped
    print(
        f"{label:<22} {faulting.faults:>7} {faulting.seconds:>9.3f} s {faulting.faults / faulting.seconds:>10.0f}"
        f" {faulting.mmu_seconds / max(1, faulting.faults) * 1e6:>9.1f} us {premapped.seconds:>9.3f} s"
        f" {faulting.seconds / premapped.seconds:>7.2f}x   (4K {stats['pages_4k']}, 2M {stats['pages_2m']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib-4k", type=int, default=16, help="MiB touched with 4-KiB pages (default 16)")
    parser.add_argument("--mib-2m", type=int, default=128, help="MiB touched with 2-MiB pages (default 128)")
    args = parser.parse_args()
    print(f"{'case':<22} {'faults':>7} {'first touch':>11} {'faults/s':>10} {'MMU/fault':>12} {'pre-mapped':>11} {'ratio':>8}")
    case(f"4 KiB, {args.mib_4k} MiB", args.mib_4k, huge=False)
    case(f"2 MiB (THP), {args.mib_2m} MiB", args.mib_2m, huge=True)


if __name__ == "__main__":
    main()
