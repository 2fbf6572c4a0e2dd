"""Every exception the model raises itself (rather than Unicorn/QEMU) obeys the VMX rules: it
goes through the exception bitmap -- and, for #PF, the page-fault error-code mask/match -- like
any other exception (SDM 26.2), keeps its priority over the instruction's own VM exit (SDM
26.1.1), and a VM exit reports it as SDM 28.2.1, 28.2.2, 28.2.4 and 28.2.5 say: interruption
information, error code, qualification (#PF: the faulting address; #DB: the debug conditions),
IDT-vectoring information and instruction length.

The walk: each case runs once with its vector's bit of the exception bitmap set (a VM exit with
exactly that information) and once with it clear (delivered through the guest's IDT to a
recording handler, with the frame the SDM says).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pyvmx.arch.controls import InterruptionType
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import DR6_BS, Cr0, Cr4
from pyvmx.engine.unicorn_cpu import REG_CR2, REG_DR6
from pyvmx.guest.sandbox import VmxSandbox
from pyvmx.vmx.delivery import Event
from pyvmx.vmx.event_exits import idt_vectoring, interruption_info

from .guest_library import FRAME, guest_source

pytestmark = pytest.mark.machine

T = InterruptionType
UNMAPPED = 0x40000000  # PDPT entry 1 is not present in the sandbox's long-mode page tables
TF = 1 << 8


def _hw(vector: int, error_code: int | None = None) -> Event:
    return Event(vector, T.HARD_EXCEPTION, error_code)


def _no_rdtscp(sb: VmxSandbox) -> None:
    sb.clear_bits(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_RDTSCP)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.RDTSC_EXITING)  # the #UD comes before this exit


def _own_cr0_cd(sb: VmxSandbox) -> None:
    """CR0.CD host-owned (read shadow = the guest's value): MOV to CR0 is emulated, not exited."""
    sb.write(F.CR0_GUEST_HOST_MASK, int(Cr0.CD))
    sb.write(F.CR0_READ_SHADOW, sb.read(F.GUEST_CR0))


USER_CS, USER_SS = 0x30 | 3, 0x38 | 3
# IRETQ to CPL 3 (flat 64-bit code and data segments with DPL 3 at GDT 0x30 and 0x38).
TO_RING3 = f"""
    mov %rsp, %rax
    push ${USER_SS}
    push %rax
    pushf
    push ${USER_CS}
    lea 1f(%rip), %rax
    push %rax
    iretq
1:
"""


def _ring3(then: Callable[[VmxSandbox], None] = lambda sb: None) -> Callable[[VmxSandbox], None]:
    """Add the DPL-3 code and data segments TO_RING3 uses, then ``then``."""

    def setup(sb: VmxSandbox) -> None:
        gdt = sb.read(F.GUEST_GDTR_BASE)
        sb.write_memory(gdt + 0x30, struct.pack("<QQ", 0x00AFFA000000FFFF, 0x00CFF2000000FFFF))
        sb.write(F.GUEST_GDTR_LIMIT, 0x3F)
        then(sb)

    return setup


def _set_cr4(bits: int) -> Callable[[VmxSandbox], None]:
    return lambda sb: sb.write(F.GUEST_CR4, sb.read(F.GUEST_CR4) | bits)


def _gate_not_present(vector: int) -> Callable[[VmxSandbox], None]:
    def setup(sb: VmxSandbox) -> None:
        address = sb.symbol("idt") + 16 * vector + 5
        sb.write_memory(address, bytes([sb.read_memory(address, 1)[0] & 0x7F]))

    return setup


@dataclass(frozen=True)
class Case:
    """``main``: code run after the IDT is set up; label ``fault`` marks the instruction that
    raises ``event`` and ``after`` the next one."""

    name: str
    sdm: str
    main: str
    event: Event
    setup: Callable[[VmxSandbox], None] = field(default=lambda sb: None)
    trap: bool = False  # RIP is past the instruction (trap, or software exception)
    qualification: int = 0
    vectoring: Event | None = None  # the event being delivered when the exception occurred
    same_bad_stack: bool = False  # delivering it pushes onto the stack that faulted


CASES = [
    Case("RDTSCP with 'enable RDTSCP' = 0", "SDM 26.3, 26.1.1: #UD before the RDTSC-exiting exit",
         "fault: rdtscp\nafter: hlt", _hw(6), _no_rdtscp),
    Case("RDPID with 'enable RDTSCP' = 0", "SDM 26.3: RDPID #UD",
         "fault: rdpid %rax\nafter: hlt", _hw(6), _no_rdtscp),
    Case("INVPCID with 'enable INVPCID' = 0", "SDM 26.3: INVPCID #UD",
         "fault: invpcid (%rsp), %rax\nafter: hlt", _hw(6),
         lambda sb: sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INVLPG_EXITING)),
    Case("XSETBV with CR4.OSXSAVE = 0", "SDM 26.1.1: #UD has priority over the unconditional XSETBV exit",
         "xor %ecx, %ecx\nxor %eax, %eax\nxor %edx, %edx\nfault: xsetbv\nafter: hlt", _hw(6)),
    Case("MOV to CR4 setting a reserved bit", "SDM 2.5 / 26.3: #GP(0) from the emulated MOV to CR4",
         "mov %cr4, %rax\nbts $31, %rax\nfault: mov %rax, %cr4\nafter: hlt", _hw(13, 0)),
    Case("MOV to CR0 with PG = 1 and PE = 0", "SDM 26.3 (CR0 fixed bits), 2.5: #GP(0) from the emulated MOV to CR0",
         "mov %cr0, %rax\nbtr $0, %rax\nfault: mov %rax, %cr0\nafter: hlt", _hw(13, 0), _own_cr0_cd),
    Case("LMSW with a memory operand that faults", "SDM 26.1.1: operand-fetch faults before the LMSW exit",
         f"mov ${UNMAPPED:#x}, %rax\nfault: lmsw (%rax)\nafter: hlt", _hw(14, 0),
         lambda sb: (sb.write(F.CR0_GUEST_HOST_MASK, 0xF), sb.write(F.CR0_READ_SHADOW, 0)),
         qualification=UNMAPPED),
    Case("SMSW to a memory operand that faults", "SDM 26.3 (SMSW reads the shadow): its #PF",
         f"mov ${UNMAPPED + 8:#x}, %rax\nfault: smsw (%rax)\nafter: hlt", _hw(14, 2), _own_cr0_cd,
         qualification=UNMAPPED + 8),
    Case("SYSCALL with IA32_EFER.SCE = 0", "SDM Vol. 2B SYSCALL: #UD (engine/syscall.py)",
         "fault: syscall\nafter: hlt", _hw(6), lambda sb: sb.write(F.GUEST_IA32_EFER, sb.read(F.GUEST_IA32_EFER) & ~1)),
    Case("non-canonical data access", "SDM 3.3.7.1, 6.15: #GP(0) (engine/canonical.py)",
         "mov $0x8000000000000000, %rax\nfault: mov (%rax), %rbx\nafter: hlt", _hw(13, 0)),
    Case("non-canonical stack access", "SDM 3.3.7.1, 6.15: #SS(0) for a stack reference",
         "mov $0x8000000000000000, %rsp\nfault: push %rax\nafter: hlt", _hw(12, 0), same_bad_stack=True),
    Case("RDTSC at CPL 3 with CR4.TSD = 1", "SDM 26.1.1: the privilege #GP(0) before the RDTSC-exiting exit",
         TO_RING3 + "fault: rdtsc\nafter: hlt", _hw(13, 0),
         _ring3(lambda sb: (_set_cr4(int(Cr4.TSD))(sb), sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.RDTSC_EXITING)))),
    Case("RDPMC at CPL 3 with CR4.PCE = 0", "SDM 26.1.1: the privilege #GP(0) before the RDPMC-exiting exit",
         TO_RING3 + "xor %ecx, %ecx\nfault: rdpmc\nafter: hlt", _hw(13, 0),
         _ring3(lambda sb: sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.RDPMC_EXITING))),
    Case("XSETBV at CPL 3", "SDM 26.1.1: the privilege #GP(0) before the unconditional XSETBV exit",
         TO_RING3 + "xor %ecx, %ecx\nmov $3, %eax\nxor %edx, %edx\nfault: xsetbv\nafter: hlt", _hw(13, 0),
         _ring3(_set_cr4(int(Cr4.OSXSAVE)))),
    Case("HLT at CPL 3", "SDM 26.1.1: the privilege #GP(0) before the HLT-exiting exit",
         TO_RING3 + "fault: hlt\nafter: hlt", _hw(13, 0), _ring3()),
    Case("ICEBP (INT1)", "SDM 26.2, 28.2.2, 28.2.5: #DB as a privileged software exception, length 1",
         "fault: .byte 0xf1\nafter: hlt", Event(1, T.PRIV_SW_EXCEPTION, None, 1), trap=True),
    Case("RFLAGS.TF single step", "SDM 18.3.1.4, 28.2.1: #DB trap, qualification BS",
         "pushf\norq $0x100, (%rsp)\npopf\nfault: nop\nafter: hlt", _hw(1), trap=True, qualification=DR6_BS),
    Case("RFLAGS.TF single step over an emulated instruction", "SDM 18.3.1.4: the trap follows RDTSC run by the model",
         "pushf\norq $0x100, (%rsp)\npopf\nfault: rdtsc\nafter: hlt", _hw(1), trap=True, qualification=DR6_BS),
    Case("#NP delivering INT n through a not-present gate", "SDM 28.2.4, 28.2.5: IDT vectoring INT n and its length",
         "fault: int $0x40\nafter: hlt", _hw(11, 0x40 * 8 + 2), _gate_not_present(0x40),
         vectoring=Event(0x40, T.SOFT_INTR, None, 2)),
    Case("#PF delivering INT n onto an unmapped stack", "SDM 28.2.1, 28.2.4: qualification = the push's address",
         f"mov ${UNMAPPED + 0x100:#x}, %rsp\nfault: int $0x40\nafter: hlt", _hw(14, 2),
         qualification=UNMAPPED + 0x100 - 8, vectoring=Event(0x40, T.SOFT_INTR, None, 2), same_bad_stack=True),
]


