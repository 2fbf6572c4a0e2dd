"""The VM-exit information of exits caused by events, and of exits met while delivering one
(SDM 28.2.1, 28.2.2, 28.2.4, 28.2.5) -- the rules, as pure functions of the events involved.

* An exception that causes a VM exit through the exception bitmap reports its vector, type and
  error code in the VM-exit interruption information (SDM 28.2.2); its exit qualification is
  the faulting linear address for #PF (CR2 is not loaded) and, for #DB, the debug conditions
  that would have gone to DR6 (B0-B3, BD, BS; DR6 itself is not loaded) -- 0 for the others
  (SDM 28.2.1, Table 28-1).
* Bit 12 of the interruption information, "NMI unblocking due to IRET", is 1 when the exit is
  due to a fault on IRET that had removed blocking by NMI (or virtual-NMI blocking); it is
  undefined -- here 0 -- when the IDT-vectoring information is valid or the exit is due to #DF
  (SDM 28.2.2).
* The IDT-vectoring information describes the event being delivered when the exit occurred; it
  is invalid when the original event causes the exit directly, when a #DF made of it does, on
  the fetch of the handler's first instruction, and for a triple fault (SDM 28.2.4).
* The VM-exit instruction length is set for software exceptions (INT3, INTO) and privileged
  software exceptions (INT1) that cause an exit, and for exits during the delivery of a software
  interrupt or (privileged) software exception: the length of that instruction -- the VM-entry
  instruction length when the event was injected (SDM 28.2.5, 27.6.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_UNBLOCK_NMI,
    INTR_INFO_VALID_MASK,
    InterruptionType,
)
from pyvmx.arch.qualifications import DEBUG_QUAL_B0_B3_MASK, DEBUG_QUAL_BD, DEBUG_QUAL_BS, DEBUG_QUAL_RTM
from pyvmx.arch.x86 import ExceptionVector
from pyvmx.vmx.delivery import Event

# The debug conditions an exit qualification for #DB reports (SDM 28.2.1, Table 28-1).
DEBUG_QUALIFICATION_MASK = DEBUG_QUAL_B0_B3_MASK | DEBUG_QUAL_BD | DEBUG_QUAL_BS | DEBUG_QUAL_RTM

_SOFTWARE_TYPES = frozenset(
    {InterruptionType.SOFT_INTR, InterruptionType.PRIV_SW_EXCEPTION, InterruptionType.SOFT_EXCEPTION}
)
_PF = int(ExceptionVector.PF)
_DB = int(ExceptionVector.DB)
_DF = int(ExceptionVector.DF)


@dataclass(frozen=True, slots=True)
class EventExitInfo:
    """The VM-exit information fields of an exit caused by an exception."""

    intr_info: int
    intr_error_code: int
    qualification: int
    instruction_length: int


def interruption_info(event: Event) -> int:
    """The interruption-information format of ``event`` (SDM 25.9.2): valid, type, vector, and
    bit 11 when it delivers an error code."""
    info = INTR_INFO_VALID_MASK | (int(event.type) << 8) | event.vector
    if event.error_code is not None:
        info |= INTR_INFO_DELIVER_CODE_MASK
    return info


def idt_vectoring(vectoring: Event | None) -> tuple[int, int]:
    """The IDT-vectoring information and error code (SDM 28.2.4); (0, 0) when the exit did not
    occur during event delivery."""
    if vectoring is None:
        return 0, 0
    return interruption_info(vectoring), vectoring.error_code or 0


def exit_instruction_length(event: Event | None, vectoring: Event | None) -> int:
    """The VM-exit instruction length of an exit caused by ``event`` (None: not an exception
    exit) while ``vectoring`` was being delivered (SDM 28.2.5)."""
    if event is not None and event.type in (InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION):
        return event.instruction_length
    if vectoring is not None and vectoring.type in _SOFTWARE_TYPES:
        return vectoring.instruction_length
    return 0


def exception_exit(
    event: Event,
    *,
    vectoring: Event | None = None,
    cr2: int | None = None,
    debug: int = 0,
    nmi_unblocked_by_iret: bool = False,
) -> EventExitInfo:
    """The exit information of an exception that causes a VM exit through the exception bitmap.

    ``cr2``: the faulting linear address of a #PF; ``debug``: the debug conditions of a #DB (as
    DR6 would have recorded them); ``nmi_unblocked_by_iret``: the exception is a fault on an IRET
    that removed blocking by NMI (SDM 28.2.2 bit 12)."""
    info = interruption_info(event)
    double_fault = event.type is InterruptionType.HARD_EXCEPTION and event.vector == _DF
    if nmi_unblocked_by_iret and vectoring is None and not double_fault:
        info |= INTR_INFO_UNBLOCK_NMI
    qualification = 0
    if event.type is InterruptionType.HARD_EXCEPTION and event.vector == _PF:
        qualification = cr2 or 0
    elif event.vector == _DB and event.type is InterruptionType.HARD_EXCEPTION:
        qualification = debug & DEBUG_QUALIFICATION_MASK
    return EventExitInfo(
        intr_info=info,
        intr_error_code=event.error_code or 0,
        qualification=qualification,
        instruction_length=exit_instruction_length(event, vectoring),
    )
