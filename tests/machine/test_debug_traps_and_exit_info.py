"""Debug traps and the exit information that used to be approximate (SDM 28.2, 28.3.4).

* RFLAGS.TF single step: a #DB trap after the instruction with DR6.BS (SDM 18.3.1.4), held back
  by MOV SS (SDM 6.8.3); against the monitor trap flag the MTF VM exit wins and the trap is saved
  in the pending-debug-exceptions field (SDM 26.5.2, 28.3.4; kvm-unit-tests vmx_mtf_test), and a
  VM entry with that field set recognizes the #DB before the first instruction (SDM 27.7.3).
* MWAIT's exit qualification says whether MONITOR armed address-range monitoring (SDM 28.2.1).
* "NMI unblocking due to IRET" -- bit 12 of the VM-exit interruption information (SDM 28.2.2)
  and of the EPT-violation qualification (SDM 28.2.1, Table 28-7).
"""

from __future__ import annotations

import struct

import pytest

from pyvmx.arch.controls import INTR_INFO_UNBLOCK_NMI, PENDING_DBG_BS, GuestInterruptibility, InterruptionType
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import DR6_BS
from pyvmx.engine.unicorn_cpu import REG_DR6
from pyvmx.guest.sandbox import VmxSandbox
from pyvmx.vmx.delivery import Event
from pyvmx.vmx.event_exits import interruption_info

from .guest_library import FRAME, guest_source

pytestmark = pytest.mark.machine

TF = 1 << 8
DB = Event(1, InterruptionType.HARD_EXCEPTION)


def _guest(main: str) -> VmxSandbox:
    """The recording-IDT guest, stopped at the CPUID that starts ``main`` (RIP past it)."""
    sb = VmxSandbox("long", guest_source("long_idt", "main:\n    cpuid\n" + main))
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    assert sb.run().exit_reason is ExitReason.CPUID
    sb.skip_instruction()
    return sb


def _recorded_vector(sb: VmxSandbox) -> int:
    return int(struct.unpack_from("<Q", sb.read_memory(FRAME, 8))[0])


@pytest.mark.parametrize("insn", ["nop", "out %al, $0x80"], ids=["native", "emulated OUT"])
def test_mtf_exit_wins_over_a_single_step_trap_and_saves_it_pending(insn: str) -> None:
    """kvm-unit-tests vmx_mtf_test "Concurrent #DB trap and MTF on instruction boundary": with
    TF and MTF set, the instruction runs, the MTF VM exit happens with RIP past it and the
    pending-debug-exceptions field holds BS (SDM 26.5.2, 28.3.4); DR6 is not updated."""
    sb = _guest(f"step: {insn}\nafter: hlt")
    sb.write(F.EXCEPTION_BITMAP, 1 << 1)  # a #DB would exit: it must not happen
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | TF)
    dr6 = sb.executor.cpu.read(REG_DR6)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MONITOR_TRAP_FLAG
    assert sb.rip == sb.symbol("after")
    assert sb.read(F.GUEST_PENDING_DBG_EXCEPTIONS) == PENDING_DBG_BS
    assert sb.executor.cpu.read(REG_DR6) == dr6


def test_pending_single_step_is_recognized_right_after_vm_entry() -> None:
    """SDM 27.7.3: a VM entry with BS pending (no event injected, no MOV-SS blocking) recognizes
    the #DB before the first guest instruction; through the exception bitmap it exits with the
    conditions in the qualification and the field is saved as 0 (SDM 28.3.4)."""
    sb = _guest("step: nop\nafter: hlt")
    sb.write(F.EXCEPTION_BITMAP, 1 << 1)
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | TF)
    sb.write(F.GUEST_PENDING_DBG_EXCEPTIONS, PENDING_DBG_BS)
    rip = sb.rip
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert exit.intr_info == interruption_info(DB) and exit.qualification == DR6_BS
    assert sb.rip == rip
    assert sb.read(F.GUEST_PENDING_DBG_EXCEPTIONS) == 0


def test_pending_single_step_after_entry_is_delivered_with_dr6_bs() -> None:
    """SDM 27.7.3, 17.2.3: not intercepted, the pending #DB is delivered with DR6.BS = 1."""
    sb = _guest("step: nop\nafter: hlt")
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | TF)
    sb.write(F.GUEST_PENDING_DBG_EXCEPTIONS, PENDING_DBG_BS)
    rip = sb.rip
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded_vector(sb) == 1
    assert struct.unpack_from("<Q", sb.read_memory(FRAME + 16, 8))[0] == rip
    assert sb.executor.cpu.read(REG_DR6) & DR6_BS


