"""Event injection end to end: the VM-entry interruption-information field delivers an event
through the guest's IVT (real mode) or IDT (long mode) before the first guest instruction, and
the handler -- a recording stub from the test-guest library -- shows the frame it got.

SDM references: 27.6 (event injection) and 27.6.1.1 (details: the pushed return address is RIP,
or RIP + VM-entry instruction length for software interrupts and exceptions; RF pushed as it
is; injection does not load CR2), 27.3.1.4-27.3.1.5 (checks on injection), 6.12.1 / 6.14.2
(stack frames, error codes; 64-bit mode aligns RSP to 16 bytes), 6.14.4 and 8.7 (RSP0 from the
TSS on a privilege change), 20.1.4 (real mode: FLAGS, CS, IP through the IVT), 6.15 Table 6-5
(#DF), 26.2 (triple fault), 28.2.4 (IDT-vectoring information), 28.2.1 Table 28-7.
"""

from __future__ import annotations

import struct

import pytest

from pyvmx.arch.controls import INTR_INFO_DELIVER_CODE_MASK, INTR_INFO_VALID_MASK, InterruptionType
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import GUEST_CODE, VmxSandbox

from .guest_library import FRAME, guest_source

pytestmark = pytest.mark.machine

IF = 1 << 9
RF = 1 << 16
T = InterruptionType


def _info(kind: InterruptionType, vector: int, error_code: bool = False) -> int:
    return INTR_INFO_VALID_MASK | (int(kind) << 8) | vector | (INTR_INFO_DELIVER_CODE_MASK if error_code else 0)


def _inject(sb: VmxSandbox, kind: InterruptionType, vector: int, error_code: int | None = None, length: int = 0) -> None:
    sb.write(F.VM_ENTRY_INTR_INFO_FIELD, _info(kind, vector, error_code is not None))
    sb.write(F.VM_ENTRY_EXCEPTION_ERROR_CODE, error_code or 0)
    sb.write(F.VM_ENTRY_INSTRUCTION_LEN, length)


# --- long mode ----------------------------------------------------------------------------------
LONG_MAIN = """
main:
    mov $0xdead000, %rax
    mov %rax, %cr2          # a CR2 value an injected #PF must leave alone
ready: cpuid                # exits: the hypervisor injects from here
next: nop
    ud2
after: hlt
"""


def _long_guest(**cpu_based: int) -> VmxSandbox:
    """Runs the IDT set-up and stops at `ready` (CPUID exit), RIP moved to `next`."""
    sb = VmxSandbox("long", guest_source("long_idt", LONG_MAIN))
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CPUID and sb.rip == sb.symbol("ready")
    sb.skip_instruction()
    return sb


def _frame(sb: VmxSandbox, count: int) -> list[int]:
    return list(struct.unpack_from(f"<{count}Q", sb.read_memory(FRAME + 16, 8 * count)))


def _recorded(sb: VmxSandbox) -> tuple[int, int]:
    vector, rsp = struct.unpack_from("<QQ", sb.read_memory(FRAME, 16))
    return vector, rsp


def test_long_mode_external_interrupt_frame_and_rsp_alignment() -> None:
    """An injected external interrupt goes through the 16-byte gate; RSP is aligned down to 16
    before the five pushes SS, RSP, RFLAGS, CS, RIP (SDM 6.14.2); RIP is the entry RIP."""
    sb = _long_guest()
    sb.write(F.GUEST_RSP, 0x7FF8)  # not 16-byte aligned
    sb.write(F.GUEST_RFLAGS, 0x2 | IF)  # an external interrupt needs IF = 1 (SDM 27.3.1.4)
    _inject(sb, T.EXT_INTR, 0x30)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT and sb.rip == sb.symbol("handler_halt")
    vector, rsp = _recorded(sb)
    assert vector == 0x30
    assert rsp == 0x7FF0 - 5 * 8
    assert _frame(sb, 5) == [sb.symbol("next"), 0x18, 0x2 | IF, 0x7FF8, 0x10]
    assert not sb.read(F.VM_ENTRY_INTR_INFO_FIELD) & INTR_INFO_VALID_MASK  # cleared (SDM 28.2.1)


def test_long_mode_hardware_exception_pushes_its_error_code() -> None:
    """#GP injected with "deliver error code": the error code is pushed last, below RIP."""
    sb = _long_guest()
    rflags = sb.read(F.GUEST_RFLAGS)
    _inject(sb, T.HARD_EXCEPTION, 13, error_code=0x1234)
    assert sb.run().exit_reason is ExitReason.HLT
    vector, rsp = _recorded(sb)
    assert vector == 13 and rsp == 0x8000 - 6 * 8
    assert _frame(sb, 6) == [0x1234, sb.symbol("next"), 0x18, rflags, 0x8000, 0x10]


