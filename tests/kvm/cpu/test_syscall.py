"""SYSCALL/SYSRET and SYSENTER/SYSEXIT, executed by the machine (pyvmx.engine.syscall) as the
SDM's pseudocode defines them (SDM Vol. 2B SYSCALL, SYSRET, SYSENTER, SYSEXIT: "Operation" and
the exception tables; SDM 5.8.7, 5.8.8). Unicorn runs only hooks for SYSCALL/SYSENTER, so
before this a SYSCALL fell through to the next instruction and no user space could run."""

from __future__ import annotations

import pytest

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.engine.syscall import FastCall, FastCallMsrs, execute
from pyvmx.kvm.exits import DebugExit, IoExit
from pyvmx.vmx.caps import canonical
from pyvmx.vmx.faults import X86Fault
from pyvmx.vmx.state import CS, SS, ArchState, Segment

from tests.kvm.cpu.ring3 import STOP_PORT, USER_STACK, ring3_guest
from tests.kvm.hv.guests import DEFAULT_LIMIT, u64

STAR = (0x23 << 48) | (0x10 << 32)  # Linux: __USER32_CS base for SYSRET, __KERNEL_CS for SYSCALL
LSTAR = 0xFFFFFFFF81000000
FMASK = 0x47700  # Linux: TF | DF | IF | IOPL | AC | NT
MSRS = FastCallMsrs(star=STAR, lstar=LSTAR, fmask=FMASK, sysenter_cs=0x10, sysenter_esp=0x9000, sysenter_eip=0x401000)
EFER_64 = (1 << 10) | (1 << 8) | 1  # LMA, LME, SCE
CODE64_CPL0 = Segment(0x10, 0, 0xFFFFFFFF, 0xA09B)
CODE64_CPL3 = Segment(0x33, 0, 0xFFFFFFFF, 0xA0FB)
COMPAT_CPL3 = Segment(0x23, 0, 0xFFFFFFFF, 0xC0FB)
DATA_CPL0 = Segment(0x18, 0, 0xFFFFFFFF, 0xC093)
DATA_CPL3 = Segment(0x2B, 0, 0xFFFFFFFF, 0xC0F3)


def _state(cs: Segment, ss: Segment, *, efer: int = EFER_64, cr0: int = 0x80000011, rflags: int = 0x246) -> ArchState:
    st = ArchState(rip=0x401000, rsp=0x7FF000, rflags=rflags, cr0=cr0, efer=efer)
    st.segments[CS] = cs
    st.segments[SS] = ss
    return st


def _run(kind: FastCall, st: ArchState, gprs: list[int] | None = None, opsize: int = 64,
         msrs: FastCallMsrs = MSRS) -> tuple[X86Fault | None, ArchState, list[int]]:
    regs = gprs or [0] * 16
    fault = execute(kind, st, regs, 2 if opsize != 64 else 3, opsize, msrs, canonical)
    return fault, st, regs


# --- the pseudocode, case by case ---------------------------------------------------------------
def test_syscall_from_user_64() -> None:
    """RCX <- RIP of the next instruction, R11 <- RFLAGS, RFLAGS &= ~FMASK, RIP <- LSTAR; CS =
    STAR[47:32] & FFFCH (type 11, L, DPL 0), SS = that + 8 (type 3, B, DPL 0): CPL 0."""
    fault, st, regs = _run(FastCall.SYSCALL, _state(CODE64_CPL3, DATA_CPL3, rflags=0x3646), opsize=32)
    assert fault is None
    assert regs[1] == 0x401002 and regs[11] == 0x3646
    assert st.rflags == 0x3646 & ~FMASK and st.rip == LSTAR
    assert st.segments[CS] == Segment(0x10, 0, 0xFFFFFFFF, 0xA09B)
    assert st.segments[SS] == Segment(0x18, 0, 0xFFFFFFFF, 0xC093)
    assert st.cpl == 0