def _guest(case: Case, intercept: bool) -> VmxSandbox:
    sb = VmxSandbox("long", guest_source("long_idt", "main:\n    cpuid\n" + case.main))
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    assert sb.run().exit_reason is ExitReason.CPUID  # the IDT is ready
    sb.skip_instruction()
    case.setup(sb)
    sb.write(F.EXCEPTION_BITMAP, 1 << case.event.vector if intercept else 0)
    return sb


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_model_exception_with_its_bitmap_bit_set_exits_with_the_sdm_information(case: Case) -> None:
    sb = _guest(case, intercept=True)
    dr6 = sb.executor.cpu.read(REG_DR6)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI, (case.sdm, exit)
    assert exit.intr_info == interruption_info(case.event), case.sdm
    assert exit.intr_error_code == (case.event.error_code or 0)
    assert exit.qualification == case.qualification, case.sdm
    assert (exit.idt_vectoring_info, exit.idt_vectoring_error_code) == idt_vectoring(case.vectoring), case.sdm
    software = case.event if case.event.type is T.PRIV_SW_EXCEPTION else case.vectoring
    assert exit.instruction_length == (software.instruction_length if software else 0), case.sdm
    # A software exception exits before it executes; a #DB trap after its instruction.
    assert sb.rip == sb.symbol("after" if case.trap and case.event.type is T.HARD_EXCEPTION else "fault")
    assert sb.executor.cpu.read(REG_DR6) == dr6  # a #DB exit does not load DR6 (SDM 28.1)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_model_exception_with_its_bitmap_bit_clear_is_delivered_through_the_idt(case: Case) -> None:
    sb = _guest(case, intercept=False)
    exit = sb.run()
    if case.same_bad_stack:
        # The exception's own delivery pushes onto the same bad stack: a second #PF (#SS) is a
        # #DF, and a fault delivering #DF is a triple fault (SDM 6.15, 26.2), not an exit during
        # event delivery (SDM 28.2.4).
        assert exit.exit_reason is ExitReason.TRIPLE_FAULT and exit.idt_vectoring_info == 0
        return
    assert exit.exit_reason is ExitReason.HLT and sb.rip == sb.symbol("handler_halt"), exit
    vector = struct.unpack_from("<Q", sb.read_memory(FRAME, 8))[0]
    assert vector == case.event.vector
    frame = struct.unpack_from("<2Q", sb.read_memory(FRAME + 16, 16))
    pushed_rip = frame[1] if case.event.error_code is not None else frame[0]
    if case.event.error_code is not None:
        assert frame[0] == case.event.error_code
    assert pushed_rip == sb.symbol("after" if case.trap else "fault"), case.sdm
    if case.event.vector == 14:
        assert struct.unpack_from("<Q", sb.read_memory(FRAME + 0x50, 8))[0] == case.qualification  # CR2
    if case.qualification and case.event.vector == 1:
        assert sb.executor.cpu.read(REG_DR6) & DR6_BS  # delivered: DR6.BS (SDM 17.2.3)


