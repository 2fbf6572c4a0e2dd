"""RFLAGS.RF (SDM Vol. 3B 18.3.1.1, Vol. 3A 6.12.1): a fault-class exception pushes RF = 1 --
also when the hypervisor injects it (KVM kvm_check_and_inject_events(): exception_type() ==
EXCPT_FAULT sets X86_EFLAGS_RF before injection); RF is cleared once an instruction completes,
IRET loads it from the image (in real mode only IRETD: EFLAGS <- image AND 257FD5H), and PUSHF
never pushes it (kvm-unit-tests realmode.c test_iret "rflags.rf")."""

from __future__ import annotations

import pytest

from pyvmx.arch.x86 import ExceptionVector as V
from pyvmx.kvm import events
from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image, u64

pytestmark = pytest.mark.machine

RF = 1 << 16


def test_exception_class_is_kvms_exception_type() -> None:
    """exception_type(): #DB, #BP, #OF traps; #DF, #MC aborts; the other vectors below 32
    (reserved ones included) faults; NMI and vectors from 32 interrupts."""
    traps, aborts = {V.DB, V.BP, V.OF}, {V.DF, V.MC}
    for vector in range(32):
        expected = (
            events.ExceptionClass.INTERRUPT if vector == V.NMI
            else events.ExceptionClass.TRAP if vector in traps
            else events.ExceptionClass.ABORT if vector in aborts
            else events.ExceptionClass.FAULT
        )
        assert events.exception_class(vector) is expected, vector
    assert events.exception_class(32) is events.ExceptionClass.INTERRUPT
    assert events.injection_sets_rf(events.exception(13, 0))
    assert not events.injection_sets_rf(events.software_exception(3, 1))
    assert not events.injection_sets_rf(events.external_interrupt(0x20))


INJECTED_GP = r"""
    SET_GATE 13, gp_handler
    LOAD_IDT
    mov $0x12345678, %ecx          # an MSR KVM does not know: it injects #GP(0)
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    jmp 1f                         # the IRETQ popped RF = 1; this jump completes with it
1:  pushfq
    pop %rax
    mov %rax, after(%rip)
    EXIT_WITH $0x44
gp_handler:
    mov 24(%rsp), %rax             # the RFLAGS image (error code, RIP, CS before it)
    mov %rax, image(%rip)
    pushfq
    pop %rax
    mov %rax, handler(%rip)
    addq $2, 8(%rsp)               # skip WRMSR
    add $8, %rsp
    iretq
    .align 8
image:   .quad 0
handler: .quad -1
after:   .quad -1
    IDT_TABLE
"""


def test_injected_fault_pushes_rf_and_rf_is_cleared_after_iretq() -> None:
    """KVM injects #GP for WRMSR of an unknown MSR: the RFLAGS image the guest's handler finds
    has RF = 1; the handler runs with RF = 0; IRETQ restores RF = 1, which the jump after it
    clears by completing (QEMU would keep it after a direct jump), so PUSHF shows RF = 0.  (A
    PUSHF in the very block after the IRETQ would still push RF: resume_flag.py.)"""
    vm = Kvm().create_vm(memory_size=4 << 20)
    img = source_image(INJECTED_GP)
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x44)
    assert u64(vm, img.symbol("image")) & RF
    assert not u64(vm, img.symbol("handler")) & RF
    assert not u64(vm, img.symbol("after")) & RF


REAL_MODE_IRET = r"""
    pushfl
    popl %eax
    andl $~0x2, %eax
    orl $0x00018028 & ~0x8000, %eax   # RF, and flags IRETD may load (realmode.c iret_flags32)
    pushl %eax
    pushl %cs
    calll 1f
    jmp 2f
1:  iretl
2:  nop
    nop
    pushfl
    popl %eax
    mov %eax, %ebx
    shr $16, %eax
    and $1, %al                    # RF as PUSHF saw it
    out %al, $0xf4
"""


def test_real_mode_iretd_loads_rf_which_does_not_stay_set() -> None:
    """kvm-unit-tests realmode.c "rflags.rf": IRETD in real mode loads RF from the image; it is
    cleared when the next instruction completes, so the PUSHF after the jump sees RF = 0."""
    vm = Kvm().create_vm(memory_size=4 << 20)
    img = source_image(REAL_MODE_IRET, base=0x7C00, bits=16)
    vcpu = boot(vm, img, mode="real", stack=0x7000)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0)