@pytest.mark.parametrize(
    ("cs", "efer"),
    [(CODE64_CPL3, EFER_64 & ~1), (COMPAT_CPL3, EFER_64), (Segment(0x08, 0, 0xFFFFFFFF, 0xC09B), 1)],
    ids=["SCE=0", "compatibility-mode", "legacy-mode"],
)
def test_syscall_ud(cs: Segment, efer: int) -> None:
    """#UD if CS.L != 1, IA32_EFER.LMA != 1 or IA32_EFER.SCE != 1 (Intel: no SYSCALL outside
    64-bit mode); nothing changes."""
    st = _state(cs, DATA_CPL3, efer=efer)
    fault, after, regs = _run(FastCall.SYSCALL, st)
    assert fault == X86Fault(6) and after.rip == 0x401000 and regs == [0] * 16


def test_sysret_to_64_bit_user() -> None:
    """REX.W SYSRET: RIP <- RCX, RFLAGS <- (R11 & 3C7FD7H) | 2 (RF, VM, reserved bits
    cleared); CS = STAR[63:48] + 16 | 3 (L = 1), SS = STAR[63:48] + 8 | 3: CPL 3."""
    regs = [0] * 16
    regs[1], regs[11] = 0x402000, 0x3_0000 | 0x3246 | 0x28  # RF, VM, IOPL 3, reserved bits 3, 5
    fault, st, _ = _run(FastCall.SYSRET, _state(CODE64_CPL0, DATA_CPL0), regs)
    assert fault is None
    assert st.rip == 0x402000 and st.rflags == 0x3246
    assert st.segments[CS] == Segment(0x33, 0, 0xFFFFFFFF, 0xA0FB)
    assert st.segments[SS] == Segment(0x2B, 0, 0xFFFFFFFF, 0xC0F3)
    assert st.cpl == 3


def test_sysret_to_compatibility_mode() -> None:
    """SYSRET without REX.W: RIP <- ECX; CS = STAR[63:48] | 3 with D = 1, L = 0."""
    regs = [0] * 16
    regs[1], regs[11] = 0xDEAD00402000, 0x202
    fault, st, _ = _run(FastCall.SYSRET, _state(CODE64_CPL0, DATA_CPL0), regs, opsize=32)
    assert fault is None and st.rip == 0x402000
    assert st.segments[CS] == Segment(0x23, 0, 0xFFFFFFFF, 0xC0FB)
    assert not st.code64


def test_sysret_faults() -> None:
    """#UD outside 64-bit mode or with SCE = 0; #GP(0) at CPL 3; #GP(0) for a non-canonical
    RCX -- delivered at CPL 0, the instruction has not changed anything."""
    regs = [0] * 16
    regs[1] = 0x0000800000000000
    assert _run(FastCall.SYSRET, _state(CODE64_CPL0, DATA_CPL0, efer=EFER_64 & ~1), list(regs))[0] == X86Fault(6)
    assert _run(FastCall.SYSRET, _state(CODE64_CPL3, DATA_CPL3), list(regs))[0] == X86Fault(13, 0)
    fault, st, _ = _run(FastCall.SYSRET, _state(CODE64_CPL0, DATA_CPL0), list(regs))
    assert fault == X86Fault(13, 0) and st.cpl == 0 and st.rip == 0x401000
    assert _run(FastCall.SYSRET, _state(CODE64_CPL0, DATA_CPL0), list(regs), opsize=32)[0] is None  # ECX: canonical


def test_sysenter_and_sysexit_64() -> None:
    """SYSENTER in IA-32e mode: RSP/RIP <- SYSENTER_ESP/EIP, VM/IF/RF cleared, CS =
    SYSENTER_CS (L = 1), SS = CS + 8. REX.W SYSEXIT: RSP <- RCX, RIP <- RDX, CS = SYSENTER_CS
    + 32 | 3, SS = CS + 8."""
    fault, st, _ = _run(FastCall.SYSENTER, _state(CODE64_CPL3, DATA_CPL3, rflags=0x10246))
    assert fault is None and (st.rip, st.rsp, st.rflags) == (0x401000, 0x9000, 0x46)
    assert st.segments[CS] == CODE64_CPL0 and st.segments[SS] == DATA_CPL0
    regs = [0] * 16
    regs[1], regs[2] = 0x7FF000, 0x402000
    fault, st, _ = _run(FastCall.SYSEXIT, st, regs)
    assert fault is None and (st.rip, st.rsp) == (0x402000, 0x7FF000)
    assert st.segments[CS] == Segment(0x33, 0, 0xFFFFFFFF, 0xA0FB)
    assert st.segments[SS] == Segment(0x3B, 0, 0xFFFFFFFF, 0xC0F3)


