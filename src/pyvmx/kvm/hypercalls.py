"""VMCALL: KVM's hypercall ABI (Documentation/virt/kvm/x86/hypercalls.rst; arch/x86/kvm/x86.c
kvm_emulate_hypercall()), plus two hypercalls of pyvmx's own for test guests.

The number is in RAX, up to four arguments in RBX, RCX, RDX, RSI; the result comes back in RAX
(a negative errno as a 64-bit two's complement value). Outside 64-bit mode all of them are 32
bits. Only CPL 0 may call (-KVM_EPERM otherwise); an unknown number returns -KVM_ENOSYS.

=======================  =====  ======================================================
hypercall                 RAX    effect
=======================  =====  ======================================================
KVM_HC_VAPIC_POLL_IRQ     1      nothing (returns 0)
KVM_HC_KICK_CPU           5      wake the vCPU whose APIC ID is in RCX (PV unhalt), yield
KVM_HC_SCHED_YIELD        11     give the CPU up
PYVMX_HC_PUTCHAR          0x1000 append the byte in RBX to ``vm.hypercall_output``
PYVMX_HC_EXIT             0x1001 end ``run()`` with ``DebugExit(RBX, via="hypercall")``
=======================  =====  ======================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.kvm.cpuid import KVM_CPUID_FEATURES, KVM_FEATURE_PV_SCHED_YIELD, KVM_FEATURE_PV_UNHALT
from pyvmx.kvm.exits import DebugExit, HandlerOutcome, Reschedule, Resume

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu

KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_MMU_OP = 2
KVM_HC_FEATURES = 3
KVM_HC_PPC_MAP_MAGIC_PAGE = 4
KVM_HC_KICK_CPU = 5
KVM_HC_MIPS_GET_CLOCK_FREQ = 6
KVM_HC_MIPS_EXIT_VM = 7
KVM_HC_MIPS_CONSOLE_OUTPUT = 8
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12

PYVMX_HC_PUTCHAR = 0x1000
PYVMX_HC_EXIT = 0x1001

KVM_ENOSYS = 1000  # uapi/linux/kvm_para.h
KVM_EFAULT = 14  # EFAULT
KVM_EINVAL = 22  # EINVAL
KVM_E2BIG = 7  # E2BIG
KVM_EPERM = 1  # EPERM
KVM_EOPNOTSUPP = 95  # EOPNOTSUPP

_U64 = (1 << 64) - 1


def _pv_has(vcpu: Vcpu, feature: int) -> bool:
    leaf = vcpu.cpuid.find(KVM_CPUID_FEATURES)
    return leaf is not None and bool(leaf.eax >> feature & 1)


def kvm_emulate_hypercall(vcpu: Vcpu) -> HandlerOutcome:
    """Run the hypercall, write RAX, skip the VMCALL."""
    op_64_bit = vcpu.is_64_bit_mode()
    mask = _U64 if op_64_bit else 0xFFFFFFFF
    nr = vcpu.get_gpr(0) & mask
    a0, a1 = vcpu.get_gpr(3) & mask, vcpu.get_gpr(1) & mask
    outcome: HandlerOutcome = Resume(f"hypercall {nr:#x}")
    if vcpu.cpl() != 0:
        ret = -KVM_EPERM
    elif nr == KVM_HC_VAPIC_POLL_IRQ:
        ret = 0
    elif nr == KVM_HC_KICK_CPU and _pv_has(vcpu, KVM_FEATURE_PV_UNHALT):
        target = next((v for v in vcpu.vm.vcpus if v.id == a1), None)
        if target is not None:
            target.kick()
        ret = 0
        outcome = Reschedule("kick cpu")
    elif nr == KVM_HC_SCHED_YIELD and _pv_has(vcpu, KVM_FEATURE_PV_SCHED_YIELD):
        ret = 0
        outcome = Reschedule("sched yield")
    elif nr == PYVMX_HC_PUTCHAR:
        vcpu.vm.hypercall_output.append(a0 & 0xFF)
        ret = 0
    elif nr == PYVMX_HC_EXIT:
        ret = 0
        outcome = DebugExit(a0, via="hypercall")
    else:
        ret = -KVM_ENOSYS
    vcpu.set_gpr(0, ret & mask)
    vcpu.skip_instruction()
    return outcome
