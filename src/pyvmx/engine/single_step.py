"""Trap-like debug exceptions in VMX non-root operation: the RFLAGS.TF single step (and the
breakpoint conditions QEMU reports with it), their priority against the monitor trap flag, and
the pending debug exceptions a VM exit saves.

* With RFLAGS.TF = 1 when an instruction starts, a #DB trap follows it with DR6.BS = 1 (SDM
  18.3.1.4); MOV SS and POP SS hold it back until after the next instruction (SDM 6.8.3).  QEMU
  does this for the instructions it executes; for the ones this machine emulates (RDTSC, IN/OUT,
  MOV CR ...) the executor raises it itself after the instruction retires.
* When both an MTF VM exit and a debug trap are pending at the boundary, the MTF VM exit
  happens and the trap stays pending: the exit saves its conditions (BS, B0-B3) in the
  pending-debug-exceptions field instead of delivering it (SDM 26.5.2, 28.3.4;
  kvm-unit-tests vmx_mtf_test, KVM's nested_vmx_update_pending_dbg()).
* Otherwise the #DB goes through the exception bitmap: a VM exit reports the conditions in the
  exit qualification and leaves DR6 unchanged (SDM 28.2.1, 28.1), or the #DB is delivered with
  DR6 updated.
* A VM entry with conditions in the pending-debug-exceptions field and no blocking by MOV SS
  recognizes that #DB before the first guest instruction (SDM 27.7.3); with blocking by MOV SS
  it stays pending and joins the next debug trap.
* Data breakpoints (DR0-DR3 with R/W = 01 or 11 in DR7, SDM 18.2.4-18.2.5) are a trap after the
  instruction that accessed the range, reporting B0-B3 (SDM 18.3.1.2).  QEMU does not raise them
  here, so the executor watches their ranges with memory hooks while any is enabled (running
  one instruction per core run).  Accesses the model emulates itself (string I/O, SMSW m16) and
  I/O breakpoints are not watched.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmx.arch.controls import PENDING_DBG_B0_B3, PENDING_DBG_BS, PENDING_DBG_ENABLED_BP
from pyvmx.arch.x86 import DR6_B0_B3, DR6_BD, DR6_BS

# The debug conditions a trap reports (DR6 / exit qualification / pending debug exceptions).
TRAP_CONDITIONS = DR6_B0_B3 | DR6_BS
PENDING_TRAP_CONDITIONS = PENDING_DBG_B0_B3 | PENDING_DBG_BS


def pending_debug_exceptions(conditions: int) -> int:
    """The pending-debug-exceptions field for a trap with ``conditions`` (SDM 25.4.2): B0-B3 and
    BS as they are, and bit 12 when a breakpoint condition met is enabled in DR7 (the ones this
    machine detects always are)."""
    pending = conditions & PENDING_TRAP_CONDITIONS
    if conditions & PENDING_DBG_B0_B3:
        pending |= PENDING_DBG_ENABLED_BP
    return pending


class TrapDisposition(enum.Enum):
    """What becomes of a debug trap recognized at an instruction boundary."""

    MTF_EXIT = enum.auto()  # an MTF VM exit; the trap is saved as pending (SDM 26.5.2, 28.3.4)
    BITMAP_EXIT = enum.auto()  # a VM exit through the exception bitmap (SDM 26.2)
    DELIVER = enum.auto()  # delivered through the guest's IDT, DR6 updated


def raised_conditions(dr6_before: int, dr6_after: int) -> int:
    """The debug conditions of the #DB QEMU just raised, from DR6 before and after the run:
    B0-B3 as QEMU left them (it recomputes them), BS and BD when newly set -- or, when the
    guest had left them set, as they stand."""
    new = dr6_after & ~dr6_before & (DR6_BS | DR6_BD)
    return (dr6_after & DR6_B0_B3) | (new or dr6_after & (DR6_BS | DR6_BD))


def disposition(*, mtf: bool, intercepted: bool) -> TrapDisposition:
    """The fate of a debug trap at the boundary after an instruction run under the monitor trap
    flag ``mtf``, with bit 1 of the exception bitmap ``intercepted``."""
    if mtf:
        return TrapDisposition.MTF_EXIT
    if intercepted:
        return TrapDisposition.BITMAP_EXIT
    return TrapDisposition.DELIVER


# DR7 (SDM 18.2.4): L0/G0 .. L3/G3 in bits 7:0, R/W n in bits 17+4n:16+4n, LEN n in 19+4n:18+4n.
_RW_WRITE, _RW_IO, _RW_READ_WRITE = 1, 2, 3
_LENGTH = {0: 1, 1: 2, 2: 8, 3: 4}


@dataclass(frozen=True, slots=True)
class DataBreakpoint:
    """One enabled data breakpoint: DRn, the linear range it covers, and whether reads count."""

    index: int
    start: int  # aligned down to the length (SDM 18.2.5)
    length: int
    writes_only: bool


def data_breakpoints(dr7: int, addresses: Sequence[int]) -> tuple[DataBreakpoint, ...]:
    """The data breakpoints DR7 enables over DR0-DR3 = ``addresses`` (SDM 18.2.4, 18.2.5)."""
    found = []
    for n in range(4):
        if not dr7 >> (2 * n) & 3:
            continue
        rw = dr7 >> (16 + 4 * n) & 3
        if rw not in (_RW_WRITE, _RW_READ_WRITE):
            continue  # instruction or I/O breakpoint
        length = _LENGTH[dr7 >> (18 + 4 * n) & 3]
        found.append(DataBreakpoint(n, addresses[n] & ~(length - 1), length, rw == _RW_WRITE))
    return tuple(found)


def any_data_breakpoint(dr7: int) -> bool:
    """Whether DR7 enables some breakpoint whose R/W field selects data accesses."""
    return any(dr7 >> (2 * n) & 3 and dr7 >> (16 + 4 * n) & 1 for n in range(4))


def hit_conditions(breakpoints: Sequence[DataBreakpoint], address: int, size: int, write: bool) -> int:
    """B0-B3 for the breakpoints an access of ``size`` bytes at ``address`` meets."""
    hits = 0
    for bp in breakpoints:
        if (write or not bp.writes_only) and address < bp.start + bp.length and bp.start < address + size:
            hits |= 1 << bp.index
    return hits