def test_sysenter_sysexit_legacy_protected_mode() -> None:
    """Outside IA-32e mode: 32-bit CS (D = 1, L = 0) and the low 32 bits of ESP/EIP; SYSEXIT
    returns to SYSENTER_CS + 16 | 3 with ESP <- ECX, EIP <- EDX."""
    msrs = FastCallMsrs(sysenter_cs=0x08, sysenter_esp=0xFFFF_0000_0000_9000, sysenter_eip=0x1234_0040_1000)
    user = _state(Segment(0x1B, 0, 0xFFFFFFFF, 0xC0FB), Segment(0x23, 0, 0xFFFFFFFF, 0xC0F3), efer=0, cr0=0x11)
    fault, st, _ = _run(FastCall.SYSENTER, user, opsize=32, msrs=msrs)
    assert fault is None and (st.rip, st.rsp) == (0x401000, 0x9000)
    assert st.segments[CS] == Segment(0x08, 0, 0xFFFFFFFF, 0xC09B)
    regs = [0] * 16
    regs[1], regs[2] = 0x1_0000_8000, 0x1_0040_2000
    fault, st, _ = _run(FastCall.SYSEXIT, st, regs, opsize=32, msrs=msrs)
    assert fault is None and (st.rip, st.rsp) == (0x402000, 0x8000)
    assert st.segments[CS] == Segment(0x1B, 0, 0xFFFFFFFF, 0xC0FB)
    assert st.segments[SS] == Segment(0x23, 0, 0xFFFFFFFF, 0xC0F3)


def test_sysenter_sysexit_faults() -> None:
    """SYSENTER: #GP(0) in real mode or with SYSENTER_CS[15:2] = 0. SYSEXIT: #GP(0) with
    SYSENTER_CS[15:2] = 0, at CPL > 0, or (64-bit) a non-canonical RCX or RDX."""
    null_cs = FastCallMsrs(sysenter_cs=0x3)
    assert _run(FastCall.SYSENTER, _state(CODE64_CPL3, DATA_CPL3), msrs=null_cs)[0] == X86Fault(13, 0)
    real = _state(Segment(0, 0, 0xFFFF, 0x9B), Segment(0, 0, 0xFFFF, 0x93), efer=0, cr0=0x10)
    assert _run(FastCall.SYSENTER, real, opsize=16)[0] == X86Fault(13, 0)
    assert _run(FastCall.SYSEXIT, _state(CODE64_CPL0, DATA_CPL0), msrs=null_cs)[0] == X86Fault(13, 0)
    assert _run(FastCall.SYSEXIT, _state(CODE64_CPL3, DATA_CPL3))[0] == X86Fault(13, 0)
    regs = [0] * 16
    regs[2] = 0x8000_0000_0000_0000
    assert _run(FastCall.SYSEXIT, _state(CODE64_CPL0, DATA_CPL0), list(regs))[0] == X86Fault(13, 0)


# --- guests -----------------------------------------------------------------------------------
ROUND_TRIP = rf"""
    KGATE 13, gp_handler
    KERNEL_SETUP
    WRMSR64 0xC0000081, ${STAR:#x}   # STAR
    lea syscall_entry(%rip), %rax
    WRMSR64 0xC0000082, %rax          # LSTAR
    WRMSR64 0xC0000084, $0x47700      # FMASK: TF, DF, IF, IOPL, AC, NT
    lea user(%rip), %rcx
    mov $0x3602, %r11                 # user RFLAGS: IOPL 3 (for STOP), IF, DF
    mov ${USER_STACK}, %rsp
    sysretq
user:
    mov %cs, user_cs(%rip)
    mov %ss, user_ss(%rip)
    pushfq
    popq user_rflags(%rip)
    mov $1, %al
    STOP                               # stop 1: at CPL 3
    mov $7, %eax
    syscall
after_syscall:
    mov %rax, user_rax(%rip)
    mov $99, %eax
    syscall                            # the last call: the kernel ends the run
last_return:
    hlt
syscall_entry:
    mov %rcx, k_rcx(%rip)
    mov %r11, k_r11(%rip)
    mov %cs, k_cs(%rip)
    mov %ss, k_ss(%rip)
    pushfq
    popq k_rflags(%rip)
    cmp $99, %eax
    je done
    add $100, %rax                     # the "system call": rax + 100
    sysretq
done:
    EXIT_WITH $0x5A
    hlt
gp_handler:
    EXIT_WITH $0x0D
    hlt
    .align 8
user_cs: .quad 0
user_ss: .quad 0
user_rflags: .quad 0
user_rax: .quad 0
k_rcx: .quad 0
k_r11: .quad 0
k_cs: .quad 0
k_ss: .quad 0
k_rflags: .quad 0
"""


