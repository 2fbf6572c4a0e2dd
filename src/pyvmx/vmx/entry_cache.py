"""Skipping VM-entry checks that cannot have changed their outcome.

The checks of SDM 27.2-27.3 are pure functions of the VMCS (and the CPU profile); this model
runs them in Python, so a hypervisor that resumes the same VMCS after changing only GUEST_RIP
would pay for all ~120 rules on every VMRESUME.  The processor therefore remembers, per VMCS,
the bytes of each area that last passed; an area whose bytes are unchanged is not checked again,
and when only a few "hot" guest fields changed (RIP, RFLAGS, interruptibility, activity, the
preemption timer) or only event-injection/window controls changed, just the rules of SDM
27.3.1.4 and 27.3.1.5 run again.  Guest state saved by a VM exit is trusted the same way.
The outcome is the same as running every check, except for the two rules that read memory
rather than the VMCS (the revision id of the VMCS that the link pointer names, and PDPTEs read
from guest memory): they are re-checked when the VMCS changes, not when that memory changes.
The VM-entry MSR-load area is processed on every entry.
"""

from __future__ import annotations

from pyvmx.arch.vmcs_fields import VmcsField, VmcsFieldType
from pyvmx.vmx import entry_checks
from pyvmx.vmx.caps import CpuProfile
from pyvmx.vmx.entry_checks import EntryCheckFailure, EntryContext
from pyvmx.vmx.memory import PhysicalMemory
from pyvmx.vmx.vmcs import AREA_RANGES, FIELD_SLOTS, VmcsRegion

_HOT_GUEST_FIELDS = frozenset({
    VmcsField.GUEST_RIP, VmcsField.GUEST_RSP, VmcsField.GUEST_RFLAGS, VmcsField.GUEST_INTERRUPTIBILITY_INFO,
    VmcsField.GUEST_ACTIVITY_STATE, VmcsField.VMX_PREEMPTION_TIMER_VALUE, VmcsField.GUEST_PENDING_DBG_EXCEPTIONS,
})
_HOT_CONTROL_FIELDS = frozenset({
    VmcsField.VM_ENTRY_INTR_INFO_FIELD, VmcsField.VM_ENTRY_EXCEPTION_ERROR_CODE, VmcsField.VM_ENTRY_INSTRUCTION_LEN,
})
_HOT_SECTIONS = frozenset({"27.3.1.4", "27.3.1.5"})
_HOT_GUEST_CHECKS = [c for c in entry_checks.GUEST_STATE_CHECKS if c.section in _HOT_SECTIONS]
# The checks that read GUEST_RIP: all that can change outcome when RIP alone changed (the
# commonest VMRESUME: the hypervisor skipped the instruction that exited).
_RIP_CHECKS = [c for c in entry_checks.GUEST_STATE_CHECKS if c.name in ("rip_upper_bits", "rip_canonical")]
assert len(_RIP_CHECKS) == 2


def _slot_fields(area: VmcsFieldType) -> dict[int, VmcsField]:
    start, _ = AREA_RANGES[area]
    return {(FIELD_SLOTS[int(f)][0] - start) // 8: f for f in VmcsField if f.type is area}


_GUEST_SLOTS = _slot_fields(VmcsFieldType.GUEST_STATE)
_CONTROL_SLOTS = _slot_fields(VmcsFieldType.CONTROL)


def _changed_fields(old: bytes, new: bytes, slots: dict[int, VmcsField]) -> set[VmcsField]:
    diff = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    changed = set()
    while diff:
        slot = ((diff & -diff).bit_length() - 1) // 64
        changed.add(slots[slot])
        diff &= ~((1 << ((slot + 1) * 64)) - 1)
    return changed


class CheckedAreas:
    """What last passed the VM-entry checks for one VMCS."""

    __slots__ = ("controls", "host", "guest")

    def __init__(self) -> None:
        self.controls: bytes | None = None
        self.host: bytes | None = None
        self.guest: tuple[bytes, bytes] | None = None  # (guest area, control area)

    def check_controls_and_host(self, vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory) -> EntryCheckFailure | None:
        controls = vmcs.area_bytes(VmcsFieldType.CONTROL)
        if controls != self.controls:
            failure = entry_checks.check_vmx_controls(vmcs, profile, memory)
            if failure is not None:
                return failure
            self.controls = controls
        host = vmcs.area_bytes(VmcsFieldType.HOST_STATE)
        if host != self.host:
            failure = entry_checks.check_host_state(vmcs, profile)
            if failure is not None:
                return failure
            self.host = host
        return None

    def check_guest(self, vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory) -> EntryCheckFailure | None:
        guest = vmcs.area_bytes(VmcsFieldType.GUEST_STATE)
        controls = vmcs.area_bytes(VmcsFieldType.CONTROL)
        if self.guest == (guest, controls):
            return None
        changed = _changed_fields(self.guest[0], guest, _GUEST_SLOTS) if self.guest is not None else None
        if changed == {VmcsField.GUEST_RIP} and self.guest is not None and self.guest[1] == controls:
            context = EntryContext(vmcs, profile, memory)
            for check in _RIP_CHECKS:
                failure = check(context)
                if failure is not None:
                    return failure
        elif changed is not None and changed <= _HOT_GUEST_FIELDS and self.guest is not None and _changed_fields(
            self.guest[1], controls, _CONTROL_SLOTS
        ) <= _HOT_CONTROL_FIELDS:
            context = EntryContext(vmcs, profile, memory)
            for check in _HOT_GUEST_CHECKS:
                failure = check(context)
                if failure is not None:
                    return failure
        else:
            failure = entry_checks.check_guest_state(vmcs, profile, memory)
            if failure is not None:
                return failure
        self.guest = (guest, controls)
        return None

    def trust_guest(self, vmcs: VmcsRegion) -> None:
        """The guest state a VM exit saved is the state the processor was running."""
        if self.guest is not None:
            self.guest = (vmcs.area_bytes(VmcsFieldType.GUEST_STATE), vmcs.area_bytes(VmcsFieldType.CONTROL))
