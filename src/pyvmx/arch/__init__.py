"""Architecture facts -- VMCS encodings, exit reasons, control bits, x86 bits, MSRs, VM-instruction
errors -- as data only, with the names of the Intel SDM and Linux's asm/vmx.h."""

from pyvmx.arch.controls import (
    GuestActivityState,
    GuestInterruptibility,
    InterruptionType,
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    VmEntryControls,
    VmExitControls,
)
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vm_instruction_errors import VmInstructionError
from pyvmx.arch.vmcs_fields import VmcsField, VmcsFieldType, VmcsWidth
from pyvmx.arch.x86 import Cr0, Cr4, Efer, ExceptionVector, PageFaultErrorCode, Rflags

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
    "Rflags",
    "SecondaryProcBasedControls",
    "VmEntryControls",
    "VmExitControls",
    "VmInstructionError",
    "VmcsField",
    "VmcsFieldType",
    "VmcsWidth",
]
