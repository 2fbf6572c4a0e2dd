"""Architecture facts -- VMCS encodings, exit reasons, control bits, x86 bits, MSRs, VM-instruction
errors, exit qualifications -- as data only, with the names of the Intel SDM (Vol. 3, Dec 2023)
and Linux's asm/vmx.h, msr-index.h and kvm_host.h."""

from pyvmx.arch.controls import (
    GuestActivityState,
    GuestInterruptibility,
    InterruptionType,
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    SecondaryVmExitControls,
    TertiaryProcBasedControls,
    VmEntryControls,
    VmExitControls,
)
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr, UnknownNameError, msr_by_name
from pyvmx.arch.vm_instruction_errors import VmInstructionError
from pyvmx.arch.vmcs_fields import VmcsAccessType, VmcsField, VmcsFieldType, VmcsWidth
from pyvmx.arch.x86 import Cr0, Cr4, Efer, ExceptionVector, PageFaultErrorCode, PteFlags, Rflags

__all__ = [
    "Cr0",
    "Cr4",
    "Efer",
    "ExceptionVector",
    "ExitReason",
    "GuestActivityState",
    "GuestInterruptibility",
    "InterruptionType",
    "Msr",
    "PageFaultErrorCode",
    "PinBasedControls",
    "ProcBasedControls",
    "PteFlags",
    "Rflags",
    "SecondaryProcBasedControls",
    "SecondaryVmExitControls",
    "TertiaryProcBasedControls",
    "UnknownNameError",
    "VmEntryControls",
    "VmExitControls",
    "VmInstructionError",
    "VmcsAccessType",
    "VmcsField",
    "VmcsFieldType",
    "VmcsWidth",
    "msr_by_name",
]
