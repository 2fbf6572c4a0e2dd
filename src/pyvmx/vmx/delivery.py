"""Event delivery through the guest's IVT or IDT, done in Python because Unicorn does not do it.

One call of :func:`deliver` performs one delivery exactly as the SDM describes it:

* real-address mode through the IVT (SDM Vol. 3 20.1.4; the REAL-ADDRESS-MODE part of the
  INT n pseudocode, SDM Vol. 2A);
* protected mode through 8-byte interrupt and trap gates, 16- and 32-bit, with or without a
  stack switch, from virtual-8086 mode included (SDM 6.10-6.13, 20.3.1.1; the PROTECTED-MODE,
  TRAP-OR-INTERRUPT-GATE, INTER-PRIVILEGE-LEVEL-INTERRUPT, INTERRUPT-FROM-VIRTUAL-8086-MODE and
  INTRA-PRIVILEGE-LEVEL-INTERRUPT parts of the pseudocode);
* IA-32e mode through 16-byte gates, with the IST (SDM 6.14);
* the rules of VM-entry event injection (SDM 27.6.1.1): software interrupts and exceptions push
  RIP + VM-entry instruction length, a software interrupt injected into virtual-8086 mode is
  never refused for IOPL < 3 when CR4.VME = 0, and with CR4.VME = 1 it is redirected through the
  TSS's interrupt-redirection bitmap (SDM 20.3.3).

:func:`escalate` is SDM Table 6-5 ("Conditions for Generating a Double Fault") and
:func:`deliver_with_escalation` the loop around :func:`deliver` that turns a fault met during
delivery into the next event, a #DF, a triple fault or a VM exit.

Choices where the SDM leaves latitude, or this model simplifies:

* Task gates are not modelled: a task gate raises #GP(vector*8 + 2 + EXT), as a gate of a bad
  type does (see :func:`deliver`).
* Shadow stacks (CET), FRED and protection keys are not modelled.
* A segment selector pushed by a 32-bit gate is zero-extended to 32 bits (the SDM allows the
  upper half to be left unwritten; Bochs writes zeros too). Pushes are written one at a time, from
  the highest address down, after every check the SDM makes before the first push.
* On a privilege change in IA-32e mode the new SS is a null selector with RPL = new CPL (SDM
  6.14.4). Its hidden part is marked *unusable*, as SDM 25.4.1 says of any segment register
  loaded with a null selector, and keeps DPL = new CPL in its access rights: the CPL is SS.DPL
  (SDM 25.4.1, 28.3.2), which VM exits save even for an unusable SS.
* A 16-bit stack (SS.B = 0) changes only SP; bits 31:16 of ESP are those of ESP before delivery
  (as in Bochs). A 32-bit stack loads ESP zero-extended into RSP.
* Accessed bits of loaded code- and stack-segment descriptors are set (a supervisor-mode write of
  the descriptor's type byte) after the pushes, when the descriptor is loaded.
* The RF value pushed is RFLAGS.RF as it is, unless the caller asks for the rule of SDM 18.3.1.1
  (``fault_rf``): a fault-class exception -- every fault but #DB -- pushes RF = 1.  VM-entry
  injection pushes the guest's RF for the injected event itself (SDM 27.6.1.1), so the caller
  says ``injected`` and the rule applies only to the faults its delivery meets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pyvmx.arch.controls import InterruptionType
from pyvmx.arch.x86 import (
    RFLAGS_IOPL_MASK,
    SEGMENT_TI_MASK,
    SYS_TYPE_INTR_GATE,
    SYS_TYPE_INTR_GATE16,
    SYS_TYPE_TASK_GATE,
    SYS_TYPE_TRAP_GATE,
    SYS_TYPE_TRAP_GATE16,
    SYS_TYPE_TSS16_AVAIL,
    SYS_TYPE_TSS16_BUSY,
    VMX_AR_DB_MASK,
    VMX_AR_DPL_SHIFT,
    VMX_AR_L_MASK,
    VMX_AR_S_MASK,
    VMX_AR_TYPE_ACCESSES_MASK,
    VMX_AR_TYPE_CODE_MASK,
    VMX_AR_TYPE_CONFORMING_MASK,
    VMX_AR_TYPE_EXPAND_DOWN_MASK,
    VMX_AR_TYPE_WRITEABLE_MASK,
    VMX_AR_UNUSABLE_MASK,
    Cr0,
    Cr4,
    ExceptionVector,
    Rflags,
)
from pyvmx.vmx.faults import EptMisconfig, EptViolation, X86Fault
from pyvmx.vmx.state import CS, DS, ES, FS, GS, LDTR, SS, TR, ArchState, Segment

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1

_GP = int(ExceptionVector.GP)
_NP = int(ExceptionVector.NP)
_SS = int(ExceptionVector.SS)
_TS = int(ExceptionVector.TS)
_PF = int(ExceptionVector.PF)
_DF = int(ExceptionVector.DF)
_EXCEPTION_VECTORS = frozenset(int(v) for v in ExceptionVector)

# Exceptions of the fault class (SDM Table 6-1), #DB aside: its RF rule is its own (SDM 18.3.1.1).
FAULT_VECTORS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21})

# Interruption types whose pushed return address is past the instruction (SDM 27.6.1.1).
_PAST_THE_INSTRUCTION = frozenset({
    InterruptionType.SOFT_INTR,
    InterruptionType.PRIV_SW_EXCEPTION,
    InterruptionType.SOFT_EXCEPTION,
})
# INT n, INT3 and INTO: the gate-DPL check applies and EXT is 0 (SDM 6.12.1.2, 6.13).
_SOFTWARE = frozenset({InterruptionType.SOFT_INTR, InterruptionType.SOFT_EXCEPTION})
_DELIVERABLE = frozenset({
    InterruptionType.EXT_INTR,
    InterruptionType.NMI_INTR,
    InterruptionType.HARD_EXCEPTION,
    InterruptionType.SOFT_INTR,
    InterruptionType.PRIV_SW_EXCEPTION,
    InterruptionType.SOFT_EXCEPTION,
})


# --- the event ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    """An event to deliver through the IDT, in the terms of the interruption-information format
    (SDM 25.8.3). ``error_code`` is pushed if and only if it is not None (the caller applies the
    SDM's list of vectors with error codes and CR0.PE; real-address mode never pushes one).
    ``instruction_length`` matters for software interrupts and exceptions, whose pushed return
    address is ``rip + instruction_length`` (SDM 27.6.1.1)."""

    vector: int
    type: InterruptionType
    error_code: int | None = None
    instruction_length: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.vector <= 0xFF:
            raise ValueError(f"event vector {self.vector} is outside 0..255")
        if self.type not in _DELIVERABLE:
            raise ValueError(f"interruption type {self.type!r} is not delivered through the IDT")
        if self.error_code is not None and not 0 <= self.error_code <= _U32:
            raise ValueError(f"error code {self.error_code:#x} is not a 32-bit value")
        if self.instruction_length < 0:
            raise ValueError("instruction length must not be negative")

    @property
    def ext(self) -> int:
        """The EXT bit of error codes for faults met while delivering this event (SDM 6.13): 0
        for INT n, INT3 and INTO, 1 for everything else -- INT1 (ICEBP) included."""
        return 0 if self.type in _SOFTWARE else 1

    @property
    def software(self) -> bool:
        """INT n, INT3 or INTO: the gate DPL is checked against the CPL (SDM 6.12.1.2)."""
        return self.type in _SOFTWARE

    def return_address(self, rip: int) -> int:
        """The RIP pushed: past the instruction for software interrupts and exceptions."""
        if self.type in _PAST_THE_INSTRUCTION:
            return rip + self.instruction_length
        return rip


class LinearMemory(Protocol):
    """Linear memory as event delivery sees it. The implementation does paging and EPT and may
    raise X86Fault(#PF), EptViolation or EptMisconfig. ``supervisor`` marks implicit
    supervisor-mode accesses (IDT, GDT/LDT and TSS, SDM 4.6) and the pushes onto a new, more
    privileged stack; otherwise the access is made at the current CPL."""

    def read(self, linear: int, size: int, *, supervisor: bool) -> bytes: ...

    def write(self, linear: int, data: bytes, *, supervisor: bool) -> None: ...


# --- descriptors ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Descriptor:
    """A code- or data-segment (or system) descriptor read from the GDT or LDT (SDM 3.4.5)."""

    address: int  # linear address, for the accessed bit
    low: int
    high: int

    @property
    def ar(self) -> int:
        """Access rights in the VMX format (SDM 25.4.1): descriptor bits 47:40 and 55:52."""
        return (self.high >> 8) & 0xF0FF

    @property
    def type(self) -> int:
        return (self.high >> 8) & 0xF

    @property
    def dpl(self) -> int:
        return (self.high >> 13) & 3

    @property
    def system(self) -> bool:
        return not self.high & (1 << 12)

    @property
    def present(self) -> bool:
        return bool(self.high & (1 << 15))

    @property
    def is_code(self) -> bool:
        return not self.system and bool(self.type & VMX_AR_TYPE_CODE_MASK)

    @property
    def conforming(self) -> bool:
        return self.is_code and bool(self.type & VMX_AR_TYPE_CONFORMING_MASK)

    @property
    def writable_data(self) -> bool:
        return not self.system and not self.type & VMX_AR_TYPE_CODE_MASK and bool(
            self.type & VMX_AR_TYPE_WRITEABLE_MASK
        )

    @property
    def code64(self) -> bool:
        """A 64-bit code segment: L = 1 and D = 0 (SDM 6.14.1)."""
        return bool(self.ar & VMX_AR_L_MASK) and not self.ar & VMX_AR_DB_MASK

    @property
    def base(self) -> int:
        return ((self.low >> 16) & 0xFFFF) | ((self.high & 0xFF) << 16) | (self.high & 0xFF00_0000)

    @property
    def limit(self) -> int:
        """The scaled limit (SDM 3.4.5: with G = 1 the limit is in 4-KByte units)."""
        raw = (self.low & 0xFFFF) | (self.high & 0x000F_0000)
        return (raw << 12) | 0xFFF if self.high & (1 << 23) else raw

    def segment(self, selector: int, rpl: int) -> Segment:
        """The segment register this descriptor loads, accessed bit set, RPL replaced."""
        return Segment(
            (selector & 0xFFFC) | rpl, self.base, self.limit, self.ar | VMX_AR_TYPE_ACCESSES_MASK
        )


@dataclass(frozen=True, slots=True)
class _Gate:
    """An interrupt, trap or task gate (SDM 6.11, Figure 6-2; 6.14.1, Figure 6-8)."""

    type: int
    system: bool
    dpl: int
    present: bool
    selector: int
    offset: int
    ist: int

    @classmethod
    def parse(cls, raw: bytes) -> _Gate:
        low = int.from_bytes(raw[0:4], "little")
        high = int.from_bytes(raw[4:8], "little")
        gate_type = (high >> 8) & 0xF
        offset = low & 0xFFFF
        if gate_type not in (SYS_TYPE_INTR_GATE16, SYS_TYPE_TRAP_GATE16):
            offset |= high & 0xFFFF_0000  # 16-bit gates have a 16-bit offset
        if len(raw) == 16:
            offset |= int.from_bytes(raw[8:12], "little") << 32
        return cls(
            type=gate_type,
            system=not high & (1 << 12),
            dpl=(high >> 13) & 3,
            present=bool(high & (1 << 15)),
            selector=low >> 16,
            offset=offset,
            ist=high & 7,
        )

    @property
    def interrupt_gate(self) -> bool:
        """Interrupt gates clear IF; trap gates do not (SDM 6.12.1.3)."""
        return self.type in (SYS_TYPE_INTR_GATE, SYS_TYPE_INTR_GATE16)

    @property
    def width(self) -> int:
        """The push width in bytes of a legacy gate: 2 for 16-bit gates, 4 for 32-bit ones."""
        return 2 if self.type in (SYS_TYPE_INTR_GATE16, SYS_TYPE_TRAP_GATE16) else 4


def _within_limit(seg: Segment, offset: int, size: int) -> bool:
    """Whether bytes offset..offset+size-1 lie inside the segment (SDM 5.3; expand-down data
    segments span limit+1 .. 0xFFFF or 0xFFFFFFFF depending on B)."""
    last = offset + size - 1
    if not seg.ar & VMX_AR_TYPE_CODE_MASK and seg.ar & VMX_AR_TYPE_EXPAND_DOWN_MASK:
        upper = _U32 if seg.ar & VMX_AR_DB_MASK else _U16
        return offset > seg.limit and last <= upper
    return last <= seg.limit


def _canonical(address: int, cr4: int) -> bool:
    """Canonical with 48-bit (4-level) or 57-bit (5-level, CR4.LA57) linear addresses."""
    bits = 57 if cr4 & Cr4.LA57 else 48
    top = address >> (bits - 1)
    return top == 0 or top == (1 << (64 - bits + 1)) - 1


def _fault(vector: int, error_code: int | None) -> X86Fault:
    return X86Fault(vector, error_code)


# --- one delivery ---------------------------------------------------------------------------------
class _Delivery:
    """The state of one delivery: a private copy of the registers, the memory, the event."""

    def __init__(self, st: ArchState, memory: LinearMemory, event: Event, set_rf: bool = False) -> None:
        self.st = st
        self.mem = memory
        self.event = event
        # The RFLAGS image pushed (RF = 1 for a fault, SDM 18.3.1.1, when the caller asks).
        self.pushed_rflags = st.rflags | int(Rflags.RF) if set_rf else st.rflags
        self.ext = event.ext
        # Error code for IDT-related faults: vector*8 + 2 (IDT bit) + EXT (SDM 6.13).
        self.idt_error = event.vector * 8 + 2 + self.ext
        mask = {16: _U16, 32: _U32, 64: _U64}[st.bitness]
        self.return_ip = event.return_address(st.rip) & mask

    # -- memory helpers ----------------------------------------------------------------------------
    def read(self, linear: int, size: int) -> int:
        """An implicit supervisor-mode read (IDT, IVT, GDT/LDT, TSS)."""
        return int.from_bytes(self.mem.read(linear & _U64, size, supervisor=True), "little")

    def selector_error(self, selector: int) -> int:
        return (selector & 0xFFFC) | self.ext

    def fetch_descriptor(self, selector: int, vector: int) -> _Descriptor:
        """Read the GDT or LDT entry of a non-null selector; #vector(selector|EXT) if the index
        is beyond the table's limit (the INT n pseudocode, SDM Vol. 2A)."""
        st = self.st
        if selector & SEGMENT_TI_MASK:
            ldtr = st.segments[LDTR]
            if ldtr.unusable:
                raise _fault(vector, self.selector_error(selector))
            base, limit = ldtr.base, ldtr.limit
        else:
            base, limit = st.gdtr_base, st.gdtr_limit
        index = selector & 0xFFF8
        if index + 7 > limit:
            raise _fault(vector, self.selector_error(selector))
        raw = self.mem.read((base + index) & _U64, 8, supervisor=True)
        return _Descriptor(
            (base + index) & _U64,
            int.from_bytes(raw[0:4], "little"),
            int.from_bytes(raw[4:8], "little"),
        )

    def touch(self, desc: _Descriptor) -> None:
        """Set the descriptor's accessed bit if it is clear (SDM 3.4.5.1)."""
        if not desc.type & VMX_AR_TYPE_ACCESSES_MASK:
            byte = ((desc.high >> 8) | VMX_AR_TYPE_ACCESSES_MASK) & 0xFF
            self.mem.write((desc.address + 5) & _U64, bytes([byte]), supervisor=True)

    def frame(
        self, sp: int, mask: int, items: list[tuple[int, int]], fits: Callable[[int, int], bool]
    ) -> list[int] | None:
        """The offsets of ``(value, size)`` pushes from ``sp`` downwards (wrapping within
        ``mask``, the stack-address size), or None if one has no room by ``fits(offset, size)``:
        the SDM checks the room for the whole frame before the first push."""
        offsets = []
        cur = sp
        for _, size in items:
            cur = (cur - size) & mask
            if not fits(cur, size):
                return None
            offsets.append(cur)
        return offsets

    def write_frame(
        self, base: int, items: list[tuple[int, int]], offsets: list[int], *, supervisor: bool
    ) -> None:
        """Write the pushes, one at a time from the highest address down."""
        for (value, size), off in zip(items, offsets, strict=True):
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.mem.write((base + off) & _U64, data, supervisor=supervisor)

    def legacy_stack(self, ss: Segment) -> tuple[int, Callable[[int, int], bool]]:
        mask = _U32 if ss.ar & VMX_AR_DB_MASK else _U16
        return mask, lambda off, size: _within_limit(ss, off, size)

    def set_sp(self, rsp_before: int, new_sp: int, mask: int) -> int:
        """ESP after pushes on a 32-bit stack, or SP with ESP[31:16] kept on a 16-bit one."""
        if mask == _U16:
            return (rsp_before & 0xFFFF_0000) | new_sp
        return new_sp

    # -- real-address mode and 8086 redirection ----------------------------------------------------
    def real_mode(self) -> None:
        """SDM 20.1.4 and REAL-ADDRESS-MODE: IVT entry at IDTR.base + 4*vector, push FLAGS, CS,
        IP (16 bits each), clear IF, TF, AC and RF, load CS:IP. No error code is pushed."""
        st = self.st
        vector = self.event.vector
        if vector * 4 + 3 > st.idtr_limit:
            raise _fault(_GP, None)  # exceptions in real mode push no error code
        self.to_8086_handler(st.idtr_base, st.rflags & _U16, clear=Rflags.IF | Rflags.AC)

    def to_8086_handler(self, ivt: int, pushed_flags: int, clear: int) -> None:
        """Push FLAGS, CS, IP on SS:SP and jump through the 4-byte IVT entry (real mode, and
        virtual-8086 redirection through the IVT at linear 0, SDM 20.3.3, Table 20-2)."""
        st = self.st
        ss, cs = st.segments[SS], st.segments[CS]
        mask, fits = self.legacy_stack(ss)
        v86 = bool(st.rflags & Rflags.VM)
        items = [(pushed_flags, 2), (cs.selector, 2), (self.return_ip, 2)]
        offsets = self.frame(st.rsp & mask, mask, items, fits)
        if offsets is None:
            raise _fault(_SS, 0 if v86 else None)
        self.write_frame(ss.base, items, offsets, supervisor=False)
        offset = self.read(ivt + 4 * self.event.vector, 2)
        selector = self.read(ivt + 4 * self.event.vector + 2, 2)
        if offset > cs.limit:  # CS.limit does not change in real mode (as in Bochs)
            raise _fault(_GP, 0 if v86 else None)
        st.rsp = self.set_sp(st.rsp, offsets[-1], mask)
        st.segments[CS] = Segment(selector, selector << 4, cs.limit, cs.ar)
        st.rip = offset
        st.rflags &= ~int(clear | Rflags.TF | Rflags.RF) & _U64

    def v86_redirect(self) -> bool:
        """SDM 27.6.1.1 and 20.3.3: a software interrupt in virtual-8086 mode with CR4.VME = 1
        consults the interrupt-redirection bitmap (the 32 bytes below the I/O-map base of the
        TSS). Bit clear: delivered to the 8086 handler through the IVT at linear 0 -- with IOPL
        < 3 the pushed FLAGS has IOPL = 3 and IF = VIF, and VIF (not IF) is cleared. Bit set:
        the protected-mode handler, refused with #GP(0) when IOPL < 3. Returns whether the
        event was redirected."""
        st = self.st
        tr = st.segments[TR]
        if tr.limit < 0x67:
            raise _fault(_GP, 0)
        io_base = self.read(tr.base + 0x66, 2)
        byte_offset = io_base - 32 + (self.event.vector >> 3)
        if byte_offset < 0 or byte_offset > tr.limit:
            raise _fault(_GP, 0)
        bitmap = self.read(tr.base + byte_offset, 1)
        iopl3 = (st.rflags & RFLAGS_IOPL_MASK) == RFLAGS_IOPL_MASK
        if bitmap >> (self.event.vector & 7) & 1:
            if not iopl3:
                raise _fault(_GP, 0)
            return False
        flags = st.rflags & _U16
        if iopl3:
            self.to_8086_handler(0, flags, clear=Rflags.IF)
        else:
            flags |= RFLAGS_IOPL_MASK
            flags = (flags | Rflags.IF) if st.rflags & Rflags.VIF else (flags & ~int(Rflags.IF))
            self.to_8086_handler(0, flags, clear=Rflags.VIF)
        return True

    # -- protected mode ----------------------------------------------------------------------------
    def read_gate(self, size: int) -> _Gate:
        """IDT limit check, then the gate (SDM 6.10: #GP(vector*8 + 2 + EXT) beyond the limit)."""
        st = self.st
        offset = self.event.vector * size
        if offset + size - 1 > st.idtr_limit:
            raise _fault(_GP, self.idt_error)
        raw = self.mem.read((st.idtr_base + offset) & _U64, size, supervisor=True)
        return _Gate.parse(raw)

    def check_gate_dpl_and_present(self, gate: _Gate) -> None:
        # INT n / INT3 / INTO: gate DPL < CPL -> #GP(vector*8 + 2), EXT = 0 (SDM 6.12.1.2).
        if self.event.software and gate.dpl < self.st.cpl:
            raise _fault(_GP, self.event.vector * 8 + 2)
        if not gate.present:
            raise _fault(_NP, self.idt_error)

    def code_segment(self, gate: _Gate, long_mode: bool) -> _Descriptor:
        """TRAP-OR-INTERRUPT-GATE: the checks on the gate's code-segment selector."""
        selector = gate.selector
        if not selector & 0xFFFC:
            raise _fault(_GP, self.ext)  # null selector: #GP(EXT)
        desc = self.fetch_descriptor(selector, _GP)
        if not desc.is_code or desc.dpl > self.st.cpl:
            raise _fault(_GP, self.selector_error(selector))
        if long_mode and not desc.code64:
            # SDM 6.14.1 words this error code as "the IDT vector number"; like Bochs, this
            # model reports #GP(selector + EXT), as for the other checks on this selector.
            raise _fault(_GP, self.selector_error(selector))
        if not desc.present:
            raise _fault(_NP, self.selector_error(selector))
        return desc

    def protected_mode(self) -> None:
        """PROTECTED-MODE and TRAP-OR-INTERRUPT-GATE (SDM 6.12.1, 20.3.1.1)."""
        st = self.st
        gate = self.read_gate(8)
        if not gate.system or gate.type not in (
            SYS_TYPE_TASK_GATE,
            SYS_TYPE_INTR_GATE16,
            SYS_TYPE_TRAP_GATE16,
            SYS_TYPE_INTR_GATE,
            SYS_TYPE_TRAP_GATE,
        ):
            raise _fault(_GP, self.idt_error)
        self.check_gate_dpl_and_present(gate)
        if gate.type == SYS_TYPE_TASK_GATE:
            raise _fault(_GP, self.idt_error)  # task switches are not modelled
        desc = self.code_segment(gate, long_mode=False)
        v86 = bool(st.rflags & Rflags.VM)
        if not desc.conforming and desc.dpl < st.cpl:
            if v86 and desc.dpl != 0:
                raise _fault(_GP, self.selector_error(gate.selector))
            self.inter_privilege(gate, desc, v86)
        else:
            # Conforming, or DPL = CPL (code_segment() refused DPL > CPL): same privilege,
            # which virtual-8086 mode may not use.
            if v86:
                raise _fault(_GP, self.selector_error(gate.selector))
            self.intra_privilege(gate, desc)

    def tss_stack(self, dpl: int) -> tuple[int, int]:
        """NewSS:NewESP for privilege level ``dpl`` from the current 32- or 16-bit TSS."""
        tr = self.st.segments[TR]
        if tr.type in (SYS_TYPE_TSS16_AVAIL, SYS_TYPE_TSS16_BUSY):
            address = dpl * 4 + 2
            if address + 3 > tr.limit:
                raise _fault(_TS, self.selector_error(tr.selector))
            return self.read(tr.base + address + 2, 2), self.read(tr.base + address, 2)
        address = dpl * 8 + 4
        if address + 5 > tr.limit:  # SS is the 2 bytes at +4 (editions before 2016 say + 7)
            raise _fault(_TS, self.selector_error(tr.selector))
        return self.read(tr.base + address + 4, 2), self.read(tr.base + address, 4)

    def inter_privilege(self, gate: _Gate, desc: _Descriptor, v86: bool) -> None:
        """INTER-PRIVILEGE-LEVEL-INTERRUPT and INTERRUPT-FROM-VIRTUAL-8086-MODE (legacy)."""
        st = self.st
        dpl = desc.dpl
        new_ss_sel, new_esp = self.tss_stack(dpl)
        if not new_ss_sel & 0xFFFC:
            raise _fault(_TS, self.ext)
        ss_error = self.selector_error(new_ss_sel)
        if new_ss_sel & 3 != dpl:
            raise _fault(_TS, ss_error)
        ss_desc = self.fetch_descriptor(new_ss_sel, _TS)
        if ss_desc.dpl != dpl or not ss_desc.writable_data:
            raise _fault(_TS, ss_error)
        if not ss_desc.present:
            raise _fault(_SS, ss_error)
        new_ss = ss_desc.segment(new_ss_sel, dpl)
        old_ss, old_cs = st.segments[SS], st.segments[CS]
        w = gate.width
        items: list[tuple[int, int]] = []
        if v86:
            items += [(st.segments[i].selector, w) for i in (GS, FS, DS, ES)]
        items += [
            (old_ss.selector, w),
            (st.rsp, w),
            (self.pushed_rflags, w),
            (old_cs.selector, w),
            (self.return_ip, w),
        ]
        if self.event.error_code is not None:
            items.append((self.event.error_code, w))
        mask, fits = self.legacy_stack(new_ss)
        # The room check (#SS(NewSS|EXT)) comes before the EIP limit check (#GP(EXT)).
        offsets = self.frame(new_esp & mask, mask, items, fits)
        if offsets is None:
            raise _fault(_SS, ss_error)
        if gate.offset > desc.limit:
            raise _fault(_GP, self.ext)
        self.write_frame(new_ss.base, items, offsets, supervisor=True)
        self.touch(desc)
        self.touch(ss_desc)
        st.rsp = self.set_sp(st.rsp, offsets[-1], mask)
        st.segments[SS] = new_ss
        st.segments[CS] = desc.segment(gate.selector, dpl)
        if v86:
            for i in (GS, FS, DS, ES):
                st.segments[i] = Segment(0, 0, 0, VMX_AR_UNUSABLE_MASK)
        st.rip = gate.offset
        self.clear_flags(gate)

    def intra_privilege(self, gate: _Gate, desc: _Descriptor) -> None:
        """INTRA-PRIVILEGE-LEVEL-INTERRUPT (legacy): push on the current stack."""
        st = self.st
        ss, cs = st.segments[SS], st.segments[CS]
        w = gate.width
        items = [(self.pushed_rflags, w), (cs.selector, w), (self.return_ip, w)]
        if self.event.error_code is not None:
            items.append((self.event.error_code, w))
        mask, fits = self.legacy_stack(ss)
        offsets = self.frame(st.rsp & mask, mask, items, fits)
        if offsets is None:
            raise _fault(_SS, self.ext)
        if gate.offset > desc.limit:
            raise _fault(_GP, self.ext)
        self.write_frame(ss.base, items, offsets, supervisor=False)
        self.touch(desc)
        st.rsp = self.set_sp(st.rsp, offsets[-1], mask)
        st.segments[CS] = desc.segment(gate.selector, st.cpl)
        st.rip = gate.offset
        self.clear_flags(gate)

    def clear_flags(self, gate: _Gate) -> None:
        """Interrupt gates clear IF; both kinds clear TF, NT, RF and VM (SDM 6.12.1.3)."""
        clear = Rflags.TF | Rflags.NT | Rflags.RF | Rflags.VM
        if gate.interrupt_gate:
            clear |= Rflags.IF
        self.st.rflags &= ~int(clear) & _U64

    # -- IA-32e mode -------------------------------------------------------------------------------
    def ia32e_mode(self) -> None:
        """IA-32e-MODE (SDM 6.14): 16-byte gates, 64-bit code segment, optional IST, RSP aligned
        to 16 bytes, SS:RSP always pushed, 8-byte pushes."""
        st = self.st
        gate = self.read_gate(16)
        if not gate.system or gate.type not in (SYS_TYPE_INTR_GATE, SYS_TYPE_TRAP_GATE):
            raise _fault(_GP, self.idt_error)
        self.check_gate_dpl_and_present(gate)
        desc = self.code_segment(gate, long_mode=True)
        cpl = st.cpl
        # code_segment() refused DPL > CPL, so this is either a privilege change or not.
        if not desc.conforming and desc.dpl < cpl:
            new_cpl = desc.dpl
            index = gate.ist + 3 if gate.ist else new_cpl  # TSS64: RSP0-2 at +4, IST1-7 at +0x24
            new_rsp = self.tss64_rsp(index)
        else:
            new_cpl = cpl
            new_rsp = self.tss64_rsp(gate.ist + 3) if gate.ist else st.rsp
        if not _canonical(new_rsp, st.cr4):
            raise _fault(_SS, self.ext)
        if not _canonical(gate.offset, st.cr4):
            raise _fault(_GP, self.ext)
        old_ss, old_cs = st.segments[SS], st.segments[CS]
        items = [
            (old_ss.selector, 8),
            (st.rsp, 8),
            (self.pushed_rflags, 8),
            (old_cs.selector, 8),
            (self.return_ip, 8),
        ]
        if self.event.error_code is not None:
            items.append((self.event.error_code, 8))
        offsets = self.frame(
            new_rsp & ~0xF & _U64,
            _U64,
            items,
            lambda off, size: _canonical(off, st.cr4) and _canonical(off + size - 1, st.cr4),
        )
        if offsets is None:
            raise _fault(_SS, self.ext)
        self.write_frame(0, items, offsets, supervisor=new_cpl < cpl)
        self.touch(desc)
        st.rsp = offsets[-1]
        if new_cpl < cpl:
            # SDM 6.14.4: SS := null selector with RPL = new CPL (see the module docstring).
            st.segments[SS] = Segment(
                new_cpl,
                0,
                0,
                VMX_AR_UNUSABLE_MASK | VMX_AR_S_MASK | (new_cpl << VMX_AR_DPL_SHIFT),
            )
        st.segments[CS] = desc.segment(gate.selector, new_cpl)
        st.rip = gate.offset
        self.clear_flags(gate)

    def tss64_rsp(self, index: int) -> int:
        """RSPn (index 0-2) or ISTn (index n + 3) from the 64-bit TSS (SDM 8.7);
        #TS(TR selector + EXT) beyond the TSS limit."""
        tr = self.st.segments[TR]
        address = index * 8 + 4
        if address + 7 > tr.limit:
            raise _fault(_TS, self.selector_error(tr.selector))
        return self.read(tr.base + address, 8)

    # -- dispatch ----------------------------------------------------------------------------------
    def run(self) -> None:
        st = self.st
        vme_redirection = (
            st.rflags & Rflags.VM
            and st.cr4 & Cr4.VME
            and self.event.type is InterruptionType.SOFT_INTR
        )
        if not st.cr0 & Cr0.PE:
            self.real_mode()
        elif st.long_mode:
            self.ia32e_mode()
        elif not (vme_redirection and self.v86_redirect()):
            self.protected_mode()
        st.interrupt_shadow = False  # delivery discards blocking by STI / MOV SS (Bochs)


def _copy_state(state: ArchState) -> ArchState:
    return dataclasses.replace(state, segments=[dataclasses.replace(s) for s in state.segments])


def is_fault(event: Event) -> bool:
    """A hardware exception of the fault class other than #DB (SDM Table 6-1)."""
    return event.type is InterruptionType.HARD_EXCEPTION and event.vector in FAULT_VECTORS


def deliver(state: ArchState, memory: LinearMemory, event: Event, *, set_rf: bool = False) -> None:
    """Deliver one event through the IVT (CR0.PE = 0) or the IDT, per SDM Vol. 3 ch. 6 and 20
    and 27.6.1.1.

    On success ``state`` holds the handler's registers. A fault detected during delivery is
    raised as :class:`X86Fault` with its architectural error code (EXT from :attr:`Event.ext`)
    and leaves ``state`` unchanged (memory may already hold some of the pushes, as on hardware);
    #PF, EptViolation and EptMisconfig from ``memory`` propagate unchanged.

    Not modelled: task gates (a task gate raises #GP(vector*8 + 2 + EXT), like a bad gate type),
    shadow stacks, FRED. A virtual-8086 mode source is handled in full: the GS, FS, DS and ES
    pushes of INTERRUPT-FROM-VIRTUAL-8086-MODE, and CR4.VME interrupt redirection of software
    interrupts.

    ``set_rf`` pushes RFLAGS with RF = 1 (a fault, SDM 18.3.1.1); the handler's RF is 0 either way.
    """
    work = _copy_state(state)
    _Delivery(work, memory, event, set_rf).run()
    for f in dataclasses.fields(ArchState):
        setattr(state, f.name, getattr(work, f.name))


# --- double faults (SDM 6.15, Tables 6-4 and 6-5) -----------------------------------------------
ExceptionClass = Literal["benign", "contributory", "page_fault"]

_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13, 21})  # #DE, #TS, #NP, #SS, #GP, #CP
_PAGE_FAULTS = frozenset({14, 20})  # #PF, #VE