def test_pending_single_step_after_entry_is_delivered_then_mtf() -> None:
    """SDM 26.5.2: with the monitor trap flag, a pending event delivered before an instruction
    can execute -- here the #DB that the MTF VM exit saved as pending -- is delivered, and the
    MTF VM exit is pending after its delivery, at the handler's first instruction (the MTF exit
    does not pre-empt it again: a debugger stepping with MTF would otherwise never let the
    guest's own single step happen; kvm-unit-tests vmx_mtf_test)."""
    sb = _guest("step: nop\nafter: hlt")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | TF)
    assert sb.run().exit_reason is ExitReason.MONITOR_TRAP_FLAG  # after `nop`, BS saved pending
    assert sb.rip == sb.symbol("after") and sb.read(F.GUEST_PENDING_DBG_EXCEPTIONS) == PENDING_DBG_BS
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MONITOR_TRAP_FLAG
    assert sb.rip == sb.symbol("stubs") + 32 * 1  # the #DB handler's first instruction
    assert sb.read(F.GUEST_PENDING_DBG_EXCEPTIONS) == 0


def test_single_step_trap_follows_syscall_that_clears_tf() -> None:
    """SDM 18.3.1.4: the single-step trap follows an instruction that started with TF = 1 --
    SYSCALL (run by engine/syscall.py) included, although IA32_FMASK clears TF: the #DB comes
    at the first instruction of the SYSCALL target."""
    sb = _guest("lea target(%rip), %rax\nmov %rax, %rdx\nshr $32, %rdx\nmov $0xc0000082, %ecx\nwrmsr\n"
                "mov $0x100, %eax\nxor %edx, %edx\nmov $0xc0000084, %ecx\nwrmsr\n"
                "pushf\norq $0x100, (%rsp)\npopf\nnop\nsyscall\nhlt\ntarget: nop\nhlt")
    sb.use_msr_bitmap()  # WRMSR of IA32_LSTAR / IA32_FMASK runs in the guest
    sb.write(F.EXCEPTION_BITMAP, 1 << 1)
    exit = sb.run()  # the trap after the NOP that follows POPF
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.qualification == DR6_BS
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.qualification == DR6_BS
    assert sb.rip == sb.symbol("target") and not sb.read(F.GUEST_RFLAGS) & TF


def test_mtf_follows_the_delivery_of_int1() -> None:
    """kvm-unit-tests vmx_mtf_test "Concurrent MTF and privileged software exception": MTF with
    ICEBP: the #DB is delivered and the MTF VM exit comes at the handler's first instruction."""
    sb = _guest(".byte 0xf1\nafter: hlt")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MONITOR_TRAP_FLAG
    assert sb.rip == sb.symbol("stubs") + 32 * 1


def test_mov_ss_holds_the_single_step_trap_until_after_the_next_instruction() -> None:
    """SDM 6.8.3: after MOV SS with TF = 1 the #DB trap waits one more instruction; it comes
    after `nop` with BS, and no trap is taken at the MOV SS boundary."""
    sb = _guest("mov %ss, %ax\nmovss: mov %ax, %ss\nnext: nop\nafter: hlt")
    sb.write(F.EXCEPTION_BITMAP, 1 << 1)
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | TF)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.qualification == DR6_BS
    assert sb.rip == sb.symbol("movss")
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.qualification == DR6_BS
    assert sb.rip == sb.symbol("after")


@pytest.mark.parametrize(
    ("main", "armed"),
    [
        ("lea mon(%rip), %rax\nxor %ecx, %ecx\nxor %edx, %edx\nmonitor\nwait: mwait\nhlt\nmon: .quad 0", 1),
        ("xor %eax, %eax\nxor %ecx, %ecx\nwait: mwait\nhlt", 0),
    ],
    ids=["after MONITOR", "no MONITOR"],
)
def test_mwait_qualification_reports_whether_monitor_armed_monitoring(main: str, armed: int) -> None:
    """SDM 28.2.1 Table 28-1: for MWAIT, bit 0 of the exit qualification is 1 if the
    address-range monitoring hardware was armed (by MONITOR)."""
    sb = _guest(main)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MWAIT_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MWAIT_INSTRUCTION and sb.rip == sb.symbol("wait")
    assert exit.qualification == armed


def test_vm_exit_between_monitor_and_mwait_disarms_monitoring() -> None:
    """SDM 28.5.6 / 27.3.4: VM exits and VM entries clear address-range monitoring."""
    sb = _guest("lea mon(%rip), %rax\nxor %ecx, %ecx\nxor %edx, %edx\nmonitor\ncpuid\nwait: mwait\nhlt\nmon: .quad 0")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MWAIT_EXITING)
    assert sb.run().exit_reason is ExitReason.CPUID
    sb.skip_instruction()
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MWAIT_INSTRUCTION and exit.qualification == 0


IRET_ON_BAD_STACK = "mov ${rsp:#x}, %rsp\nfault: iretq\nhlt"


