"""Valid VM-entry states from which the entry-check cache tests mutate one input at a time.

Each baseline passes every check and, between them, makes every rule of SDM 27.2-27.3 read the
inputs its conditions depend on: a 64-bit, real-mode, 32-bit, PAE (with and without EPT) and
virtual-8086 guest; TPR shadow with a virtual-APIC page; a VMCS link pointer to a real VMCS; MSR
areas in use; an injected event; the HLT activity state; a 32-bit host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.vmx.caps import CpuProfile

from .vmcs_builder import AR_CODE32, AR_LDT, OTHER_VMCS, VIRTUAL_APIC_PAGE, EntryHarness

EXTERNAL_INTERRUPT, NMI, HARDWARE_EXCEPTION, SOFTWARE_INTERRUPT = 0, 2, 3, 4
RFLAGS_IF = 1 << 9
GP_VECTOR = 13
HLT = 1


def _profile() -> CpuProfile:
    """The default profile plus "use TPR shadow" (so the virtual-APIC rules can run)."""
    base = CpuProfile()
    return dataclasses.replace(base, proc_based=base.proc_based | int(C.TPR_SHADOW))


def _64bit() -> EntryHarness:
    return EntryHarness(_profile())


def _tpr_shadow() -> EntryHarness:
    h = _64bit()
    h.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.TPR_SHADOW)
    h.write(F.VIRTUAL_APIC_PAGE_ADDR, VIRTUAL_APIC_PAGE)
    h.write(F.TPR_THRESHOLD, 4)
    h.memory.write8(VIRTUAL_APIC_PAGE + 0x80, 0x50)  # VTPR[7:4] = 5 >= threshold 4
    return h


def _link_pointer() -> EntryHarness:
    h = _64bit()
    h.write(F.VMCS_LINK_POINTER, OTHER_VMCS)
    h.write_segment("LDTR", 0x28, 0xFFFFFE0000004000, 0xFFF, AR_LDT)
    return h


def _msr_areas() -> EntryHarness:
    h = _64bit()
    h.write(F.VM_EXIT_MSR_STORE_COUNT, 2)
    h.write(F.VM_EXIT_MSR_LOAD_COUNT, 2)
    h.write_msr_load_list([(0x174, 0, 0x10)])  # IA32_SYSENTER_CS
    return h


def _inject_gp() -> EntryHarness:
    h = _64bit()
    h.inject(HARDWARE_EXCEPTION, GP_VECTOR, error_code=0)
    return h


def _inject_software_interrupt_real_mode() -> EntryHarness:
    h = EntryHarness(_profile()).use_real_mode_guest()
    h.inject(SOFTWARE_INTERRUPT, 0x21, length=2)
    return h


def _inject(kind: int, vector: int) -> EntryHarness:
    h = _64bit()
    h.write(F.GUEST_RFLAGS, 0x2 | RFLAGS_IF)
    h.inject(kind, vector)
    return h


def _nmi_window_exiting() -> EntryHarness:
    h = _64bit()
    h.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.NMI_WINDOW_EXITING)
    return h


def _ds_readable_code() -> EntryHarness:
    h = _64bit()
    h.write(F.GUEST_DS_AR_BYTES, AR_CODE32)  # DS may hold a readable code segment
    return h


def _hlt() -> EntryHarness:
    h = _64bit()
    h.write(F.GUEST_ACTIVITY_STATE, HLT)
    return h


BASELINES: dict[str, Callable[[], EntryHarness]] = {
    "64-bit guest": _64bit,
    "real-mode guest (unrestricted)": lambda: EntryHarness(_profile()).use_real_mode_guest(),
    "32-bit guest": lambda: EntryHarness(_profile()).use_protected_mode_32_guest(),
    "PAE guest with EPT": lambda: EntryHarness(_profile()).use_protected_mode_32_guest(pae=True),
    "PAE guest without EPT": lambda: EntryHarness(_profile()).use_protected_mode_32_guest(pae=True).without_ept(),
    "virtual-8086 guest": lambda: EntryHarness(_profile()).use_v8086_guest(),
    "TPR shadow": _tpr_shadow,
    "VMCS link pointer, usable LDTR": _link_pointer,
    "MSR areas": _msr_areas,
    "injected #GP": _inject_gp,
    "injected software interrupt, real mode": _inject_software_interrupt_real_mode,
    "injected external interrupt": lambda: _inject(EXTERNAL_INTERRUPT, 0x20),
    "injected NMI": lambda: _inject(NMI, 2),
    "NMI-window exiting": _nmi_window_exiting,
    "DS holds readable code": _ds_readable_code,
    "HLT activity state": _hlt,
    "32-bit host": lambda: EntryHarness(_profile()).use_protected_mode_32_guest().use_32bit_host(),
    "32-bit host, PAE guest without EPT": lambda: (
        EntryHarness(_profile()).use_protected_mode_32_guest(pae=True).without_ept().use_32bit_host()
    ),
}