def double_fault_class(vector: int) -> ExceptionClass:
    """The class of an exception vector in SDM Table 6-4. Vectors the table does not list (#DF
    itself, reserved vectors, interrupts) are benign here; :func:`escalate` handles a #DF
    being delivered on its own."""
    if vector in _CONTRIBUTORY:
        return "contributory"
    if vector in _PAGE_FAULTS:
        return "page_fault"
    return "benign"


def escalate(first: Event, second: X86Fault) -> Event | None:
    """What to deliver when ``second`` is detected while delivering ``first`` (SDM 6.15,
    Table 6-5): a #DF (error code 0), the second exception itself (handled serially), or None
    -- shutdown (triple fault) -- when ``first`` is already a #DF (Interrupt 8: "If another
    exception occurs while attempting to call the double-fault handler, the processor enters
    shutdown mode").

    Only hardware exceptions have a class: a fault while delivering an external interrupt, an
    NMI, or a software interrupt or exception is handled serially (the first event is benign).
    """
    double_fault = Event(_DF, InterruptionType.HARD_EXCEPTION, 0)
    if first.type is InterruptionType.HARD_EXCEPTION and first.vector == _DF:
        return None
    first_class: ExceptionClass = (
        double_fault_class(first.vector)
        if first.type is InterruptionType.HARD_EXCEPTION
        else "benign"
    )
    second_class = double_fault_class(second.vector)
    if first_class == "contributory" and second_class == "contributory":
        return double_fault
    if first_class == "page_fault" and second_class in ("contributory", "page_fault"):
        return double_fault
    return Event(second.vector, InterruptionType.HARD_EXCEPTION, second.error_code)