@pytest.mark.parametrize("nmi_blocked", [True, False])
def test_fault_on_iret_that_unblocked_nmis_sets_bit_12(nmi_blocked: bool) -> None:
    """SDM 28.2.2: bit 12 of the VM-exit interruption information is 1 when the exit is due to a
    fault on IRET and blocking by NMI was in effect before it; the saved interruptibility no
    longer has blocking by NMI (the IRET removed it)."""
    sb = _guest(IRET_ON_BAD_STACK.format(rsp=0x40000100))  # not mapped by the guest: #PF
    sb.write(F.EXCEPTION_BITMAP, 1 << 14)
    if nmi_blocked:
        sb.write(F.GUEST_INTERRUPTIBILITY_INFO, int(GuestInterruptibility.NMI))
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.intr_info & 0xFF == 14
    assert bool(exit.intr_info & INTR_INFO_UNBLOCK_NMI) == nmi_blocked
    assert not sb.read(F.GUEST_INTERRUPTIBILITY_INFO) & GuestInterruptibility.NMI
    assert sb.rip == sb.symbol("fault")


@pytest.mark.parametrize("nmi_blocked", [True, False])
def test_ept_violation_on_iret_that_unblocked_nmis_sets_qualification_bit_12(nmi_blocked: bool) -> None:
    """SDM 28.2.1 Table 28-7: bit 12 of an EPT-violation qualification reports NMI unblocking
    due to IRET (not during event delivery)."""
    sb = _guest(IRET_ON_BAD_STACK.format(rsp=0x300100))
    sb.ept_unmap(0x300000, 0x1000)
    if nmi_blocked:
        sb.write(F.GUEST_INTERRUPTIBILITY_INFO, int(GuestInterruptibility.NMI))
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION and exit.guest_physical_address == 0x300100
    assert bool(exit.qualification & (1 << 12)) == nmi_blocked


# --- data breakpoints (DR0-DR3, SDM 18.2.4-18.2.5, 18.3.1.2) ------------------------------------------
def _data_breakpoint_guest(rw: int, access: str) -> VmxSandbox:
    """DR0 = `var`, DR7 enables it (L0) with R/W0 = ``rw`` and LEN0 = 8 bytes; then ``access``."""
    dr7 = 1 | rw << 16 | 2 << 18
    return _guest(f"lea var(%rip), %rax\nmov %rax, %dr0\nmov ${dr7:#x}, %rax\nmov %rax, %dr7\n"
                  f"nop\naccess: {access}\nafter: nop\nhlt\n.align 8\nvar: .quad 0")


@pytest.mark.parametrize(
    ("rw", "access", "hit"),
    [(1, "movq $5, var(%rip)", True), (1, "mov var(%rip), %rbx", False),
     (3, "mov var+4(%rip), %ebx", True), (3, "mov var+8(%rip), %ebx", False)],
    ids=["write-bp write", "write-bp read", "rw-bp read", "rw-bp next qword"],
)
def test_data_breakpoint_is_a_trap_after_the_access_with_its_b_bit(rw: int, access: str, hit: bool) -> None:
    """SDM 18.3.1.2: a data breakpoint is a trap after the instruction that accessed the range
    (R/W = 01: writes, 11: reads and writes; LEN aligns the range); through the exception bitmap
    the exit qualification reports B0 and DR6 is not loaded (SDM 28.2.1, 28.1)."""
    sb = _data_breakpoint_guest(rw, access)
    sb.write(F.EXCEPTION_BITMAP, 1 << 1)
    exit = sb.run()
    if not hit:
        assert exit.exit_reason is ExitReason.HLT
        return
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.intr_info == interruption_info(DB)
    assert exit.qualification == 1 and sb.rip == sb.symbol("after")
    assert not sb.executor.cpu.read(REG_DR6) & 0xF


def test_data_breakpoint_delivered_sets_dr6_b0() -> None:
    """SDM 17.2.3, 18.3.1.2: delivered, the #DB trap finds DR6.B0 set and RIP past the store."""
    sb = _data_breakpoint_guest(1, "movq $5, var(%rip)")
    assert sb.run().exit_reason is ExitReason.HLT
    assert _recorded_vector(sb) == 1
    assert struct.unpack_from("<Q", sb.read_memory(FRAME + 16, 8))[0] == sb.symbol("after")
    assert sb.executor.cpu.read(REG_DR6) & 1


def test_mtf_exit_saves_a_pending_data_breakpoint() -> None:
    """SDM 26.5.2, 28.3.4: an MTF VM exit that meets a data-breakpoint trap saves B0 and bit 12
    (an enabled breakpoint) as pending debug exceptions; the next VM entry recognizes the #DB
    before any instruction (SDM 27.7.3)."""
    sb = _data_breakpoint_guest(1, "movq $5, var(%rip)")
    sb.write(F.EXCEPTION_BITMAP, 1 << 1)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
    while True:
        exit = sb.run()
        assert exit.exit_reason is ExitReason.MONITOR_TRAP_FLAG
        if sb.rip == sb.symbol("after"):
            break
    assert sb.read(F.GUEST_PENDING_DBG_EXCEPTIONS) == 0x1001
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.qualification == 1
    assert sb.rip == sb.symbol("after") and sb.read(F.GUEST_PENDING_DBG_EXCEPTIONS) == 0