# --- faults while delivering an event, for each bitmap setting -----------------------------------------
GP_THROUGH_MISSING_GATE = Case(
    "#GP from the emulated MOV to CR4, its gate not present", "SDM 6.15 Table 6-5, 28.2.4",
    "mov %cr4, %rax\nbts $31, %rax\nfault: mov %rax, %cr4\nafter: hlt", _hw(13, 0), _gate_not_present(13),
)


@pytest.mark.parametrize(
    ("bitmap", "exit_event", "vectoring"),
    [
        (1 << 13, _hw(13, 0), None),  # the #GP itself exits: the original event, directly
        (1 << 11, _hw(11, 13 * 8 + 2 + 1), _hw(13, 0)),  # #NP(IDT, EXT) met delivering the #GP
        (1 << 8, _hw(8, 0), None),  # #GP then #NP is a #DF that exits directly: no vectoring
        ((1 << 11) | (1 << 8), _hw(11, 13 * 8 + 2 + 1), _hw(13, 0)),  # the #NP exits first
    ],
    ids=["GP", "NP", "DF", "NP+DF"],
)
def test_fault_delivering_a_model_exception_for_each_bitmap_setting(bitmap: int, exit_event: Event, vectoring: Event | None) -> None:
    """SDM 28.2.4: the IDT-vectoring information is valid for an exception met while delivering
    another, and invalid when "the original event results in a double-fault exception that
    causes the VM exit directly" or when the original event exits itself."""
    sb = _guest(GP_THROUGH_MISSING_GATE, intercept=False)
    sb.write(F.EXCEPTION_BITMAP, bitmap)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert (exit.intr_info, exit.intr_error_code) == (interruption_info(exit_event), exit_event.error_code)
    assert (exit.idt_vectoring_info, exit.idt_vectoring_error_code) == idt_vectoring(vectoring)
    assert exit.instruction_length == 0 and exit.qualification == 0
    assert sb.rip == sb.symbol("fault")


