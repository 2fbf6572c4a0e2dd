"""Event delivery through the IVT/IDT (SDM Vol. 3 ch. 6 and 20, 27.6.1.1) and the double-fault
rules (SDM 6.15, Tables 6-4 and 6-5): one test per rule, named after it, asserting the exact
frame pushed, the registers loaded and the error codes of faults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from pyvmx.arch.controls import InterruptionType as T
from pyvmx.arch.x86 import Cr0, Cr4, Efer, Rflags
from pyvmx.vmx.delivery import (
    Delivered,
    EptExit,
    Event,
    Intercepted,
    TripleFault,
    deliver,
    deliver_with_escalation,
    double_fault_class,
    escalate,
)
from pyvmx.vmx.faults import EptViolation, X86Fault, page_fault
from pyvmx.vmx.state import CS, DS, ES, FS, GS, LDTR, SS, TR, ArchState, Segment

PAGE = 0x1000
GP, NP, SS_, TS, PF, DF = 13, 11, 12, 10, 14, 8


# --- a fake linear memory -------------------------------------------------------------------------
@dataclass
class FakeMemory:
    """Linear = physical, sparse, with pages that fault (#PF or EPT violation) and a log of
    writes with their supervisor flag."""

    pages: dict[int, bytearray] = field(default_factory=dict)
    pf_pages: set[int] = field(default_factory=set)
    ept_pages: set[int] = field(default_factory=set)
    writes: list[tuple[int, bytes, bool]] = field(default_factory=list)

    def _check(self, linear: int, size: int, write: bool) -> None:
        for page in {linear // PAGE, (linear + size - 1) // PAGE}:
            if page in self.pf_pages:
                raise page_fault(max(linear, page * PAGE), 2 if write else 0)
            if page in self.ept_pages:
                raise EptViolation(page * PAGE, 0x182 if write else 0x181, linear)

    def _page(self, n: int) -> bytearray:
        return self.pages.setdefault(n, bytearray(PAGE))

    def load(self, linear: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self._page((linear + i) // PAGE)[(linear + i) % PAGE] = b

    def peek(self, linear: int, size: int) -> bytes:
        return bytes(self._page((linear + i) // PAGE)[(linear + i) % PAGE] for i in range(size))

    def read(self, linear: int, size: int, *, supervisor: bool) -> bytes:
        self._check(linear, size, write=False)
        return self.peek(linear, size)

    def write(self, linear: int, data: bytes, *, supervisor: bool) -> None:
        self._check(linear, len(data), write=True)
        self.writes.append((linear, data, supervisor))
        self.load(linear, data)

    def values(self, linear: int, width: int, count: int) -> list[int]:
        """``count`` little-endian values of ``width`` bytes from ``linear`` upwards."""
        return [
            int.from_bytes(self.peek(linear + i * width, width), "little") for i in range(count)
        ]

    def put(self, linear: int, value: int, width: int) -> None:
        self.load(linear, value.to_bytes(width, "little"))


# --- builders -------------------------------------------------------------------------------------
GDT, IDT, TSS, LDT = 0x1000, 0x2000, 0x4000, 0x5000
HANDLER = 0x6000
KSTACK, USTACK = 0x8000, 0x9000

# Access rights in the VMX format (type 3:0, S 4, DPL 6:5, P 7, L 13, D/B 14, G 15).
AR_KCODE32, AR_KDATA32 = 0xC09B, 0xC093
AR_UCODE32, AR_UDATA32 = 0xC0FB, 0xC0F3
AR_CODE16 = 0x009B
AR_CONFORMING = 0xC09F
AR_KCODE64, AR_UCODE64 = 0xA09B, 0xA0FB
AR_TSS_BUSY = 0x008B

KCODE, KDATA, UCODE, UDATA, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
CODE16, CONFORMING, KCODE64 = 0x30, 0x38, 0x40
DATA_NP, CODE_NP, KDATA_RO = 0x48, 0x50, 0x58
KCODE_SMALL, KDATA_SMALL, UCODE64, CODE_UNACCESSED, CODE32_IN_LM = 0x60, 0x68, 0x73, 0x78, 0x80
DATA1 = 0x89  # a ring-1 data segment, RPL 1

GDT_ENTRIES: dict[int, tuple[int, int, int]] = {  # selector index -> (base, limit, ar)
    1: (0, 0xFFFFFFFF, AR_KCODE32),
    2: (0, 0xFFFFFFFF, AR_KDATA32),
    3: (0, 0xFFFFFFFF, AR_UCODE32),
    4: (0, 0xFFFFFFFF, AR_UDATA32),
    5: (TSS, 0x67, AR_TSS_BUSY),
    6: (0, 0xFFFF, AR_CODE16),
    7: (0, 0xFFFFFFFF, AR_CONFORMING),
    8: (0, 0xFFFFFFFF, AR_KCODE64),
    9: (0, 0xFFFFFFFF, 0xC013),  # ring-0 data, not present
    10: (0, 0xFFFFFFFF, 0xC01B),  # ring-0 code, not present
    11: (0, 0xFFFFFFFF, 0xC091),  # ring-0 read-only data
    12: (0, 0x5FFF, 0x409B),  # ring-0 code, limit below HANDLER
    13: (0, 0x7FFF, 0x4093),  # ring-0 data, limit 0x7FFF
    14: (0, 0xFFFFFFFF, AR_UCODE64),
    15: (0, 0xFFFFFFFF, 0xC09A),  # ring-0 code, accessed bit clear
    16: (0, 0xFFFFFFFF, AR_KCODE32),  # a 32-bit code segment in IA-32e mode
    17: (0, 0xFFFFFFFF, 0xC0B3),  # ring-1 data
}
GDT_LIMIT = 18 * 8 - 1


def descriptor(base: int, limit: int, ar: int) -> bytes:
    """An 8-byte segment descriptor from a VMX access-rights value (SDM 3.4.5)."""
    if ar & 0x8000:
        limit >>= 12
    low = (limit & 0xFFFF) | (base & 0xFFFF) << 16
    high = (
        (base >> 16) & 0xFF
        | (ar & 0xFF) << 8
        | (limit & 0xF0000)
        | ((ar >> 12) & 0xF) << 20
        | (base & 0xFF000000)
    )
    return low.to_bytes(4, "little") + high.to_bytes(4, "little")


def segment(selector: int) -> Segment:
    base, limit, ar = GDT_ENTRIES[selector >> 3]
    return Segment(selector, base, limit, ar | 1)


def gate(selector: int, offset: int, gate_type: int = 14, dpl: int = 0, *, present: bool = True,
         ist: int = 0, s: int = 0) -> bytes:
    """An 8-byte legacy gate (SDM Figure 6-2)."""
    low = (offset & 0xFFFF) | selector << 16
    high = (offset & 0xFFFF0000) | int(present) << 15 | dpl << 13 | s << 12 | gate_type << 8 | ist
    return low.to_bytes(4, "little") + high.to_bytes(4, "little")


def gate64(selector: int, offset: int, gate_type: int = 14, dpl: int = 0, *,
           present: bool = True, ist: int = 0) -> bytes:
    """A 16-byte IA-32e gate (SDM Figure 6-8)."""
    return gate(selector, offset & 0xFFFFFFFF, gate_type, dpl, present=present, ist=ist) + (
        offset >> 32
    ).to_bytes(4, "little") + bytes(4)


def machine() -> FakeMemory:
    mem = FakeMemory()
    for index, (base, limit, ar) in GDT_ENTRIES.items():
        mem.load(GDT + index * 8, descriptor(base, limit, ar))
    return mem


RFLAGS0 = int(Rflags.FIXED | Rflags.CF | Rflags.IF | Rflags.TF | Rflags.NT | Rflags.RF)
RIP0 = 0x1234


def pm_state(cpl: int = 0) -> ArchState:
    """32-bit protected mode, flat segments at ``cpl``, a 32-bit TSS."""
    code, data = (KCODE, KDATA) if cpl == 0 else (UCODE, UDATA)
    segs = [segment(data) for _ in range(6)]
    segs[CS] = segment(code)
    segs += [Segment(0, 0, 0, 0x10000), segment(TSS_SEL)]
    return ArchState(
        rip=RIP0,
        rsp=KSTACK - 0x100 if cpl == 0 else USTACK,
        rflags=RFLAGS0,
        cr0=int(Cr0.PE | Cr0.ET),
        segments=segs,
        gdtr_base=GDT,
        gdtr_limit=GDT_LIMIT,
        idtr_base=IDT,
        idtr_limit=256 * 8 - 1,
    )


def lm_state(cpl: int = 0) -> ArchState:
    """64-bit mode at ``cpl`` with a 64-bit TSS."""
    st = pm_state(cpl)
    st.cr0 |= Cr0.PG
    st.cr4 = int(Cr4.PAE)
    st.efer = int(Efer.LME | Efer.LMA)
    st.segments[CS] = segment(KCODE64 if cpl == 0 else UCODE64)
    st.idtr_limit = 256 * 16 - 1
    st.rsp = 0x7FFF_FFFF_E008
    return st


def set_tss32(mem: FakeMemory, dpl: int, ss: int, esp: int) -> None:
    mem.put(TSS + 4 + 8 * dpl, esp, 4)
    mem.put(TSS + 8 + 8 * dpl, ss, 2)


def set_tss64(mem: FakeMemory, *, rsp: dict[int, int] | None = None,
              ist: dict[int, int] | None = None) -> None:
    for n, value in (rsp or {}).items():
        mem.put(TSS + 4 + 8 * n, value, 8)
    for n, value in (ist or {}).items():
        mem.put(TSS + 0x24 + 8 * (n - 1), value, 8)


def raises(st: ArchState, mem: FakeMemory, event: Event) -> X86Fault:
    with pytest.raises(X86Fault) as info:
        deliver(st, mem, event)
    return info.value


HW_GP = Event(13, T.HARD_EXCEPTION, 0x0)
EXT_INTR = Event(0x20, T.EXT_INTR)
INT_N = Event(0x80, T.SOFT_INTR, instruction_length=2)
INT3 = Event(3, T.SOFT_EXCEPTION, instruction_length=1)
INT1 = Event(1, T.PRIV_SW_EXCEPTION, instruction_length=1)


# --- Event ----------------------------------------------------------------------------------------
def test_6_13_ext_bit_is_clear_only_for_int_n_int3_into() -> None:
    assert [Event(1, t).ext for t in (T.EXT_INTR, T.NMI_INTR, T.HARD_EXCEPTION)] == [1, 1, 1]
    assert (INT_N.ext, INT3.ext, INT1.ext) == (0, 0, 1)


def test_event_rejects_values_outside_the_interruption_information_format() -> None:
    with pytest.raises(ValueError):
        Event(256, T.EXT_INTR)
    with pytest.raises(ValueError):
        Event(0, T.RESERVED)
    with pytest.raises(ValueError):
        Event(13, T.HARD_EXCEPTION, 1 << 32)


# --- real-address mode (SDM 20.1.4) ---------------------------------------------------------------
def real_state() -> ArchState:
    st = ArchState(rip=0x0100, rsp=0x0200, rflags=RFLAGS0 | int(Rflags.AC), idtr_limit=0x3FF)
    st.segments[CS] = Segment(0x1000, 0x10000, 0xFFFF, 0x9B)
    st.segments[SS] = Segment(0x2000, 0x20000, 0xFFFF, 0x93)
    return st


def test_20_1_4_real_mode_pushes_flags_cs_ip_and_jumps_through_the_ivt() -> None:
    mem, st = FakeMemory(), real_state()
    mem.put(4 * 0x21, 0x5678, 2)
    mem.put(4 * 0x21 + 2, 0x3000, 2)
    deliver(st, mem, Event(0x21, T.EXT_INTR))
    assert st.rsp == 0x01FA
    assert mem.values(0x20000 + 0x01FA, 2, 3) == [0x0100, 0x1000, RFLAGS0 & 0xFFFF]
    assert st.segments[CS] == Segment(0x3000, 0x30000, 0xFFFF, 0x9B)  # limit and AR kept
    assert st.rip == 0x5678
    # IF, TF, AC and RF cleared; everything else kept.
    assert st.rflags == RFLAGS0 & ~int(Rflags.IF | Rflags.TF | Rflags.RF)


def test_20_1_4_real_mode_ivt_is_at_idtr_base() -> None:
    mem, st = FakeMemory(), real_state()
    st.idtr_base = 0x7000
    mem.put(0x7000 + 4 * 8, 0x0042, 2)
    mem.put(0x7000 + 4 * 8 + 2, 0x0050, 2)
    deliver(st, mem, Event(8, T.HARD_EXCEPTION))
    assert (st.segments[CS].selector, st.segments[CS].base, st.rip) == (0x50, 0x500, 0x42)


def test_20_1_4_real_mode_sp_wraps_within_16_bits() -> None:
    mem, st = FakeMemory(), real_state()
    st.rsp = 0x1234_0000  # ESP[31:16] is not part of a 16-bit stack
    deliver(st, mem, Event(0x21, T.EXT_INTR))
    assert st.rsp == 0x1234_FFFA
    assert mem.values(0x20000 + 0xFFFA, 2, 3) == [0x0100, 0x1000, RFLAGS0 & 0xFFFF]


def test_20_1_4_real_mode_ivt_limit_check_is_gp_without_error_code() -> None:
    mem, st = FakeMemory(), real_state()
    st.idtr_limit = 4 * 0x21 + 2
    fault = raises(st, mem, Event(0x21, T.EXT_INTR))
    assert (fault.vector, fault.error_code) == (GP, None)


def test_20_1_4_real_mode_stack_without_room_is_ss_fault() -> None:
    mem, st = FakeMemory(), real_state()
    st.rsp = 1  # the first push would write offsets 0xFFFF..0x10000
    fault = raises(st, mem, Event(0x21, T.EXT_INTR))
    assert (fault.vector, fault.error_code) == (SS_, None)


def test_20_1_4_real_mode_pushes_no_error_code() -> None:
    mem, st = FakeMemory(), real_state()
    deliver(st, mem, Event(13, T.HARD_EXCEPTION, 0))
    assert st.rsp == 0x01FA


def test_27_6_1_1_real_mode_software_interrupt_pushes_ip_past_the_instruction() -> None:
    mem, st = FakeMemory(), real_state()
    st.rip = 0xFFFF  # IP wraps within 16 bits
    deliver(st, mem, Event(0x21, T.SOFT_INTR, instruction_length=2))
    assert mem.values(0x20000 + 0x01FA, 2, 1) == [0x0001]


# --- protected mode: the gate (SDM 6.10-6.12) -----------------------------------------------------
def test_6_10_gate_beyond_idt_limit_is_gp_vector_idt_ext() -> None:
    mem, st = machine(), pm_state()
    st.idtr_limit = 0x20 * 8 + 6
    assert raises(st, mem, EXT_INTR).error_code == 0x20 * 8 + 2 + 1
    assert raises(st, mem, Event(0x20, T.SOFT_INTR, instruction_length=2)).error_code == 0x102


def test_6_11_gate_of_another_type_is_gp_vector_idt_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER, gate_type=12))  # a call gate
    assert (raises(st, mem, EXT_INTR).vector, raises(st, mem, EXT_INTR).error_code) == (GP, 0x103)
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER, gate_type=14, s=1))  # not a system descriptor
    assert raises(st, mem, EXT_INTR).error_code == 0x103


def test_6_12_1_2_int_n_checks_gate_dpl_with_ext_clear() -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x80 * 8, gate(KCODE, HANDLER, dpl=0))
    mem.load(IDT + 3 * 8, gate(KCODE, HANDLER, dpl=0))
    fault = raises(st, mem, INT_N)
    assert (fault.vector, fault.error_code) == (GP, 0x80 * 8 + 2)
    assert raises(st, mem, INT3).error_code == 3 * 8 + 2


def test_6_12_1_2_gate_dpl_is_not_checked_for_hardware_events_and_int1() -> None:
    for event in (Event(0x80, T.EXT_INTR), Event(1, T.HARD_EXCEPTION), INT1,
                  Event(2, T.NMI_INTR)):
        mem, st = machine(), pm_state(cpl=3)
        set_tss32(mem, 0, KDATA, KSTACK)
        mem.load(IDT + event.vector * 8, gate(KCODE, HANDLER, dpl=0))
        deliver(st, mem, event)
        assert (st.cpl, st.rip) == (0, HANDLER)


def test_6_12_1_gate_not_present_is_np_vector_idt_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER, present=False))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (NP, 0x103)


def test_6_12_1_dpl_check_comes_before_the_present_check() -> None:
    mem, st = machine(), pm_state(cpl=3)
    mem.load(IDT + 0x80 * 8, gate(KCODE, HANDLER, dpl=0, present=False))
    assert raises(st, mem, INT_N).vector == GP


def test_task_gates_are_not_modelled_and_raise_gp_vector_idt_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(TSS_SEL, 0, gate_type=5))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, 0x103)


def test_6_12_1_null_code_selector_is_gp_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(0x0003, HANDLER))
    mem.load(IDT + 0x80 * 8, gate(0x0000, HANDLER, dpl=3))
    assert raises(st, mem, EXT_INTR).error_code == 1
    assert raises(st, mem, INT_N).error_code == 0


def test_6_12_1_code_selector_beyond_table_limit_is_gp_selector_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(0x0403, HANDLER))  # index 0x80, RPL 3
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, 0x0400 | 1)
    # An LDT selector with an unusable LDTR; TI stays in the error code.
    mem.load(IDT + 0x20 * 8, gate(0x000C, HANDLER))
    assert raises(st, mem, EXT_INTR).error_code == 0x000C | 1


def test_6_12_1_code_selector_in_the_ldt() -> None:
    mem, st = machine(), pm_state()
    mem.load(LDT + 8, descriptor(0, 0xFFFFFFFF, AR_KCODE32))
    st.segments[LDTR] = Segment(0x48, LDT, 0xF, 0x82)
    mem.load(IDT + 0x20 * 8, gate(0x000C, HANDLER))
    deliver(st, mem, EXT_INTR)
    assert st.segments[CS].selector == 0x000C


def test_6_12_1_target_not_a_code_segment_is_gp_selector_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KDATA, HANDLER))
    assert raises(st, mem, EXT_INTR).error_code == KDATA | 1
    mem.load(IDT + 0x20 * 8, gate(TSS_SEL, HANDLER))  # a system segment
    assert raises(st, mem, EXT_INTR).error_code == TSS_SEL | 1


def test_6_12_1_code_segment_dpl_above_cpl_is_gp_selector_ext() -> None:
    mem, st = machine(), pm_state(cpl=0)
    mem.load(IDT + 0x20 * 8, gate(UCODE, HANDLER))
    assert raises(st, mem, EXT_INTR).error_code == (UCODE & 0xFFFC) | 1


def test_6_12_1_code_segment_not_present_is_np_selector_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(CODE_NP, HANDLER))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (NP, CODE_NP | 1)


def test_6_12_1_handler_beyond_code_limit_is_gp_ext() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE_SMALL, HANDLER))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, 1)


# --- protected mode: same privilege (SDM 6.12.1, Figure 6-4) --------------------------------------
def test_6_12_1_same_privilege_32bit_interrupt_gate_frame() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 13 * 8, gate(KCODE, HANDLER))
    deliver(st, mem, Event(13, T.HARD_EXCEPTION, 0x1234))
    old_esp = KSTACK - 0x100
    assert st.rsp == old_esp - 16
    assert mem.values(st.rsp, 4, 4) == [0x1234, RIP0, KCODE, RFLAGS0]
    assert (st.segments[CS], st.rip) == (segment(KCODE), HANDLER)
    assert st.segments[SS] == segment(KDATA)
    # Interrupt gates clear IF; both clear TF, NT, RF and VM.
    assert st.rflags == int(Rflags.FIXED | Rflags.CF)


def test_6_12_1_3_trap_gate_keeps_if() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER, gate_type=15))
    deliver(st, mem, EXT_INTR)
    assert st.rflags == int(Rflags.FIXED | Rflags.CF | Rflags.IF)
    assert mem.values(st.rsp, 4, 3) == [RIP0, KCODE, RFLAGS0]


def test_6_12_1_16bit_gate_pushes_a_16bit_frame() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 13 * 8, gate(CODE16, 0xFFFF_0123, gate_type=6))  # offset 31:16 ignored
    deliver(st, mem, Event(13, T.HARD_EXCEPTION, 0xABCD))
    assert st.rsp == KSTACK - 0x100 - 8
    assert mem.values(st.rsp, 2, 4) == [0xABCD, RIP0, KCODE, RFLAGS0 & 0xFFFF]
    assert (st.segments[CS].selector, st.rip) == (CODE16, 0x0123)


def test_6_12_1_error_code_is_pushed_only_when_given() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 13 * 8, gate(KCODE, HANDLER))
    deliver(st, mem, Event(13, T.HARD_EXCEPTION, None))
    assert st.rsp == KSTACK - 0x100 - 12


def test_27_6_1_1_software_interrupt_pushes_rip_plus_instruction_length() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x80 * 8, gate(KCODE, HANDLER, dpl=3))
    deliver(st, mem, INT_N)
    assert mem.values(st.rsp, 4, 1) == [RIP0 + 2]
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    deliver(st, mem, Event(0x20, T.EXT_INTR, instruction_length=5))  # length ignored
    assert mem.values(st.rsp, 4, 1) == [RIP0]


def test_6_12_1_conforming_code_segment_keeps_the_cpl() -> None:
    mem, st = machine(), pm_state(cpl=3)
    mem.load(IDT + 0x20 * 8, gate(CONFORMING, HANDLER))
    deliver(st, mem, EXT_INTR)
    assert st.segments[CS].selector == CONFORMING | 3
    assert st.cpl == 3
    assert st.rsp == USTACK - 12
    assert mem.values(st.rsp, 4, 3) == [RIP0, UCODE, RFLAGS0]
    assert all(not supervisor for _, _, supervisor in mem.writes)  # pushes at CPL 3


def test_6_12_1_same_privilege_stack_without_room_is_ss_ext() -> None:
    mem, st = machine(), pm_state()
    st.segments[SS] = segment(KDATA_SMALL)
    st.rsp = 0x8004  # the top push would end at 0x8003 > limit 0x7FFF
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (SS_, 1)


def test_6_12_1_stack_room_is_checked_before_the_handler_limit() -> None:
    mem, st = machine(), pm_state()
    st.segments[SS] = segment(KDATA_SMALL)
    st.rsp = 0x8004
    mem.load(IDT + 0x20 * 8, gate(KCODE_SMALL, HANDLER))
    assert raises(st, mem, EXT_INTR).vector == SS_


def test_3_4_5_1_accessed_bit_is_set_in_the_loaded_descriptor() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(CODE_UNACCESSED, HANDLER))
    deliver(st, mem, EXT_INTR)
    assert mem.peek(GDT + (CODE_UNACCESSED >> 3) * 8 + 5, 1) == b"\x9b"
    assert st.segments[CS].ar == 0xC09B
    assert (GDT + (CODE_UNACCESSED >> 3) * 8 + 5, b"\x9b", True) in mem.writes


# --- protected mode: privilege change (SDM 6.12.1, Figure 6-4; INTER-PRIVILEGE-LEVEL-INTERRUPT) ---
def test_6_12_1_inter_privilege_switches_to_the_tss_stack() -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 14 * 8, gate(KCODE, HANDLER))
    deliver(st, mem, Event(14, T.HARD_EXCEPTION, 0x7))
    assert st.rsp == KSTACK - 24
    assert mem.values(st.rsp, 4, 6) == [0x7, RIP0, UCODE, RFLAGS0, USTACK, UDATA]
    assert st.segments[SS] == segment(KDATA)
    assert st.segments[CS] == segment(KCODE)
    assert (st.cpl, st.rip) == (0, HANDLER)
    assert all(supervisor for _, _, supervisor in mem.writes)  # pushes at the new CPL 0


def test_6_12_1_inter_privilege_to_ring_1_uses_ss1_esp1() -> None:
    mem, st = machine(), pm_state(cpl=3)
    mem.load(GDT + 18 * 8, descriptor(0, 0xFFFFFFFF, 0xC0BB))  # ring-1 code
    st.gdtr_limit = 19 * 8 - 1
    set_tss32(mem, 1, DATA1, 0x7800)
    mem.load(IDT + 0x20 * 8, gate(0x91, HANDLER))
    deliver(st, mem, EXT_INTR)
    assert (st.cpl, st.segments[CS].selector, st.segments[SS].selector) == (1, 0x91, DATA1)
    assert st.rsp == 0x7800 - 20


def test_6_12_1_16bit_gate_inter_privilege_frame() -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x20 * 8, gate(CODE16, 0x0123, gate_type=6))
    deliver(st, mem, EXT_INTR)
    assert st.rsp == KSTACK - 10
    assert mem.values(st.rsp, 2, 5) == [RIP0, UCODE, RFLAGS0 & 0xFFFF, USTACK & 0xFFFF, UDATA]


def test_6_12_1_16bit_tss_supplies_sp_and_ss() -> None:
    mem, st = machine(), pm_state(cpl=3)
    st.segments[TR] = Segment(TSS_SEL, TSS, 0x2B, 0x83)  # busy 16-bit TSS
    mem.put(TSS + 2, 0x7000, 2)  # SP0
    mem.put(TSS + 4, KDATA, 2)  # SS0
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    deliver(st, mem, EXT_INTR)
    assert (st.segments[SS].selector, st.rsp) == (KDATA, 0x7000 - 20)


def test_6_12_1_tss_limit_too_small_is_ts_tr_selector_ext() -> None:
    mem, st = machine(), pm_state(cpl=3)
    st.segments[TR] = Segment(TSS_SEL, TSS, 4 + 5 - 1, AR_TSS_BUSY)  # SS0 not inside
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (TS, TSS_SEL | 1)


def test_6_12_1_null_new_ss_is_ts_ext() -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, 0, KSTACK)
    mem.load(IDT + 0x80 * 8, gate(KCODE, HANDLER, dpl=3))
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    assert (raises(st, mem, EXT_INTR).vector, raises(st, mem, EXT_INTR).error_code) == (TS, 1)
    assert raises(st, mem, INT_N).error_code == 0


@pytest.mark.parametrize(
    ("ss", "vector"),
    [
        (0x0400, TS),  # beyond the GDT limit
        (KDATA | 3, TS),  # RPL != new CPL
        (DATA1 & ~3, TS),  # DPL != new CPL
        (KDATA_RO, TS),  # not writable
        (KCODE, TS),  # not a data segment
        (DATA_NP, SS_),  # not present
    ],
)
def test_6_12_1_new_ss_checks(ss: int, vector: int) -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, ss, KSTACK)
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (vector, (ss & 0xFFFC) | 1)


def test_6_12_1_new_stack_without_room_is_ss_new_ss_selector_ext() -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, KDATA_SMALL, 0x8004)
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (SS_, KDATA_SMALL | 1)


# --- virtual-8086 mode (SDM 20.3.1.1, 27.6.1.1) ---------------------------------------------------
def v86_state() -> ArchState:
    st = pm_state(cpl=3)
    st.rflags = RFLAGS0 | int(Rflags.VM)
    for i, sel in zip((ES, CS, SS, DS, FS, GS), (0x1111, 0x2222, 0x3333, 0x4444, 0x5555, 0x6666),
                      strict=True):
        st.segments[i] = Segment(sel, sel << 4, 0xFFFF, 0xF3)
    st.rsp = 0x0100
    return st


def test_20_3_1_1_interrupt_from_v86_pushes_gs_fs_ds_es_and_nulls_them() -> None:
    mem, st = machine(), v86_state()
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    deliver(st, mem, EXT_INTR)
    assert st.rsp == KSTACK - 36
    assert mem.values(st.rsp, 4, 9) == [
        RIP0, 0x2222, RFLAGS0 | int(Rflags.VM), 0x0100, 0x3333, 0x1111, 0x4444, 0x5555, 0x6666,
    ]
    for i in (ES, DS, FS, GS):
        assert st.segments[i].unusable and st.segments[i].selector == 0
    assert (st.cpl, st.rflags & Rflags.VM) == (0, 0)


def test_20_3_1_1_v86_handler_must_be_ring_0() -> None:
    mem, st = machine(), v86_state()
    mem.load(GDT + 18 * 8, descriptor(0, 0xFFFFFFFF, 0xC0BB))  # ring-1 code
    st.gdtr_limit = 19 * 8 - 1
    mem.load(IDT + 0x20 * 8, gate(0x90, HANDLER))
    assert raises(st, mem, EXT_INTR).error_code == 0x90 | 1
    mem.load(IDT + 0x20 * 8, gate(CONFORMING, HANDLER))  # same privilege from v86: refused
    assert raises(st, mem, EXT_INTR).error_code == CONFORMING | 1


def test_27_6_1_1_v86_software_interrupt_without_vme_ignores_iopl() -> None:
    mem, st = machine(), v86_state()  # IOPL = 0
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x80 * 8, gate(KCODE, HANDLER, dpl=3))
    deliver(st, mem, INT_N)
    assert st.rip == HANDLER


def vme_state(mem: FakeMemory, *, iopl: int, redirect_bit: bool, vif: bool = False) -> ArchState:
    st = v86_state()
    st.cr4 |= Cr4.VME
    st.rflags |= iopl << 12 | (int(Rflags.VIF) if vif else 0)
    st.segments[TR] = Segment(TSS_SEL, TSS, 0x68 + 32 + 8192, AR_TSS_BUSY)
    mem.put(TSS + 0x66, 0x68 + 32, 2)  # I/O map base; redirection bitmap just below
    mem.put(TSS + 0x68 + (0x80 >> 3), int(redirect_bit) << (0x80 & 7), 1)
    mem.put(4 * 0x80, 0x0042, 2)
    mem.put(4 * 0x80 + 2, 0x0777, 2)
    return st


def test_20_3_3_vme_redirects_a_software_interrupt_to_the_8086_handler() -> None:
    mem = machine()
    st = vme_state(mem, iopl=3, redirect_bit=False)
    flags = st.rflags
    deliver(st, mem, INT_N)
    assert (st.segments[CS].selector, st.segments[CS].base, st.rip) == (0x0777, 0x7770, 0x42)
    assert st.rsp == 0x0100 - 6
    assert mem.values(0x33330 + st.rsp, 2, 3) == [RIP0 + 2, 0x2222, flags & 0xFFFF]
    assert st.rflags == flags & ~int(Rflags.IF | Rflags.TF | Rflags.RF)


def test_20_3_3_vme_with_iopl_below_3_pushes_iopl_3_and_if_from_vif() -> None:
    mem = machine()
    st = vme_state(mem, iopl=0, redirect_bit=False, vif=True)
    st.rflags &= ~int(Rflags.IF)
    flags = st.rflags
    deliver(st, mem, INT_N)
    pushed = mem.values(0x33330 + st.rsp, 2, 3)[2]
    assert pushed == (flags & 0xFFFF) | 0x3000 | int(Rflags.IF)
    assert st.rflags == flags & ~int(Rflags.VIF | Rflags.TF | Rflags.RF)  # IF untouched


def test_20_3_3_vme_bit_set_goes_to_the_protected_mode_handler_only_with_iopl_3() -> None:
    mem = machine()
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x80 * 8, gate(KCODE, HANDLER, dpl=3))
    st = vme_state(mem, iopl=0, redirect_bit=True)
    fault = raises(st, mem, INT_N)
    assert (fault.vector, fault.error_code) == (GP, 0)
    st = vme_state(mem, iopl=3, redirect_bit=True)
    deliver(st, mem, INT_N)
    assert (st.cpl, st.rip) == (0, HANDLER)


# --- IA-32e mode (SDM 6.14) -----------------------------------------------------------------------
HANDLER64 = 0xFFFF_FFFF_8000_6000


def test_6_14_1_gate_beyond_idt_limit_uses_16_byte_entries() -> None:
    mem, st = machine(), lm_state()
    st.idtr_limit = 0x20 * 16 + 14
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, 0x103)


@pytest.mark.parametrize("gate_type", [5, 6, 7, 12])
def test_6_14_1_only_64bit_interrupt_and_trap_gates(gate_type: int) -> None:
    mem, st = machine(), lm_state()
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, HANDLER64, gate_type=gate_type))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, 0x103)


def test_6_14_1_target_must_be_a_64bit_code_segment() -> None:
    mem, st = machine(), lm_state()
    mem.load(IDT + 0x20 * 16, gate64(CODE32_IN_LM, HANDLER64))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, CODE32_IN_LM | 1)


def test_6_14_1_non_canonical_handler_is_gp_ext() -> None:
    mem, st = machine(), lm_state()
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, 0x0000_8000_0000_0000))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (GP, 1)


def test_6_14_1_canonical_with_la57_is_57_bits() -> None:
    mem, st = machine(), lm_state()
    st.cr4 |= Cr4.LA57
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, 0x0000_8000_0000_0000))
    deliver(st, mem, EXT_INTR)
    assert st.rip == 0x0000_8000_0000_0000


def test_6_14_2_same_privilege_always_pushes_ss_rsp_and_aligns_to_16() -> None:
    mem, st = machine(), lm_state()
    mem.load(IDT + 14 * 16, gate64(KCODE64, HANDLER64))
    deliver(st, mem, Event(14, T.HARD_EXCEPTION, 0x2))
    aligned = 0x7FFF_FFFF_E000
    assert st.rsp == aligned - 48
    assert mem.values(st.rsp, 8, 6) == [0x2, RIP0, KCODE64, RFLAGS0, 0x7FFF_FFFF_E008, KDATA]
    assert (st.segments[CS], st.segments[SS]) == (segment(KCODE64), segment(KDATA))
    assert st.rip == HANDLER64
    assert st.rflags == int(Rflags.FIXED | Rflags.CF)


def test_6_14_4_privilege_change_loads_rsp0_and_a_null_ss() -> None:
    mem, st = machine(), lm_state(cpl=3)
    set_tss64(mem, rsp={0: 0xFFFF_8000_0001_0008})
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, HANDLER64))
    old_rsp = st.rsp
    deliver(st, mem, EXT_INTR)
    assert st.rsp == 0xFFFF_8000_0001_0000 - 40
    assert mem.values(st.rsp, 8, 5) == [RIP0, UCODE64, RFLAGS0, old_rsp, UDATA]
    ss = st.segments[SS]
    assert (ss.selector, ss.unusable, ss.dpl, st.cpl) == (0, True, 0, 0)
    assert st.segments[CS].selector == KCODE64
    assert all(supervisor for _, _, supervisor in mem.writes)


def test_6_14_4_privilege_change_to_ring_1_gives_ss_rpl_1() -> None:
    mem, st = machine(), lm_state(cpl=3)
    mem.load(GDT + 18 * 8, descriptor(0, 0xFFFFFFFF, 0xA0BB))  # ring-1 64-bit code
    st.gdtr_limit = 19 * 8 - 1
    set_tss64(mem, rsp={1: 0x1_0000})
    mem.load(IDT + 0x20 * 16, gate64(0x91, HANDLER64))
    deliver(st, mem, EXT_INTR)
    assert (st.segments[SS].selector, st.cpl, st.segments[CS].selector) == (1, 1, 0x91)


def test_6_14_5_ist_stack_switch_aligns_rsp_to_16() -> None:
    mem, st = machine(), lm_state()
    set_tss64(mem, ist={3: 0x5_0008})
    mem.load(IDT + 2 * 16, gate64(KCODE64, HANDLER64, ist=3))
    old_rsp = st.rsp
    deliver(st, mem, Event(2, T.NMI_INTR))
    assert st.rsp == 0x5_0000 - 40
    assert mem.values(st.rsp, 8, 5) == [RIP0, KCODE64, RFLAGS0, old_rsp, KDATA]
    assert st.segments[SS] == segment(KDATA)  # no privilege change: SS unchanged


def test_6_14_5_ist_takes_precedence_over_rsp0_on_privilege_change() -> None:
    mem, st = machine(), lm_state(cpl=3)
    set_tss64(mem, rsp={0: 0x1_0000}, ist={7: 0x7_0000})
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, HANDLER64, ist=7))
    deliver(st, mem, EXT_INTR)
    assert st.rsp == 0x7_0000 - 40


def test_6_14_5_tss_entry_beyond_tss_limit_is_ts_tr_selector_ext() -> None:
    mem, st = machine(), lm_state()
    st.segments[TR] = Segment(TSS_SEL, TSS, 0x24 + 8 * 6 + 6, AR_TSS_BUSY)  # IST7 cut short
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, HANDLER64, ist=7))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (TS, TSS_SEL | 1)


def test_6_14_4_non_canonical_new_rsp_is_ss_ext() -> None:
    mem, st = machine(), lm_state(cpl=3)
    set_tss64(mem, rsp={0: 0x0000_8000_0000_0000})
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, HANDLER64))
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.error_code) == (SS_, 1)


def test_6_14_2_compatibility_mode_source_pushes_a_64bit_frame() -> None:
    mem, st = machine(), lm_state(cpl=3)
    st.segments[CS] = segment(UCODE)  # 32-bit code in IA-32e mode
    st.rsp = 0x9000
    set_tss64(mem, rsp={0: 0x1_0000})
    mem.load(IDT + 0x80 * 16, gate64(KCODE64, HANDLER64, dpl=3))
    deliver(st, mem, Event(0x80, T.SOFT_INTR, instruction_length=2))
    assert mem.values(st.rsp, 8, 5) == [RIP0 + 2, UCODE, RFLAGS0, 0x9000, UDATA]


def test_6_14_1_int_n_checks_gate_dpl() -> None:
    mem, st = machine(), lm_state(cpl=3)
    mem.load(IDT + 0x80 * 16, gate64(KCODE64, HANDLER64, dpl=0))
    fault = raises(st, mem, INT_N)
    assert (fault.vector, fault.error_code) == (GP, 0x80 * 8 + 2)


# --- faults from memory, and the state on a fault -------------------------------------------------
def test_page_fault_on_the_stack_propagates_with_its_address() -> None:
    mem, st = machine(), lm_state()
    mem.load(IDT + 0x20 * 16, gate64(KCODE64, HANDLER64))
    mem.pf_pages.add((0x7FFF_FFFF_E000 - 8) // PAGE)
    fault = raises(st, mem, EXT_INTR)
    assert (fault.vector, fault.cr2) == (PF, 0x7FFF_FFFF_E000 - 8)


def test_ept_violation_on_the_idt_propagates() -> None:
    mem, st = machine(), pm_state()
    mem.ept_pages.add(IDT // PAGE)
    with pytest.raises(EptViolation):
        deliver(st, mem, EXT_INTR)


def test_state_is_unchanged_when_delivery_faults() -> None:
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x20 * 8, gate(CODE_UNACCESSED, HANDLER))
    mem.pf_pages.add(GDT // PAGE)  # the accessed-bit write faults after the pushes
    mem.load(GDT + (CODE_UNACCESSED >> 3) * 8, descriptor(0, 0xFFFFFFFF, 0xC09A))
    before = dataclasses.replace(st, segments=[dataclasses.replace(s) for s in st.segments])
    with pytest.raises(X86Fault):
        deliver(st, mem, EXT_INTR)
    assert st == before


# --- double faults (SDM 6.15, Tables 6-4 and 6-5) -------------------------------------------------
def test_table_6_4_exception_classes() -> None:
    assert [v for v in range(32) if double_fault_class(v) == "contributory"] == [0, 10, 11, 12,
                                                                                   13, 21]
    assert [v for v in range(32) if double_fault_class(v) == "page_fault"] == [14, 20]
    assert double_fault_class(1) == double_fault_class(0x80) == "benign"


def hw(vector: int, code: int | None = None) -> Event:
    return Event(vector, T.HARD_EXCEPTION, code)


DOUBLE_FAULT = Event(8, T.HARD_EXCEPTION, 0)


def test_table_6_5_contributory_then_contributory_is_double_fault() -> None:
    assert escalate(hw(13, 0), X86Fault(11, 0x103)) == DOUBLE_FAULT
    assert escalate(hw(0), X86Fault(10, 0x29)) == DOUBLE_FAULT


def test_table_6_5_page_fault_then_page_fault_is_double_fault() -> None:
    assert escalate(hw(14, 2), page_fault(0x1000, 2)) == DOUBLE_FAULT


def test_table_6_5_page_fault_then_contributory_is_double_fault() -> None:
    assert escalate(hw(14, 2), X86Fault(13, 0x73)) == DOUBLE_FAULT


def test_table_6_5_contributory_then_page_fault_is_serial() -> None:
    assert escalate(hw(13, 0), page_fault(0x1000, 2)) == hw(14, 2)


def test_table_6_5_benign_first_is_always_serial() -> None:
    for first in (hw(6), hw(1), Event(2, T.NMI_INTR), Event(0x20, T.EXT_INTR),
                  Event(13, T.SOFT_INTR, instruction_length=2), Event(14, T.EXT_INTR)):
        assert escalate(first, X86Fault(13, 0x10)) == hw(13, 0x10)
        assert escalate(first, page_fault(0x2000, 0)) == hw(14, 0)


def test_6_15_fault_while_delivering_a_double_fault_is_shutdown() -> None:
    assert escalate(DOUBLE_FAULT, X86Fault(13, 0x43)) is None
    assert escalate(DOUBLE_FAULT, page_fault(0x2000, 0)) is None


def never(_: Event) -> bool:
    return False


def test_escalation_delivers_a_gate_fault_serially_with_its_error_code() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER, present=False))
    mem.load(IDT + 11 * 8, gate(KCODE, HANDLER + 0x100))
    assert deliver_with_escalation(st, mem, EXT_INTR, never) == Delivered()
    assert st.rip == HANDLER + 0x100
    assert mem.values(st.rsp, 4, 2) == [0x20 * 8 + 2 + 1, RIP0]


def test_escalation_contributory_during_gp_delivers_a_double_fault() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 13 * 8, gate(KCODE, HANDLER, present=False))
    mem.load(IDT + 8 * 8, gate(KCODE, HANDLER + 0x800))
    assert deliver_with_escalation(st, mem, hw(13, 0), never) == Delivered()
    assert st.rip == HANDLER + 0x800
    assert mem.values(st.rsp, 4, 2) == [0, RIP0]


def test_escalation_fault_while_delivering_double_fault_is_triple_fault() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 13 * 8, gate(KCODE, HANDLER, present=False))
    before = dataclasses.replace(st, segments=list(st.segments))
    outcome = deliver_with_escalation(st, mem, hw(13, 0), never)
    assert outcome == TripleFault(vectoring=DOUBLE_FAULT)
    assert isinstance(outcome, TripleFault) and [e.vector for e in outcome.chain] == [13, 8]  # #GP -> #DF -> shutdown
    assert st == before


def test_escalation_stack_page_fault_during_gp_is_serial_then_df_is_intercepted() -> None:
    """Table 6-5: a #PF during delivery of a #GP is handled serially; the #PF's own delivery
    faults on the same stack page, #PF then #PF is a #DF, and the #DF is intercepted: the exit
    reports #DF, and -- a #DF that causes the VM exit directly is not an exit during event
    delivery (SDM 28.2.4) -- no IDT-vectoring event."""
    mem, st = machine(), pm_state()
    mem.load(IDT + 13 * 8, gate(KCODE, HANDLER))
    mem.load(IDT + 14 * 8, gate(KCODE, HANDLER))
    stack_page = KSTACK - 0x100 - 4
    mem.pf_pages.add(stack_page // PAGE)
    seen: list[Event] = []

    def intercept_df(e: Event) -> bool:
        seen.append(e)
        return e.vector == DF

    outcome = deliver_with_escalation(st, mem, hw(13, 0x18), intercept_df)
    assert outcome == Intercepted(DOUBLE_FAULT, vectoring=None, loaded_cr2=stack_page)
    assert seen == [hw(14, 2), hw(14, 2), DOUBLE_FAULT]


def test_escalation_contributory_during_page_fault_with_df_intercepted_exits_for_df() -> None:
    """SDM 28.2.4: "the original event results in a double-fault exception that causes the VM
    exit directly" -- not an exit during event delivery: no IDT-vectoring event."""
    mem, st = machine(), pm_state()
    mem.load(IDT + 14 * 8, gate(KCODE, HANDLER, present=False))
    seen: list[Event] = []

    def intercept_df(e: Event) -> bool:
        seen.append(e)
        return e.vector == DF

    pf = hw(14, 2)
    outcome = deliver_with_escalation(st, mem, pf, intercept_df)
    assert outcome == Intercepted(DOUBLE_FAULT, vectoring=None)
    assert seen == [hw(11, 14 * 8 + 2 + 1), DOUBLE_FAULT]


def test_escalation_intercepted_page_fault_reports_its_address_without_loading_cr2() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    mem.pf_pages.add((KSTACK - 0x100 - 4) // PAGE)
    outcome = deliver_with_escalation(st, mem, EXT_INTR, lambda e: e.vector == PF)
    assert outcome == Intercepted(hw(14, 2), vectoring=EXT_INTR, cr2=KSTACK - 0x100 - 4)


def test_escalation_page_fault_delivered_reports_the_cr2_to_load() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER))
    mem.load(IDT + 14 * 8, gate(KCODE, HANDLER + 0x400))
    mem.pf_pages.add((KSTACK - 0x100 - 4) // PAGE)
    st.rsp = KSTACK - 0x100
    set_tss32(mem, 0, KDATA, KSTACK)
    # The #PF handler's frame lands on the same faulting page: #PF during #PF -> #DF -> shutdown.
    outcome = deliver_with_escalation(st, mem, EXT_INTR, never)
    assert outcome == TripleFault(vectoring=DOUBLE_FAULT, loaded_cr2=KSTACK - 0x100 - 4)
    # With a ring-3 source the #PF handler switches to a good ring-0 stack.
    mem, st = machine(), pm_state(cpl=3)
    set_tss32(mem, 0, KDATA, KSTACK)
    mem.load(IDT + 0x20 * 8, gate(UCODE, HANDLER))  # ring-3 handler: pushes on USTACK
    mem.load(IDT + 14 * 8, gate(KCODE, HANDLER + 0x400))
    mem.pf_pages.add((USTACK - 4) // PAGE)
    outcome = deliver_with_escalation(st, mem, EXT_INTR, never)
    assert outcome == Delivered(cr2=USTACK - 4)
    assert (st.cpl, st.rip) == (0, HANDLER + 0x400)
    assert mem.values(st.rsp, 4, 6) == [2, RIP0, UCODE, RFLAGS0, USTACK, UDATA]


def test_escalation_ept_violation_exits_with_the_event_being_delivered() -> None:
    mem, st = machine(), pm_state()
    mem.load(IDT + 0x20 * 8, gate(KCODE, HANDLER, present=False))
    mem.ept_pages.add((IDT + 11 * 8) // PAGE + 100)  # not hit
    mem.load(IDT + 11 * 8, gate(KCODE, HANDLER))
    mem.ept_pages.add((KSTACK - 0x100 - 4) // PAGE)
    outcome = deliver_with_escalation(st, mem, EXT_INTR, never)
    assert isinstance(outcome, EptExit)
    assert outcome.vectoring == hw(11, 0x103)
    assert outcome.fault.guest_physical == (KSTACK - 0x100 - 4) & ~0xFFF