def test_ring3_round_trip_with_syscall_and_sysret() -> None:
    """The kernel sets STAR/LSTAR/FMASK, SYSRETs to user mode; user code (CPL 3: the VMCS saves
    CS 0x33 with L and DPL 3, SS 0x2B DPL 3, and the next VM entry accepts that state) makes a
    system call that returns rax + 100, then one that ends the run. In the kernel RCX is the
    return address, R11 the user RFLAGS, RFLAGS = R11 & ~FMASK."""
    vm, vcpu, img = ring3_guest(ROUND_TRIP)
    stop = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(stop, IoExit) and stop.port == STOP_PORT
    assert vcpu.vmcs_read(F.GUEST_CS_SELECTOR) == 0x33 and vcpu.vmcs_read(F.GUEST_CS_AR_BYTES) == 0xA0FB
    assert vcpu.vmcs_read(F.GUEST_SS_SELECTOR) == 0x2B and vcpu.vmcs_read(F.GUEST_SS_AR_BYTES) == 0xC0F3
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x5A)
    sym = img.symbol
    assert (u64(vm, sym("user_cs")), u64(vm, sym("user_ss"))) == (0x33, 0x2B)
    assert u64(vm, sym("user_rflags")) == 0x3602
    assert u64(vm, sym("user_rax")) == 107
    assert u64(vm, sym("k_rcx")) == sym("last_return")  # the second SYSCALL's next RIP
    assert (u64(vm, sym("k_cs")), u64(vm, sym("k_ss"))) == (0x10, 0x18)
    assert u64(vm, sym("k_r11")) & 0xFFFF == 0x3602 & 0xFFFF
    assert u64(vm, sym("k_rflags")) == 0x3602 & ~0x47700


SYSENTER_TRIP = rf"""
    KERNEL_SETUP
    WRMSR64 0x174, $0x10               # SYSENTER_CS
    WRMSR64 0x175, ${0x9000:#x}        # SYSENTER_ESP
    lea sysenter_entry(%rip), %rax
    WRMSR64 0x176, %rax                # SYSENTER_EIP
    lea user(%rip), %rdx
    mov ${USER_STACK}, %rcx
    sysexitq
user:
    mov %cs, user_cs(%rip)
    mov %rsp, user_rsp(%rip)
    sysenter
sysenter_entry:
    mov %cs, k_cs(%rip)
    mov %ss, k_ss(%rip)
    mov %rsp, k_rsp(%rip)
    EXIT_WITH $0x5E
    hlt
    .align 8
user_cs: .quad 0
user_rsp: .quad 0
k_cs: .quad 0
k_ss: .quad 0
k_rsp: .quad 0
"""


def test_ring3_round_trip_with_sysexit_and_sysenter() -> None:
    """REX.W SYSEXIT to user mode (CS = SYSENTER_CS + 32 | 3 = 0x33, RSP <- RCX, RIP <- RDX),
    SYSENTER back (CS = SYSENTER_CS, SS = + 8, RSP <- SYSENTER_ESP)."""
    vm, vcpu, img = ring3_guest(SYSENTER_TRIP)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x5E)
    sym = img.symbol
    assert (u64(vm, sym("user_cs")), u64(vm, sym("user_rsp"))) == (0x33, USER_STACK)
    assert (u64(vm, sym("k_cs")), u64(vm, sym("k_ss")), u64(vm, sym("k_rsp"))) == (0x10, 0x18, 0x9000)