def test_double_fault_of_a_model_exception_is_delivered_when_not_intercepted() -> None:
    """SDM 6.15 Table 6-5: #NP while delivering #GP (both contributory) is a #DF(0)."""
    sb = _guest(GP_THROUGH_MISSING_GATE, intercept=False)
    assert sb.run().exit_reason is ExitReason.HLT
    assert struct.unpack_from("<Q", sb.read_memory(FRAME, 8))[0] == 8
    assert struct.unpack_from("<2Q", sb.read_memory(FRAME + 16, 16)) == (0, sb.symbol("fault"))  # error code 0, RIP


SMSW_FAULT = next(c for c in CASES if c.name.startswith("SMSW"))


@pytest.mark.parametrize(
    ("bit", "mask", "match", "exits"),
    [(1, 0, 0, True), (0, 0, 0, False), (1, 2, 2, True), (1, 2, 0, False), (0, 2, 0, True), (0, 2, 2, False)],
)
def test_model_page_fault_obeys_pfec_mask_and_match(bit: int, mask: int, match: int, exits: bool) -> None:
    """SDM 26.2: a #PF (here from the emulated SMSW, error code 2 = write, not present) exits
    when (error code AND PFEC_MASK) = PFEC_MATCH and bit 14 is 1, or when they differ and bit
    14 is 0."""
    sb = _guest(SMSW_FAULT, intercept=False)
    sb.write(F.EXCEPTION_BITMAP, bit << 14)
    sb.write(F.PAGE_FAULT_ERROR_CODE_MASK, mask)
    sb.write(F.PAGE_FAULT_ERROR_CODE_MATCH, match)
    exit = sb.run()
    if exits:
        assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.qualification == UNMAPPED + 8
    else:
        assert exit.exit_reason is ExitReason.HLT
        assert struct.unpack_from("<Q", sb.read_memory(FRAME, 8))[0] == 14


def test_ept_violation_delivering_int_n_saves_the_instruction_length() -> None:
    """SDM 28.2.4, 28.2.5: an EPT violation during delivery of a software interrupt records INT
    n as the IDT-vectoring event and its length as the VM-exit instruction length."""
    case = Case("INT n onto a stack EPT does not map", "", "mov $0x300100, %rsp\nfault: int $0x40\nafter: hlt", _hw(0))
    sb = _guest(case, intercept=False)
    sb.ept_unmap(0x300000, 0x1000)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION
    assert (exit.idt_vectoring_info, exit.idt_vectoring_error_code) == idt_vectoring(Event(0x40, T.SOFT_INTR, None, 2))
    assert exit.instruction_length == 2
    assert sb.rip == sb.symbol("fault")


def test_double_fault_exit_keeps_the_cr2_its_page_fault_loaded() -> None:
    """SDM 6.15, 28.2.4: INT n onto an unmapped stack: the #PF (not intercepted) loads CR2 and is
    delivered serially; its own push faults again -- #PF during #PF is a #DF, which exits
    directly (no IDT-vectoring information).  CR2 holds the faulting address delivery computed."""
    case = next(c for c in CASES if c.name.startswith("#PF delivering INT n"))
    sb = _guest(case, intercept=False)
    sb.write(F.EXCEPTION_BITMAP, 1 << 8)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert exit.intr_info == interruption_info(_hw(8, 0)) and exit.idt_vectoring_info == 0
    assert sb.executor.cpu.read(REG_CR2) == UNMAPPED + 0x100 - 8