def test_injected_fault_pushes_the_guests_rf() -> None:
    """SDM 27.6.1.1: an injected fault pushes RF as it is in the guest's RFLAGS (here 0) --
    the VMM decides (KVM sets RF itself when it injects a fault)."""
    sb = _long_guest()
    _inject(sb, T.HARD_EXCEPTION, 13, error_code=0)
    assert sb.run().exit_reason is ExitReason.HLT
    assert not _frame(sb, 4)[3] & RF


def test_injected_page_fault_leaves_cr2_alone() -> None:
    """SDM 27.6.1.1: injecting #PF does not load CR2; the handler sees the guest's own value."""
    sb = _long_guest()
    _inject(sb, T.HARD_EXCEPTION, 14, error_code=0x2)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded(sb)[0] == 14
    assert _frame(sb, 2) == [0x2, sb.symbol("next")]
    assert struct.unpack("<Q", sb.read_memory(FRAME + 0x50, 8))[0] == 0xDEAD000


def test_software_interrupt_returns_past_the_instruction() -> None:
    """INT n injected with VM-entry instruction length 2: the pushed RIP is RIP + 2."""
    sb = _long_guest()
    _inject(sb, T.SOFT_INTR, 0x80, length=2)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded(sb)[0] == 0x80
    assert _frame(sb, 1) == [sb.symbol("next") + 2]


def test_nmi_injection_blocks_nmis() -> None:
    """An injected NMI goes through vector 2 and leaves blocking by NMI set until IRET
    (SDM 27.6.1.2, 6.7.1): the next exit saves interruptibility bit 3."""
    sb = _long_guest()
    _inject(sb, T.NMI_INTR, 2)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded(sb)[0] == 2
    assert sb.read(F.GUEST_INTERRUPTIBILITY_INFO) & (1 << 3)


def test_event_from_cpl3_switches_to_rsp0() -> None:
    """From CPL 3 the handler (DPL 0 code) runs on RSP0 of the TSS, aligned to 16, and the
    frame holds the user SS:RSP (SDM 6.14.4, 8.7)."""
    sb = _long_guest()
    sb.set_segment("CS", 0x1B, 0, 0xFFFFFFFF, 0xA0FB)
    sb.set_segment("SS", 0x13, 0, 0xFFFFFFFF, 0xC0F3)
    sb.write(F.GUEST_RSP, 0x8ABC)
    sb.write(F.GUEST_RFLAGS, 0x2)
    _inject(sb, T.SOFT_INTR, 0x81, length=2)
    assert sb.run().exit_reason is ExitReason.HLT
    vector, rsp = _recorded(sb)
    assert vector == 0x81 and rsp == 0x7000 - 5 * 8
    assert _frame(sb, 5) == [sb.symbol("next") + 2, 0x1B, 0x2, 0x8ABC, 0x13]
    assert sb.read(F.GUEST_CS_SELECTOR) == 0x18 and sb.read(F.GUEST_SS_SELECTOR) == 0  # null SS, RPL 0


def test_guest_exception_not_in_the_bitmap_is_delivered_to_the_guest() -> None:
    """UD2 with exception-bitmap bit 6 clear: no VM exit, the guest's #UD handler runs with the
    faulting RIP and RF = 1 in the pushed RFLAGS (SDM 26.2, 18.3.1.1)."""
    sb = _long_guest()
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded(sb)[0] == 6
    rip, cs, rflags = _frame(sb, 3)
    assert rip == sb.symbol("next") + 1 and cs == 0x18 and rflags & RF


def _mark_not_present(sb: VmxSandbox, vector: int) -> None:
    gate = sb.symbol("idt") + 16 * vector
    sb.write_memory(gate + 5, bytes([sb.read_memory(gate + 5, 1)[0] & 0x7F]))


def test_fault_during_delivery_becomes_double_fault() -> None:
    """Injecting #GP whose gate is not present raises #NP(13*8+2+1) during delivery; a
    contributory fault while delivering a contributory one is a #DF with error code 0, pushed
    for the injected RIP (SDM 6.15 Table 6-5, 27.6.1.1)."""
    sb = _long_guest()
    _mark_not_present(sb, 13)
    _inject(sb, T.HARD_EXCEPTION, 13, error_code=0)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded(sb)[0] == 8
    assert _frame(sb, 2) == [0, sb.symbol("next")]


def test_fault_during_double_fault_is_a_triple_fault_exit() -> None:
    """With the #DF gate not present too, the fault while delivering #DF is a triple fault:
    VM exit reason 2 (SDM 26.2), with no IDT-vectoring information (SDM 28.2.4)."""
    sb = _long_guest()
    _mark_not_present(sb, 13)
    _mark_not_present(sb, 8)
    _inject(sb, T.HARD_EXCEPTION, 13, error_code=0)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.TRIPLE_FAULT
    assert exit.idt_vectoring_info == 0
    assert sb.rip == sb.symbol("next")