# --- delivery with nested faults ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Delivered:
    """The event (or a fault it led to) reached its handler. ``cr2``: the value CR2 must now hold
    when a #PF met during delivery was delivered or turned into #DF (None: CR2 unchanged)."""

    cr2: int | None = None


@dataclass(frozen=True, slots=True)
class Intercepted:
    """A fault met during delivery causes a VM exit through the exception bitmap (SDM 26.2);
    the IDT-vectoring information describes ``vectoring`` (SDM 28.2.4) -- None when ``event`` is
    the #DF that Table 6-5 made of the fault: "the original event results in a double-fault
    exception that causes the VM exit directly" is not an exit during event delivery (SDM
    28.2.4), so the IDT-vectoring information is invalid. ``cr2`` is the faulting
    linear address when ``event`` is a #PF (the exit qualification; CR2 itself is not loaded,
    SDM 26.2); ``loaded_cr2`` is the value CR2 was loaded with by an earlier #PF of the same
    delivery that was turned into #DF (None: CR2 unchanged)."""

    event: Event
    vectoring: Event | None
    cr2: int | None = None
    loaded_cr2: int | None = None


@dataclass(frozen=True, slots=True)
class TripleFault:
    """A fault while delivering a #DF: shutdown, i.e. a triple-fault VM exit (SDM 26.2)."""

    vectoring: Event
    loaded_cr2: int | None = None
    chain: tuple[Event, ...] = field(default=(), compare=False)  # the event delivered first, then each one its delivery raised, to the #DF


