"""VM exits take guest time: each exit with the entry back costs the CPU profile's
``vmexit_tsc_cost`` TSC ticks (the world switch, SDM 28.3-28.5 and 27.3, takes the processor
about 1,000-2,000 cycles), deterministically -- so a guest that waits for the TSC to advance
while exiting on every iteration (kvm-unit-tests x86/vmexit.c loops for 2^30 cycles of CPUID)
finishes after as many iterations as real hardware would give it, not billions."""

from __future__ import annotations

import pytest

from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.vmx.caps import CpuProfile

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image, u64

pytestmark = pytest.mark.machine

def test_default_round_trip_is_in_the_measured_range() -> None:
    """The default profile charges a VM exit what real Intel parts take for the world switch:
    about 2,000 cycles on Nehalem (SplitX, WIOV 2011), less on later cores -- not 0, and not an
    order of magnitude off.  (That each exit is charged exactly this much:
    test_host_robustness.test_every_vm_exit_costs_the_profiles_round_trip_time.)"""
    assert 1_000 <= CpuProfile.default().vmexit_tsc_cost <= 2_000


TSC_WAIT = r"""
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rdi
    add $2400000, %rdi             # wait 2.4 M TSC ticks, exiting on every iteration
    xor %ebx, %ebx
1:  mov %ebx, %r12d
    mov $0, %eax
    cpuid
    mov %r12d, %ebx
    inc %ebx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    cmp %rdi, %rax
    jb 1b
    mov %ebx, iterations(%rip)
    EXIT_WITH $0x22
    .align 8
iterations: .quad 0
"""


def test_tsc_bounded_loop_of_exits_ends() -> None:
    """A loop that runs until the TSC has advanced 2.4 M ticks, with a CPUID exit per
    iteration: about 2.4 M / (cost + the iteration's instructions and the hypervisor's own
    handling, pyvmx.kvm.host_time) iterations -- a thousand or two, not 2.4 M / 10."""
    vm = Kvm().create_vm(memory_size=4 << 20)
    img = source_image(TSC_WAIT)
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x22)
    iterations = u64(vm, img.symbol("iterations"))
    cost = CpuProfile.default().vmexit_tsc_cost
    assert 2_400_000 // (cost + 40) <= iterations <= 2_400_000 // cost + 1