def test_nested_fault_in_the_exception_bitmap_exits_with_idt_vectoring_info() -> None:
    """The #NP met while delivering the injected #GP exits through the exception bitmap; the
    IDT-vectoring information describes the #GP being delivered (SDM 28.2.4)."""
    sb = _long_guest()
    _mark_not_present(sb, 13)
    sb.write(F.EXCEPTION_BITMAP, 1 << 11)
    _inject(sb, T.HARD_EXCEPTION, 13, error_code=0x55)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert exit.intr_info == _info(T.HARD_EXCEPTION, 11, error_code=True)
    assert exit.intr_error_code == 13 * 8 + 2 + 1  # IDT, EXT
    assert exit.idt_vectoring_info == _info(T.HARD_EXCEPTION, 13, error_code=True)
    assert exit.idt_vectoring_error_code == 0x55


def test_ept_violation_on_the_stack_during_delivery_records_the_event() -> None:
    """The first push of an injected interrupt hits a page EPT does not map: EPT violation
    (data write, linear address valid, access to its translation) at the push's exact address,
    IDT-vectoring information = the injected event; no guest state changed, so after mapping
    the page the hypervisor re-injects from the vectoring information and delivery completes
    (SDM 28.2.1 Table 28-7, 28.2.4; KVM's vmx_complete_interrupts)."""
    sb = _long_guest()
    sb.write(F.GUEST_RFLAGS, 0x2 | IF)
    sb.ept_unmap(0x7000, 0x1000)
    _inject(sb, T.EXT_INTR, 0x31)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert exit.qualification == 0b010 | (1 << 7) | (1 << 8)  # write; EPT entry not present
    assert exit.guest_physical_address == exit.guest_linear_address == 0x7FF8  # SS, pushed first
    assert exit.idt_vectoring_info == _info(T.EXT_INTR, 0x31)
    assert sb.rip == sb.symbol("next") and sb.read(F.GUEST_RSP) == 0x8000
    sb.ept_map(0x7000, 0x1000)
    sb.write(F.VM_ENTRY_INTR_INFO_FIELD, exit.idt_vectoring_info)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded(sb)[0] == 0x31


def test_ept_violation_reading_the_idt_records_the_event_and_its_error_code() -> None:
    """Reading the gate through an EPT-unmapped IDT page: a data-read EPT violation at the
    gate's address; the vectoring information keeps the #GP and its error code."""
    sb = _long_guest()
    gate = sb.symbol("idt") + 16 * 13
    sb.ept_unmap(gate & ~0xFFF, 0x1000)
    _inject(sb, T.HARD_EXCEPTION, 13, error_code=0x66)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert exit.qualification == 0b001 | (1 << 7) | (1 << 8)
    assert exit.guest_physical_address == gate
    assert exit.idt_vectoring_info == _info(T.HARD_EXCEPTION, 13, error_code=True)
    assert exit.idt_vectoring_error_code == 0x66


# --- real mode ------------------------------------------------------------------------------------
REAL_MAIN = """
main:
    mov $0x7000, %sp
ready: cpuid
next: nop
    xor %cl, %cl
divide: div %cl             # #DE
after: hlt
"""


def _real_guest() -> VmxSandbox:
    sb = VmxSandbox("real", guest_source("real_ivt", REAL_MAIN))
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CPUID and sb.rip == sb.symbol("ready")
    sb.skip_instruction()
    return sb


def _real_frame(sb: VmxSandbox) -> tuple[int, int, int, int, int]:
    return struct.unpack("<5H", sb.read_memory(FRAME, 10))  # vector, SP, IP, CS, FLAGS


def test_real_mode_external_interrupt_through_the_ivt() -> None:
    """Real mode: FLAGS, CS, IP pushed (6 bytes), CS:IP from the IVT entry, IF cleared in the
    handler (SDM 20.1.4)."""
    sb = _real_guest()
    sb.write(F.GUEST_RFLAGS, 0x2 | IF)
    _inject(sb, T.EXT_INTR, 0x21)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _real_frame(sb) == (0x21, 0x7000 - 6, sb.symbol("next"), GUEST_CODE >> 4, 0x2 | IF)
    assert not sb.read(F.GUEST_RFLAGS) & IF


def test_real_mode_software_interrupt_and_hardware_exception() -> None:
    """INT n injected with length 2 returns past it; a hardware exception in real mode pushes no
    error code (and may not be injected with one, SDM 27.3.1.4)."""
    sb = _real_guest()
    _inject(sb, T.SOFT_INTR, 0x22, length=2)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _real_frame(sb)[:3] == (0x22, 0x7000 - 6, sb.symbol("next") + 2)

    sb = _real_guest()
    _inject(sb, T.HARD_EXCEPTION, 13)
    assert sb.run().exit_reason is ExitReason.HLT
    assert _real_frame(sb)[:3] == (13, 0x7000 - 6, sb.symbol("next"))


def test_real_mode_guest_fault_goes_through_the_ivt() -> None:
    """DIV by zero raises #DE (a fault: IP of the DIV) through the guest's IVT (SDM 20.1.4)."""
    sb = _real_guest()
    assert sb.run().exit_reason is ExitReason.HLT
    assert _real_frame(sb)[:3] == (0, 0x7000 - 6, sb.symbol("divide"))
