"""Interrupt messages between the local APICs of a VM's vCPUs (KVM's kvm_irq_delivery_to_apic()
and kvm_apic_match_dest() in arch/x86/kvm/lapic.c; Intel SDM Vol. 3A 11.6), and the
wait-for-SIPI state an INIT leaves a vCPU in (SDM 9.4.4 "MP Initialization Example", 11.6.1).

An IPI a vCPU's APIC sends goes to every other vCPU the ICR addresses: the destination shorthand
"all including self" / "all excluding self", or without a shorthand the destination field as a
physical APIC ID (0xFF: broadcast) or, in logical mode, matched against each LDR in the flat
model (DFR 0xF: a bit mask) or the cluster model (DFR 0x0: cluster in bits 7:4, mask in 3:0).
By delivery mode: fixed and lowest priority set the vector in IRR (lowest priority goes to every
addressee, as KVM does without its arbitration), NMI queues an NMI, INIT puts the vCPU in
wait-for-SIPI (an INIT level de-assert -- level trigger, level 0 -- does nothing, SDM 11.6.1),
and a Start-up IPI makes a waiting vCPU start in real mode at ``vector << 12``: CS selector
``vector << 8``, base ``vector << 12``, IP 0 (SDM 11.6.1 "Start-Up").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.arch.controls import GuestActivityState
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.kvm.devices.lapic import (
    APIC_DEST_ALLBUT,
    APIC_DEST_ALLINC,
    APIC_DFR,
    APIC_DM_FIXED,
    APIC_DM_INIT,
    APIC_DM_LOWEST,
    APIC_DM_NMI,
    APIC_DM_STARTUP,
    APIC_LDR,
    Ipi,
)
from pyvmx.kvm.regs import DTable, Regs, Segment, Sregs

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu

ICR_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15


def addressed(target: Vcpu, ipi: Ipi) -> bool:
    """``kvm_apic_match_dest()`` for a vCPU other than the sender."""
    if ipi.shorthand in (APIC_DEST_ALLINC, APIC_DEST_ALLBUT):
        return True
    if ipi.shorthand != 0:  # "self": the sender's own APIC took it
        return False
    dest = ipi.destination
    if not ipi.icr & ICR_LOGICAL:
        return dest == 0xFF or dest == target.lapic.apic_id
    ldr = target.lapic.regs.get(APIC_LDR, 0) >> 24
    if target.lapic.regs.get(APIC_DFR, 0xFFFFFFFF) >> 28 == 0xF:  # flat model
        return bool(ldr & dest)
    return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)  # cluster model


def deliver_ipi(source: Vcpu, ipi: Ipi) -> None:
    """Deliver ``ipi`` from ``source``'s APIC to the other vCPUs it addresses."""
    for target in source.vm.vcpus:
        if target is source or not addressed(target, ipi):
            continue
        mode = ipi.delivery_mode
        if mode in (APIC_DM_FIXED, APIC_DM_LOWEST):
            target.lapic.accept(ipi.vector, level=bool(ipi.icr & ICR_TRIGGER_LEVEL))
        elif mode == APIC_DM_NMI:
            target.inject_nmi()
        elif mode == APIC_DM_INIT:
            if ipi.icr & ICR_TRIGGER_LEVEL and not ipi.icr & ICR_LEVEL_ASSERT:
                continue  # INIT level de-assert
            target.lapic.init()
        elif mode == APIC_DM_STARTUP:
            target.lapic.sipi(ipi.vector)


def start_at_sipi(vcpu: Vcpu, vector: int) -> None:
    """The state a Start-up IPI gives a vCPU (SDM 11.6.1; Table 10-1's INIT values otherwise)."""
    sregs = Sregs(cs=Segment(base=vector << 12, limit=0xFFFF, selector=vector << 8, type=11))
    sregs.cr0 = 0x10  # ET; CD and NW of Table 10-1 are left clear (no caches are modelled)
    sregs.idt = DTable(0, 0xFFFF)
    sregs.gdt = DTable(0, 0xFFFF)
    sregs.apic_base = vcpu.get_sregs().apic_base
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0, rsp=0, rflags=0x2))
    vcpu.vmcs_write(F.GUEST_ACTIVITY_STATE, int(GuestActivityState.ACTIVE))
    vcpu.vmcs_write(F.GUEST_INTERRUPTIBILITY_INFO, 0)


def wait_for_sipi(vcpu: Vcpu) -> bool:
    """Before a VM entry: True while the vCPU waits for a SIPI (it must not run); a SIPI that
    arrived starts it (and False is returned)."""
    if not vcpu.lapic.wait_sipi:
        return False
    vector = vcpu.lapic.take_sipi()
    if vector is None:
        return True
    start_at_sipi(vcpu, vector)
    return False


APIC_BASE_EXTD = 1 << 10  # x2APIC mode: the MMIO page is not decoded (SDM 11.12.1)
APIC_BASE_ENABLE = 1 << 11  # global enable (SDM 11.4.3)
MSR_IA32_APICBASE = 0x1B


def xapic_page(vcpu: Vcpu) -> int | None:
    """The guest-physical page the vCPU's APIC decodes (IA32_APIC_BASE bits 51:12), or None when
    the APIC is globally disabled or in x2APIC mode (SDM 11.4.4, 11.12.1)."""
    base = vcpu.msrs.values.get(MSR_IA32_APICBASE, 0)
    if not base & APIC_BASE_ENABLE or base & APIC_BASE_EXTD:
        return None
    return base & 0x000FFFFFFFFFF000


def mmio_read(vcpu: Vcpu, gpa: int, size: int) -> int | None:
    """The vCPU's own APIC page first (KVM's vcpu_mmio_read()), or None when it is not there."""
    page = xapic_page(vcpu)
    if page is None or not page <= gpa < page + 0x1000:
        return None
    vcpu.lapic.base = page
    return vcpu.lapic.mmio_read(gpa, size)


def mmio_write(vcpu: Vcpu, gpa: int, size: int, value: int) -> bool:
    page = xapic_page(vcpu)
    if page is None or not page <= gpa < page + 0x1000:
        return False
    vcpu.lapic.base = page
    vcpu.lapic.mmio_write(gpa, size, value)
    return True
