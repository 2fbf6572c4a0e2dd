"""XSETBV / XGETBV and XCR0 under the hypervisor: the checks of kvm-unit-tests' x86/xsave.c as a
small guest.  SDM Vol. 2C XSETBV / XGETBV: #UD when CR4.OSXSAVE = 0 (before the VM exit, SDM
26.1.1); #GP(0) for an ECX other than 0 (RCX[63:32] ignored), XCR0[0] = 0, YMM without SSE,
bits the processor does not support; XGETBV of an XCR that does not exist.
XSETBV always exits (SDM 26.1.2) and KVM checks it (arch/x86/kvm/x86.c __kvm_set_xcr()); XGETBV
does not exit, so the XCR0 KVM accepted must be the one the CPU holds (kvm_load_guest_xsave_state()),
starting from x87 only (kvm_vcpu_reset())."""

from __future__ import annotations

import pytest

from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image

pytestmark = pytest.mark.machine

UD, GP = 6, 13
XSETBV = ".byte 0x0f, 0x01, 0xd1"
XGETBV = ".byte 0x0f, 0x01, 0xd0"

# (instruction, RCX, EDX, EAX, expected vector, expected EAX after XGETBV or None)
PROBES_WITHOUT_OSXSAVE = [
    (XGETBV, 0, 0, 0, UD, None),
    (XSETBV, 0, 0, 3, UD, None),
]
PROBES = [
    (XGETBV, 0, 0, 0, 0, 1),  # XCR0 after reset: x87 only
    (XSETBV, 0, 0, 3, 0, None),  # x87 | SSE
    (XGETBV, 0, 0, 0, 0, 3),
    (XSETBV, 0xDEAD << 32, 0, 1, 0, None),  # RCX[63:32] ignored: XCR0
    (XGETBV, 0xBEEF << 32, 0, 0, 0, 1),
    (XSETBV, 0, 0, 0, GP, None),  # x87 off
    (XSETBV, 0, 0, 2, GP, None),  # SSE without x87
    (XSETBV, 0, 0, 7, GP, None),  # AVX: not in CPUID leaf 0DH
    (XSETBV, 0, 0x80000000, 1, GP, None),  # reserved bit 63
    (XSETBV, 1, 0, 1, GP, None),  # XCR1
    (XSETBV, 1 << 31, 0, 3, GP, None),
    # XGETBV(1) is left out, as xsave.c leaves it out: XGETBV does not exit, so whether it
    # #GPs follows the processor (the engine's model has XGETBV_ECX1), not the guest's CPUID.
    (XGETBV, 2, 0, 0, GP, None),
    (XGETBV, 1 << 31, 0, 0, GP, None),
    (XGETBV, 0, 0, 0, 0, 1),  # the failed writes changed nothing
]

GUEST = r"""
    SET_GATE 6, ud_handler
    SET_GATE 13, gp_handler
    LOAD_IDT
    lea results(%rip), %rbx
{without}
    mov %cr4, %rax
    or $0x40000, %rax              # CR4.OSXSAVE
    mov %rax, %cr4
{with_osxsave}
    EXIT_WITH $0x33
ud_handler:
    movl $6, vector(%rip)
    addq $3, (%rsp)
    iretq
gp_handler:
    add $8, %rsp                   # the error code
    movl $13, vector(%rip)
    addq $3, (%rsp)
    iretq
    .align 8
vector: .long 0
results: .fill 64, 8, 0xff
    IDT_TABLE
"""


def probe_source(probes: list[tuple[str, int, int, int, int, int | None]]) -> str:
    lines = []
    for insn, rcx, edx, eax, _, _ in probes:
        lines += [
            f"    movabs ${rcx:#x}, %rcx", f"    mov ${edx:#x}, %edx", f"    mov ${eax:#x}, %eax",
            "    movl $0, vector(%rip)", f"    {insn}",
            "    mov vector(%rip), %r8d", "    mov %r8d, (%rbx)", "    mov %eax, 4(%rbx)", "    add $8, %rbx",
        ]
    return "\n".join(lines)


def test_xsetbv_xgetbv_checks_of_kvm_unit_tests_xsave() -> None:
    """Every probe of the table: the exception it raises (0: none) and what XGETBV returns."""
    vm = Kvm().create_vm(memory_size=4 << 20)
    img = source_image(GUEST.format(without=probe_source(PROBES_WITHOUT_OSXSAVE), with_osxsave=probe_source(PROBES)))
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x33)
    raw = vm.read_guest(img.symbol("results"), 8 * (len(PROBES_WITHOUT_OSXSAVE) + len(PROBES)))
    got = []
    for i, (insn, rcx, edx, eax, vector, value) in enumerate(PROBES_WITHOUT_OSXSAVE + PROBES):
        seen_vector = int.from_bytes(raw[8 * i : 8 * i + 4], "little")
        seen_eax = int.from_bytes(raw[8 * i + 4 : 8 * i + 8], "little")
        got.append((i, seen_vector, seen_eax if value is not None else None))
    assert got == [(i, p[4], p[5]) for i, p in enumerate(PROBES_WITHOUT_OSXSAVE + PROBES)]
    assert vcpu.xcr0 == 1
    assert vcpu.stats.exits["XSETBV"] == sum(p[0] == XSETBV for p in PROBES)  # none without OSXSAVE
