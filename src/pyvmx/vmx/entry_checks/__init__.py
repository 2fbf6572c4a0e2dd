"""VM-entry checks (SDM 27.2 "Checks on VMX Controls and Host-State Area", 27.3 "Checking and
Loading Guest State", 27.4 "Loading MSRs").

Each rule is one small function registered with its area and SDM section (:mod:`.registry`); the
modules split them as the SDM does, and as Bochs' ``VMenterLoadCheckVmControls`` /
``VMenterLoadCheckHostState`` / ``VMenterLoadCheckGuestState`` do:

- :mod:`.controls` -- 27.2.1, the VMX controls (VMfailValid 7);
- :mod:`.host` -- 27.2.2-27.2.4, the host-state area (VMfailValid 8);
- :mod:`.guest_registers` -- 27.3.1.1-27.3.1.4, guest registers (exit reason 33);
- :mod:`.guest_non_register` -- 27.3.1.5-27.3.1.6, guest non-register state and PDPTEs;
- :mod:`.msr_load` -- 27.4, the VM-entry MSR-load area (exit reason 34).

Rules see the entry only through :class:`EntryContext` (:mod:`.context`), which records every
input each rule reads -- VMCS fields, physical memory, the processor's own mode -- so that the
entry-check cache (:mod:`pyvmx.vmx.entry_cache`) can re-run exactly the rules whose inputs
changed.  The entry points below run every rule of an area, in SDM order, and stop at the first
failure, so the processor can report exactly which check failed.

The modelled processor is a 64-bit processor outside SMM, without the dual-monitor treatment,
shadow VMCS, SGX, Intel PT, CET, PML, VM functions or APIC virtualization: rules about controls
that the profile can never enable are noted where the SDM lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Importing the rule modules registers their rules: they must be imported in SDM order.
from pyvmx.vmx.entry_checks import controls  # noqa: F401  (SDM 27.2.1)
from pyvmx.vmx.entry_checks import host  # noqa: F401  (SDM 27.2.2-27.2.4)
from pyvmx.vmx.entry_checks import guest_registers  # noqa: F401  (SDM 27.3.1.1-27.3.1.4)
from pyvmx.vmx.entry_checks import guest_non_register  # noqa: F401  (SDM 27.3.1.5-27.3.1.6)
from pyvmx.vmx.entry_checks.context import (
    CheckInputs,
    EntryContext,
    ProcessorInput,
    upper_bits_identical,
)
from pyvmx.vmx.entry_checks.controls import eptp_is_valid, eptp_violation
from pyvmx.vmx.entry_checks.msr_load import MSR_ENTRY_SIZE, load_msrs, max_msr_list_entries
from pyvmx.vmx.entry_checks.registry import (
    CONTROL_CHECKS,
    GUEST_STATE_CHECKS,
    HOST_STATE_CHECKS,
    CheckArea,
    EntryCheck,
    EntryCheckFailure,
    first_failure,
)

if TYPE_CHECKING:
    from pyvmx.vmx.caps import CpuProfile
    from pyvmx.vmx.memory import PhysicalMemory
    from pyvmx.vmx.vmcs import VmcsRegion

# Every rule of SDM 27.2-27.3 in the order VMLAUNCH/VMRESUME checks them (SDM 27.1): controls,
# host state, guest state.
ALL_CHECKS: tuple[EntryCheck, ...] = (*CONTROL_CHECKS, *HOST_STATE_CHECKS, *GUEST_STATE_CHECKS)

__all__ = [
    "ALL_CHECKS",
    "CONTROL_CHECKS",
    "GUEST_STATE_CHECKS",
    "HOST_STATE_CHECKS",
    "MSR_ENTRY_SIZE",
    "CheckArea",
    "CheckInputs",
    "EntryCheck",
    "EntryCheckFailure",
    "EntryContext",
    "ProcessorInput",
    "check_all",
    "check_guest_state",
    "check_host_state",
    "check_vmx_controls",
    "eptp_is_valid",
    "eptp_violation",
    "load_msrs",
    "max_msr_list_entries",
    "upper_bits_identical",
]


def check_vmx_controls(
    vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory | None = None
) -> EntryCheckFailure | None:
    """SDM 27.2.1: the VM-execution, VM-exit and VM-entry control fields (VMfailValid(7))."""
    return first_failure(CONTROL_CHECKS, EntryContext(vmcs, profile, memory))


def check_host_state(
    vmcs: VmcsRegion, profile: CpuProfile, *, host_ia32e_mode: bool = True
) -> EntryCheckFailure | None:
    """SDM 27.2.2-27.2.4: the host-state area (VMfailValid(8)).

    ``host_ia32e_mode`` says whether the processor executing VMLAUNCH/VMRESUME is in IA-32e mode
    (IA32_EFER.LMA = 1): then "host address-space size" must be 1, else it must be 0."""
    return first_failure(HOST_STATE_CHECKS, EntryContext(vmcs, profile, host_ia32e_mode=host_ia32e_mode))


def check_guest_state(
    vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory | None = None
) -> EntryCheckFailure | None:
    """SDM 27.3.1: the guest-state area (VM-entry failure, exit reason 33; the qualification is
    2 for a PDPTE, 3 for NMI injection under STI blocking, 4 for the VMCS link pointer)."""
    return first_failure(GUEST_STATE_CHECKS, EntryContext(vmcs, profile, memory))


def check_all(
    vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory | None, *, host_ia32e_mode: bool
) -> EntryCheckFailure | None:
    """Every rule of SDM 27.2-27.3 from scratch, in order: the first failure, or None."""
    return first_failure(list(ALL_CHECKS), EntryContext(vmcs, profile, memory, host_ia32e_mode=host_ia32e_mode))
