"""Events the hypervisor injects into the guest through VM-entry event injection (SDM 25.8.3,
27.6) and the rules KVM follows to pick them (arch/x86/kvm/x86.c kvm_check_and_inject_events(),
vmx.c vmx_inject_irq()/vmx_inject_nmi()/vmx_inject_exception(), __vmx_complete_interrupts(),
vmx_interrupt_allowed()/vmx_nmi_blocked()).

Order at each VM entry: an event whose delivery a VM exit interrupted (IDT-vectoring information,
SDM 28.2.4) is delivered again -- unless a new exception is pending, which goes first; then a new
exception queued by an exit handler; then an NMI if NMIs are not blocked; then an external
interrupt from the PIC if RFLAGS.IF = 1 and there is no STI/MOV-SS blocking (SDM 26.7.5); an
interrupt or NMI that cannot be injected now arms interrupt-window or NMI-window exiting.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_VALID_MASK,
    GuestInterruptibility,
    InterruptionType,
)
from pyvmx.arch.x86 import EXCEPTIONS_WITH_ERROR_CODE, ExceptionVector, Rflags


@dataclass(frozen=True)
class Event:
    """One event to inject: ``kind`` and ``vector`` (SDM Table 25-17), the error code if it
    has one, the instruction length for software interrupts/exceptions, and the fault address
    a #PF needs in CR2 (``cr2``)."""

    kind: InterruptionType
    vector: int
    error_code: int | None = None
    instruction_len: int = 0
    cr2: int | None = None

    def intr_info(self, *, protected_mode: bool) -> tuple[int, int | None]:
        """(VM-entry interruption-information field, error code to write or None). An error code
        is delivered only by a hardware exception in protected mode (SDM 27.2.1.3)."""
        info = INTR_INFO_VALID_MASK | (int(self.kind) << 8) | self.vector
        error = None
        if (
            self.kind is InterruptionType.HARD_EXCEPTION
            and protected_mode
            and self.vector in EXCEPTIONS_WITH_ERROR_CODE
        ):
            info |= INTR_INFO_DELIVER_CODE_MASK
            error = self.error_code or 0
        return info, error

    @property
    def software(self) -> bool:
        return self.kind in (InterruptionType.SOFT_INTR, InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION)


def exception(vector: int, error_code: int | None = None, *, cr2: int | None = None) -> Event:
    """A hardware exception (``kvm_queue_exception[_e]``); INT3/INTO are software exceptions
    with an instruction length, see :func:`software_exception`."""
    if error_code is None and vector in EXCEPTIONS_WITH_ERROR_CODE:
        error_code = 0
    return Event(InterruptionType.HARD_EXCEPTION, vector, error_code, 0, cr2)


def software_exception(vector: int, instruction_len: int) -> Event:
    return Event(InterruptionType.SOFT_EXCEPTION, vector, None, instruction_len)


def external_interrupt(vector: int) -> Event:
    return Event(InterruptionType.EXT_INTR, vector)


NMI_EVENT = Event(InterruptionType.NMI_INTR, int(ExceptionVector.NMI))


class ExceptionClass(enum.Enum):
    """KVM's exception_type() (EXCPT_FAULT, EXCPT_TRAP, EXCPT_ABORT; SDM Table 6-1)."""

    FAULT = "fault"
    TRAP = "trap"
    ABORT = "abort"
    INTERRUPT = "interrupt"


def exception_class(vector: int) -> ExceptionClass:
    """``exception_type()``: #DB (instruction breakpoints are handled elsewhere), #BP and #OF
    are traps, #DF and #MC aborts, every other vector below 32 -- reserved ones too -- a fault;
    NMI and vectors from 32 up are interrupts."""
    if vector > 31 or vector == ExceptionVector.NMI:
        return ExceptionClass.INTERRUPT
    if vector in (ExceptionVector.DB, ExceptionVector.BP, ExceptionVector.OF):
        return ExceptionClass.TRAP
    if vector in (ExceptionVector.DF, ExceptionVector.MC):
        return ExceptionClass.ABORT
    return ExceptionClass.FAULT


def injection_sets_rf(event: Event) -> bool:
    """Whether KVM sets RFLAGS.RF before injecting a newly queued exception
    (kvm_check_and_inject_events(): fault-class exceptions push RF = 1, SDM 18.3.1.1 / 6.12.1;
    traps and #DB leave RF as it is).  Not for an event being re-injected."""
    return event.kind in (InterruptionType.HARD_EXCEPTION, InterruptionType.SOFT_EXCEPTION) and (
        exception_class(event.vector) is ExceptionClass.FAULT
    )


def from_vectoring_info(info: int, error_code: int, instruction_len: int) -> Event | None:
    """``__vmx_complete_interrupts()``: the event whose delivery was interrupted by the VM exit,
    from the IDT-vectoring information field (SDM 28.2.4), or None."""
    if not info & INTR_INFO_VALID_MASK:
        return None
    kind = InterruptionType((info >> 8) & 7)
    vector = info & 0xFF
    error = error_code if info & INTR_INFO_DELIVER_CODE_MASK else None
    length = instruction_len if kind in (InterruptionType.SOFT_EXCEPTION, InterruptionType.SOFT_INTR,
                                         InterruptionType.PRIV_SW_EXCEPTION) else 0
    return Event(kind, vector, error, length)


def interrupt_allowed(rflags: int, interruptibility: int) -> bool:
    """``vmx_interrupt_blocked()`` negated: RFLAGS.IF = 1 and no blocking by STI or MOV SS."""
    blocking = GuestInterruptibility.STI | GuestInterruptibility.MOV_SS
    return bool(rflags & Rflags.IF) and not interruptibility & blocking


def nmi_allowed(interruptibility: int) -> bool:
    """``vmx_nmi_blocked()`` negated: no blocking by STI, MOV SS or NMI."""
    blocking = GuestInterruptibility.STI | GuestInterruptibility.MOV_SS | GuestInterruptibility.NMI
    return not interruptibility & blocking
