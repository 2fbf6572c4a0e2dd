"""What a VMX instruction does, as a value (SDM 31.2 "Conventions"): VMsucceed, VMfailInvalid,
VMfailValid(error number), a fault (#UD/#GP), or -- for VMLAUNCH/VMRESUME -- a VM exit."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvmx.arch.exit_reasons import VMX_EXIT_REASONS_FAILED_VMENTRY, ExitReason
from pyvmx.arch.vm_instruction_errors import VmInstructionError
from pyvmx.arch.x86 import ExceptionVector


class VmxStatus(enum.Enum):
    SUCCEED = "VMsucceed"
    FAIL_INVALID = "VMfailInvalid"
    FAIL_VALID = "VMfailValid"
    FAULT = "fault"
    VM_EXIT = "VM exit"
    STALLED = "stalled"  # model-specific: no VM exit will ever come (see VmxResult.stall)


class StallKind(enum.Enum):
    """Why VMLAUNCH/VMRESUME came back with no VM exit (model-specific, :attr:`VmxStatus.STALLED`);
    the guest state is saved and VMRESUME continues it."""

    HALTED = "halted"  # HLT activity state and nothing that can ever wake the processor
    BUDGET = "instruction budget"  # the engine's instruction budget per entry ran out
    NO_PROGRESS = "no progress"  # the engine keeps stopping without retiring anything
    ENGINE_ERROR = "engine error"  # the CPU engine failed
    HOST_DEADLINE = "host deadline"  # the host's wall-clock limit passed (pyvmx.engine.deadline)


@dataclass(frozen=True, slots=True)
class VmExitInfo:
    """The VM-exit information fields of one VM exit (SDM 25.9), as the processor wrote them."""

    reason: int  # the full 32-bit exit-reason field
    qualification: int = 0
    guest_linear_address: int = 0
    guest_physical_address: int = 0
    intr_info: int = 0
    intr_error_code: int = 0
    idt_vectoring_info: int = 0
    idt_vectoring_error_code: int = 0
    instruction_length: int = 0
    instruction_info: int = 0

    @property
    def basic_reason(self) -> int:
        return self.reason & 0xFFFF

    @property
    def failed_vmentry(self) -> bool:
        return bool(self.reason & VMX_EXIT_REASONS_FAILED_VMENTRY)

    @property
    def exit_reason(self) -> ExitReason | int:
        """The basic exit reason as an ExitReason where it has a name."""
        try:
            return ExitReason(self.basic_reason)
        except ValueError:
            return self.basic_reason

    def __str__(self) -> str:
        reason = self.exit_reason
        name = reason.name if isinstance(reason, ExitReason) else str(reason)
        failed = " (VM-entry failure)" if self.failed_vmentry else ""
        return f"VM exit {name}{failed} qualification={self.qualification:#x}"


@dataclass(frozen=True, slots=True)
class VmxResult:
    """The outcome of one VMX instruction."""

    status: VmxStatus
    error: VmInstructionError | None = None
    fault: ExceptionVector | None = None
    value: int | None = None
    exit: VmExitInfo | None = None
    stall: str | None = None
    stall_kind: StallKind | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is VmxStatus.SUCCEED

    @property
    def failed(self) -> bool:
        return self.status in (VmxStatus.FAIL_INVALID, VmxStatus.FAIL_VALID, VmxStatus.FAULT)

    @property
    def rflags_cf(self) -> bool:
        """CF as the instruction leaves it: VMfailInvalid sets CF."""
        return self.status is VmxStatus.FAIL_INVALID

    @property
    def rflags_zf(self) -> bool:
        """ZF as the instruction leaves it: VMfailValid sets ZF."""
        return self.status is VmxStatus.FAIL_VALID

    def __str__(self) -> str:
        if self.status is VmxStatus.FAIL_VALID and self.error is not None:
            return f"VMfailValid({int(self.error)}: {self.error.name})"
        if self.status is VmxStatus.FAULT and self.fault is not None:
            return f"#{self.fault.name}"
        if self.status is VmxStatus.VM_EXIT and self.exit is not None:
            return str(self.exit)
        if self.status is VmxStatus.STALLED:
            return f"stalled: {self.stall}"
        return str(self.status.value)


SUCCEED = VmxResult(VmxStatus.SUCCEED)
FAIL_INVALID = VmxResult(VmxStatus.FAIL_INVALID)


def fail_valid(error: VmInstructionError) -> VmxResult:
    return VmxResult(VmxStatus.FAIL_VALID, error=error)


def fault(vector: ExceptionVector) -> VmxResult:
    return VmxResult(VmxStatus.FAULT, fault=vector)


class VmxInstructionFailed(RuntimeError):
    """Raised by the convenience accessors (``vmcs.read32`` ...) when the underlying VMX
    instruction does not succeed -- like Linux's vmread_error()/vmwrite_error() warnings."""

    def __init__(self, instruction: str, result: VmxResult) -> None:
        super().__init__(f"{instruction} failed: {result}")
        self.instruction = instruction
        self.result = result


class VmcsWidthError(TypeError):
    """A width-checked accessor used on a field of another width (Linux vmx_ops.h's
    vmcs_check16/32/64/l build-time checks, made run-time here)."""
