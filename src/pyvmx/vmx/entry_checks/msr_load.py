"""SDM 27.4 Loading MSRs: the VM-entry MSR-load area, processed entry by entry on every VM entry
(it lives in memory, so nothing of it is cached); a refused entry fails the VM entry with exit
reason 34 and the entry's number as the exit qualification."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.arch.controls import VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.vmx.entry_checks.context import efer_reserved
from pyvmx.vmx.entry_checks.registry import CheckArea, EntryCheckFailure

if TYPE_CHECKING:
    from pyvmx.vmx.caps import CpuProfile
    from pyvmx.vmx.processor import Processor
    from pyvmx.vmx.vmcs import VmcsRegion

# IA32_SMM_MONITOR_CTL, writable only in SMM (SDM 33.15.5).  TODO(arch): move to Msr.
_MSR_IA32_SMM_MONITOR_CTL = 0x9B

# Bits 31:8 of an MSR index in the x2APIC range 800H-8FFH (SDM 27.4).
_X2APIC_MSR_RANGE_HIGH = 0x8

MSR_ENTRY_SIZE = 16  # bits 31:0 index, 63:32 reserved, 127:64 data (SDM 25.8.2, Table 25-15)


def max_msr_list_entries(profile: CpuProfile) -> int:
    """512 * (N + 1), N = IA32_VMX_MISC[27:25]: the recommended maximum length of an MSR list
    (SDM A.6)."""
    return 512 * (((profile.vmx_misc >> VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT) & 7) + 1)


def _msr_entry_violation(index: int, reserved: int, value: int) -> str | None:
    """Why the processor refuses to load one VM-entry MSR-load entry (SDM 27.4), in SDM order."""
    if index in (Msr.FS_BASE, Msr.GS_BASE):
        return "IA32_FS_BASE and IA32_GS_BASE cannot be loaded from the VM-entry MSR-load area"
    if index >> 8 == _X2APIC_MSR_RANGE_HIGH:
        return "x2APIC MSRs (index 800H-8FFH) cannot be loaded from the VM-entry MSR-load area"
    if index == _MSR_IA32_SMM_MONITOR_CTL:
        return "IA32_SMM_MONITOR_CTL can be written only in SMM"
    if reserved:
        return "bits 63:32 of an MSR-load entry must be 0"
    if index == Msr.EFER and efer_reserved(value):
        return "IA32_EFER: WRMSR of this value would #GP (reserved bits set)"
    return None


def load_msrs(vmcs: VmcsRegion, processor: Processor) -> EntryCheckFailure | None:
    """SDM 27.4: process the VM-entry MSR-load area, entry by entry.

    The accepted (index, value) pairs go to ``processor.entry_msr_loads`` (a new list on every
    call) for the CPU engine to apply.  The first entry that cannot be loaded fails the VM entry
    with that entry's number (1-based) as the exit qualification; entries before it stay in the
    list, as a real processor has already loaded them.

    A list longer than 512 * (IA32_VMX_MISC[27:25] + 1) entries is "undefined processor
    behaviour" in the SDM (A.6), not a control-field check of 27.2.1; this processor, like KVM's
    nested_vmx_load_msr, fails at the first entry beyond that limit.
    """
    loads: list[tuple[int, int]] = []
    processor.entry_msr_loads = loads
    count = vmcs.read(F.VM_ENTRY_MSR_LOAD_COUNT)
    if count == 0:
        return None
    area = vmcs.read(F.VM_ENTRY_MSR_LOAD_ADDR)
    limit = max_msr_list_entries(processor.profile)
    memory = processor.memory
    for number in range(1, count + 1):
        if number > limit:
            return _msr_failure("the MSR-load list must not be longer than 512 * (IA32_VMX_MISC[27:25] + 1)", number)
        address = area + MSR_ENTRY_SIZE * (number - 1)
        if not memory.contains(address, MSR_ENTRY_SIZE):
            return _msr_failure("the MSR-load entry lies outside physical memory (reads return all ones)", number)
        header = memory.read64(address)
        value = memory.read64(address + 8)
        index, reserved = header & 0xFFFFFFFF, header >> 32
        broken = _msr_entry_violation(index, reserved, value)
        if broken is not None:
            return _msr_failure(broken, number)
        loads.append((index, value))
    return None


MSR_LOAD_CHECK = "msr_load_entry"  # the name failures of SDM 27.4 carry


def _msr_failure(rule: str, number: int) -> EntryCheckFailure:
    return EntryCheckFailure(CheckArea.MSR_LOADING, f"SDM 27.4: {rule}", qualification=number, check=MSR_LOAD_CHECK)