FAULTS = rf"""
    KGATE 6, ud_handler
    KGATE 13, gp_handler
    KERNEL_SETUP
    WRMSR64 0xC0000081, ${STAR:#x}
    mov $0xC0000080, %ecx              # EFER.SCE = 0
    rdmsr
    and $~1, %eax
    wrmsr
ud_at:
    syscall                            # #UD
    mov $0xC0000080, %ecx
    rdmsr
    or $1, %eax
    wrmsr
    mov $0x0000800000000000, %rcx      # not canonical
gp_at:
    sysretq                            # #GP(0), at CPL 0
    EXIT_WITH $0x42
    hlt
ud_handler:
    lea ud_at(%rip), %rax
    cmp (%rsp), %rax
    jne bad
    incl ud_count(%rip)
    addq $2, (%rsp)
    iretq
gp_handler:
    mov (%rsp), %rax
    mov %rax, gp_error(%rip)
    mov 16(%rsp), %rax                 # CS of the interrupted code: CPL 0
    mov %rax, gp_cs(%rip)
    lea gp_at(%rip), %rax
    cmp 8(%rsp), %rax
    jne bad
    incl gp_count(%rip)
    add $8, %rsp
    addq $3, (%rsp)
    iretq
bad:
    EXIT_WITH $0xBD
    hlt
    .align 8
ud_count: .long 0
gp_count: .long 0
gp_error: .quad -1
gp_cs: .quad 0
"""


def test_syscall_without_sce_is_ud_and_sysret_to_noncanonical_is_gp_at_cpl0() -> None:
    """SYSCALL with IA32_EFER.SCE = 0 raises #UD at the SYSCALL; SYSRET with a non-canonical RCX
    raises #GP(0) at the SYSRET while still at CPL 0 (the handler sees the kernel CS)."""
    vm, vcpu, img = ring3_guest(FAULTS)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x42)
    sym = img.symbol
    assert u64(vm, sym("ud_count")) & 0xFFFFFFFF == 1
    assert u64(vm, sym("ud_count")) >> 32 == 1  # gp_count
    assert u64(vm, sym("gp_error")) == 0 and u64(vm, sym("gp_cs")) == 0x10


SINGLE_STEP = rf"""
    KGATE 1, db_handler
    KERNEL_SETUP
    WRMSR64 0x174, $0x10
    WRMSR64 0x175, ${0x9000:#x}
    lea sysenter_entry(%rip), %rax
    WRMSR64 0x176, %rax
    lea user(%rip), %rdx
    mov ${USER_STACK}, %rcx
    sysexitq
user:
    pushfq
    orq $0x100, (%rsp)
    popfq                              # TF = 1: the trap comes after the next instruction
    nop
after_nop:
    sysenter                           # TF stays set (SYSENTER clears VM, IF, RF only)
sysenter_entry:
    EXIT_WITH $0x5D
    hlt
db_handler:                            # RIP, CS, RFLAGS, RSP, SS
    mov count(%rip), %ecx
    lea log(%rip), %rdx
    mov (%rsp), %rax
    mov %rax, (%rdx,%rcx,8)
    incl count(%rip)
    andq $~0x100, 16(%rsp)             # stop stepping after the SYSENTER's trap
    mov 8(%rsp), %rax
    cmp $0x10, %eax
    je 1f
    orq $0x100, 16(%rsp)               # from user mode: keep stepping
1:  iretq
    .align 8
count: .long 0, 0
log: .quad 0, 0, 0, 0
"""


def test_single_step_trap_after_sysenter() -> None:
    """RFLAGS.TF set when SYSENTER begins: the single-step #DB follows it (SDM 18.3.1.4), taken
    at CPL 0 with RIP = IA32_SYSENTER_EIP -- the case Linux's exc_debug handles for 32-bit
    user space; the trap before it came after the NOP that followed POPF."""
    vm, vcpu, img = ring3_guest(SINGLE_STEP)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x5D)
    sym = img.symbol
    assert u64(vm, sym("count")) & 0xFFFFFFFF == 2
    assert [u64(vm, sym("log") + 8 * i) for i in range(2)] == [sym("after_nop"), sym("sysenter_entry")]
