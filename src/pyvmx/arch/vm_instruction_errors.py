"""VM-instruction error numbers (SDM Vol. 3 31.4 "VM Instruction Error Numbers", Table 31-1),
with Linux's ``VMXERR_*`` names (arch/x86/include/asm/vmx.h ``enum vm_instruction_error_number``)
minus the prefix.  Numbers 14, 21 and 27 are not defined.
"""

from __future__ import annotations

from enum import IntEnum


class VmInstructionError(IntEnum):
    """The value VMfailValid stores in the VM_INSTRUCTION_ERROR field."""

    VMCALL_IN_VMX_ROOT_OPERATION = 1
    VMCLEAR_INVALID_ADDRESS = 2
    VMCLEAR_VMXON_POINTER = 3
    VMLAUNCH_NONCLEAR_VMCS = 4
    VMRESUME_NONLAUNCHED_VMCS = 5
    VMRESUME_AFTER_VMXOFF = 6
    ENTRY_INVALID_CONTROL_FIELD = 7
    ENTRY_INVALID_HOST_STATE_FIELD = 8
    VMPTRLD_INVALID_ADDRESS = 9
    VMPTRLD_VMXON_POINTER = 10
    VMPTRLD_INCORRECT_VMCS_REVISION_ID = 11
    UNSUPPORTED_VMCS_COMPONENT = 12
    VMWRITE_READ_ONLY_VMCS_COMPONENT = 13
    VMXON_IN_VMX_ROOT_OPERATION = 15
    ENTRY_INVALID_EXECUTIVE_VMCS_POINTER = 16
    ENTRY_NONLAUNCHED_EXECUTIVE_VMCS = 17
    ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER = 18
    VMCALL_NONCLEAR_VMCS = 19
    VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS = 20
    VMCALL_INCORRECT_MSEG_REVISION_ID = 22
    VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM = 23
    VMCALL_INVALID_SMM_MONITOR_FEATURES = 24
    ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS = 25
    ENTRY_EVENTS_BLOCKED_BY_MOV_SS = 26
    INVALID_OPERAND_TO_INVEPT_INVVPID = 28


# The "Description" column of SDM Table 31-1.
VM_INSTRUCTION_ERROR_DESCRIPTIONS: dict[VmInstructionError, str] = {
    VmInstructionError.VMCALL_IN_VMX_ROOT_OPERATION: "VMCALL executed in VMX root operation",
    VmInstructionError.VMCLEAR_INVALID_ADDRESS: "VMCLEAR with invalid physical address",
    VmInstructionError.VMCLEAR_VMXON_POINTER: "VMCLEAR with VMXON pointer",
    VmInstructionError.VMLAUNCH_NONCLEAR_VMCS: "VMLAUNCH with non-clear VMCS",
    VmInstructionError.VMRESUME_NONLAUNCHED_VMCS: "VMRESUME with non-launched VMCS",
    VmInstructionError.VMRESUME_AFTER_VMXOFF: (
        "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)"
    ),
    VmInstructionError.ENTRY_INVALID_CONTROL_FIELD: "VM entry with invalid control field(s)",
    VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD: "VM entry with invalid host-state field(s)",
    VmInstructionError.VMPTRLD_INVALID_ADDRESS: "VMPTRLD with invalid physical address",
    VmInstructionError.VMPTRLD_VMXON_POINTER: "VMPTRLD with VMXON pointer",
    VmInstructionError.VMPTRLD_INCORRECT_VMCS_REVISION_ID: "VMPTRLD with incorrect VMCS revision identifier",
    VmInstructionError.UNSUPPORTED_VMCS_COMPONENT: "VMREAD/VMWRITE from/to unsupported VMCS component",
    VmInstructionError.VMWRITE_READ_ONLY_VMCS_COMPONENT: "VMWRITE to read-only VMCS component",
    VmInstructionError.VMXON_IN_VMX_ROOT_OPERATION: "VMXON executed in VMX root operation",
    VmInstructionError.ENTRY_INVALID_EXECUTIVE_VMCS_POINTER: "VM entry with invalid executive-VMCS pointer",
    VmInstructionError.ENTRY_NONLAUNCHED_EXECUTIVE_VMCS: "VM entry with non-launched executive VMCS",
    VmInstructionError.ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER: (
        "VM entry with executive-VMCS pointer not VMXON pointer "
        "(when attempting to deactivate the dual-monitor treatment of SMIs and SMM)"
    ),
    VmInstructionError.VMCALL_NONCLEAR_VMCS: (
        "VMCALL with non-clear VMCS "
        "(when attempting to activate the dual-monitor treatment of SMIs and SMM)"
    ),
    VmInstructionError.VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS: "VMCALL with invalid VM-exit control fields",
    VmInstructionError.VMCALL_INCORRECT_MSEG_REVISION_ID: (
        "VMCALL with incorrect MSEG revision identifier "
        "(when attempting to activate the dual-monitor treatment of SMIs and SMM)"
    ),
    VmInstructionError.VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM: (
        "VMXOFF under dual-monitor treatment of SMIs and SMM"
    ),
    VmInstructionError.VMCALL_INVALID_SMM_MONITOR_FEATURES: (
        "VMCALL with invalid SMM-monitor features "
        "(when attempting to activate the dual-monitor treatment of SMIs and SMM)"
    ),
    VmInstructionError.ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS: (
        "VM entry with invalid VM-execution control fields in executive VMCS "
        "(when attempting to return from SMM)"
    ),
    VmInstructionError.ENTRY_EVENTS_BLOCKED_BY_MOV_SS: "VM entry with events blocked by MOV SS",
    VmInstructionError.INVALID_OPERAND_TO_INVEPT_INVVPID: "Invalid operand to INVEPT/INVVPID",
}