def shutdown_chain_text(chain: tuple[Event, ...]) -> str:
    """``#UD -> #GP -> #DF -> shutdown``: the events a triple fault came from (SDM 6.15, Table 6-5)."""
    names = [f"#{ExceptionVector(e.vector).name}" if e.vector in _EXCEPTION_VECTORS else f"vector {e.vector}" for e in chain]
    return " -> ".join([*names, "shutdown"])


@dataclass(frozen=True, slots=True)
class EptExit:
    """An EPT violation or misconfiguration during delivery: a VM exit whose IDT-vectoring
    information describes ``vectoring`` (SDM 28.2.4)."""

    fault: EptViolation | EptMisconfig
    vectoring: Event
    loaded_cr2: int | None = None


DeliveryOutcome = Delivered | Intercepted | TripleFault | EptExit


def deliver_with_escalation(
    state: ArchState,
    memory: LinearMemory,
    event: Event,
    intercepted: Callable[[Event], bool],
    *,
    fault_rf: bool = False,
    injected: bool = False,
) -> DeliveryOutcome:
    """Deliver ``event``, and the faults its delivery meets, until a handler is reached or a VM
    exit or shutdown ends it (SDM 6.15, 26.2, 27.6.1.1).

    ``intercepted(e)`` says whether exception ``e`` causes a VM exit (the exception bitmap and,
    for #PF, the error-code mask/match); it is asked about every fault met during delivery and
    about the #DF that Table 6-5 makes of it -- not about ``event`` itself, which the caller has
    already decided to deliver. Only the final successful delivery changes ``state``.

    CR2: a #PF that is not intercepted loads CR2 before it is delivered or escalated (as in
    Bochs's page_fault()); the outcomes report the value loaded (``Delivered.cr2``,
    ``loaded_cr2``), since ArchState has no CR2.

    ``fault_rf``: faults push RF = 1 (SDM 18.3.1.1); with ``injected`` the rule spares ``event``
    itself, whose pushed RF is the guest's (SDM 27.6.1.1).
    """
    current = event
    chain = [event]
    cr2: int | None = None
    while True:
        try:
            set_rf = fault_rf and is_fault(current) and not (injected and current is event)
            deliver(state, memory, current, set_rf=set_rf)
            return Delivered(cr2)
        except X86Fault as fault:
            fault_event = Event(fault.vector, InterruptionType.HARD_EXCEPTION, fault.error_code)
            if intercepted(fault_event):
                fault_cr2 = fault.cr2 if fault.vector == _PF else None
                return Intercepted(fault_event, current, fault_cr2, cr2)
            if fault.vector == _PF and fault.cr2 is not None:
                cr2 = fault.cr2
            nxt = escalate(current, fault)
            if nxt is None:
                return TripleFault(current, cr2, tuple(chain))  # the fault delivering the last is the shutdown
            if nxt != fault_event and intercepted(nxt):  # a #DF made by Table 6-5: exits directly
                return Intercepted(nxt, None, None, cr2)
            current = nxt
            chain.append(nxt)
        except (EptViolation, EptMisconfig) as fault:
            return EptExit(fault, current, cr2)
