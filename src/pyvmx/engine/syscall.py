"""The fast system calls -- SYSCALL, SYSRET, SYSENTER, SYSEXIT -- as the SDM's pseudocode
defines them (SDM Vol. 2B, each instruction's "Operation" and exception tables).

Unicorn does not execute SYSCALL and SYSENTER: it calls the UC_HOOK_INSN hooks registered for
them and steps over the instruction. Its SYSRET is AMD's (no #UD outside 64-bit mode, no #GP
for a non-canonical RCX, RF and VM loaded from R11), its SYSEXIT checks only SYSENTER_CS = 0.
So the machine executes all four itself: the executor hooks them like any instruction it must
see (:mod:`pyvmx.vmx.decode`) and calls :func:`run_fast_call`.

:func:`execute` is the pseudocode on plain state -- :class:`~pyvmx.vmx.state.ArchState`, the
16 GPRs and the MSRs it reads -- returning the fault to raise (#UD, #GP(0)) or None with the
state updated. The flat segment caches the instructions load are fixed values, not descriptors
read from the GDT (SDM Vol. 2B SYSCALL: "the processor does not ensure that the descriptors
are consistent"). None of the four causes a VM exit by itself (SDM 26.1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pyvmx.engine.unicorn_cpu import GPR_IDS, UnicornCpu
from pyvmx.vmx import decode as dec
from pyvmx.vmx.faults import X86Fault
from pyvmx.vmx.state import CS, SS, ArchState, Segment

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_SYSCALL_MASK = 0xC0000084  # IA32_FMASK

EFER_SCE = 1 << 0
CR0_PE = 1 << 0
RFLAGS_FIXED = 1 << 1
RFLAGS_IF = 1 << 9
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
SYSRET_RFLAGS_MASK = 0x3C7FD7  # SYSRET: "Clear RF, VM, reserved bits; set bit 1"

RCX, RDX, RSP, R11 = 1, 2, 4, 11
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

# Access rights (VMX format, SDM 25.4.1) of the flat segments the instructions load: G = 1 with
# limit FFFFFH (a cached limit of FFFFFFFFH), P = 1, S = 1; code type 11 (execute/read,
# accessed), data type 3 (read/write, accessed).
_G, _DB, _L, _P, _S = 1 << 15, 1 << 14, 1 << 13, 1 << 7, 1 << 4
_CODE64 = _G | _L | _P | _S | 11
_CODE32 = _G | _DB | _P | _S | 11
_STACK = _G | _DB | _P | _S | 3
FLAT_LIMIT = 0xFFFFFFFF


class FastCall(enum.Enum):
    SYSCALL = enum.auto()
    SYSRET = enum.auto()
    SYSENTER = enum.auto()
    SYSEXIT = enum.auto()


KIND_OF: dict[dec.InsnKind, FastCall] = {
    dec.InsnKind.SYSCALL: FastCall.SYSCALL,
    dec.InsnKind.SYSRET: FastCall.SYSRET,
    dec.InsnKind.SYSENTER: FastCall.SYSENTER,
    dec.InsnKind.SYSEXIT: FastCall.SYSEXIT,
}


@dataclass(frozen=True, slots=True)
class FastCallMsrs:
    """The MSRs the four instructions read (SDM 5.8.7, 5.8.8)."""

    star: int = 0
    lstar: int = 0
    fmask: int = 0
    sysenter_cs: int = 0
    sysenter_esp: int = 0
    sysenter_eip: int = 0


def _flat(selector: int, dpl: int, ar: int) -> Segment:
    return Segment(selector & 0xFFFF, 0, FLAT_LIMIT, ar | dpl << 5)


def _ud() -> X86Fault:
    return X86Fault(6)


def _gp0() -> X86Fault:
    return X86Fault(13, 0)


def execute(
    kind: FastCall,
    st: ArchState,
    gprs: list[int],
    length: int,
    operand_size: int,
    msrs: FastCallMsrs,
    canonical: Callable[[int], bool],
) -> X86Fault | None:
    """Execute one instruction of ``kind`` (``length`` bytes at ``st.rip``, ``operand_size`` 64
    with REX.W) on ``st`` and ``gprs``: the fault it raises (nothing changed), or None with RIP,
    RSP, RFLAGS, CS, SS and the GPRs it writes updated."""
    if kind is FastCall.SYSCALL:
        return _syscall(st, gprs, length, msrs)
    if kind is FastCall.SYSRET:
        return _sysret(st, gprs, operand_size, msrs, canonical)
    if kind is FastCall.SYSENTER:
        return _sysenter(st, msrs)
    return _sysexit(st, gprs, operand_size, msrs, canonical)


def _syscall(st: ArchState, gprs: list[int], length: int, msrs: FastCallMsrs) -> X86Fault | None:
    """SYSCALL: #UD unless 64-bit mode with IA32_EFER.SCE = 1 (Intel has no SYSCALL in
    compatibility or legacy mode); RCX <- next RIP, R11 <- RFLAGS, RFLAGS &= ~IA32_FMASK, RIP <-
    IA32_LSTAR, CS <- STAR[47:32] & FFFCH and SS <- STAR[47:32] + 8 at CPL 0. RF is cleared as
    after any instruction that completes (SDM 18.3.1.1)."""
    if not st.code64 or not st.efer & EFER_SCE:
        return _ud()
    gprs[RCX] = (st.rip + length) & _U64
    gprs[R11] = st.rflags
    st.rflags = (st.rflags & ~msrs.fmask & ~RFLAGS_RF) | RFLAGS_FIXED
    st.rip = msrs.lstar
    selector = (msrs.star >> 32) & 0xFFFF
    st.segments[CS] = _flat(selector & 0xFFFC, 0, _CODE64)
    st.segments[SS] = _flat(selector + 8, 0, _STACK)
    return None


def _sysret(
    st: ArchState, gprs: list[int], operand_size: int, msrs: FastCallMsrs, canonical: Callable[[int], bool]
) -> X86Fault | None:
    """SYSRET: #UD unless 64-bit mode with SCE = 1; #GP(0) at CPL > 0 and, returning to 64-bit
    mode, for a non-canonical RCX (raised at CPL 0). RFLAGS <- (R11 & 3C7FD7H) | 2; CS <-
    STAR[63:48] + 16 (64-bit, L = 1) or STAR[63:48] (compatibility mode, D = 1), RPL 3; SS <-
    STAR[63:48] + 8, RPL 3; CPL 3."""
    if not st.code64 or not st.efer & EFER_SCE:
        return _ud()
    if st.cpl != 0:
        return _gp0()
    base = (msrs.star >> 48) & 0xFFFF
    if operand_size == 64:
        if not canonical(gprs[RCX]):
            return _gp0()
        st.rip = gprs[RCX]
        st.segments[CS] = _flat((base + 16) | 3, 3, _CODE64)
    else:
        st.rip = gprs[RCX] & _U32
        st.segments[CS] = _flat(base | 3, 3, _CODE32)
    st.rflags = (gprs[R11] & SYSRET_RFLAGS_MASK) | RFLAGS_FIXED
    st.segments[SS] = _flat((base + 8) | 3, 3, _STACK)
    return None


def _sysenter(st: ArchState, msrs: FastCallMsrs) -> X86Fault | None:
    """SYSENTER: #GP(0) in real mode or with IA32_SYSENTER_CS[15:2] = 0; clears VM, IF and RF;
    RSP/RIP <- IA32_SYSENTER_ESP/EIP (their low 32 bits outside IA-32e mode); CS <-
    SYSENTER_CS & FFFCH (64-bit in IA-32e mode, else 32-bit), SS <- CS + 8; CPL 0."""
    if not st.cr0 & CR0_PE or not msrs.sysenter_cs & 0xFFFC:
        return _gp0()
    ia32e = st.long_mode
    mask = _U64 if ia32e else _U32
    st.rflags &= ~(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF)
    st.rsp = msrs.sysenter_esp & mask
    st.rip = msrs.sysenter_eip & mask
    selector = msrs.sysenter_cs & 0xFFFC
    st.segments[CS] = _flat(selector, 0, _CODE64 if ia32e else _CODE32)
    st.segments[SS] = _flat(selector + 8, 0, _STACK)
    return None


def _sysexit(
    st: ArchState, gprs: list[int], operand_size: int, msrs: FastCallMsrs, canonical: Callable[[int], bool]
) -> X86Fault | None:
    """SYSEXIT: #GP(0) with IA32_SYSENTER_CS[15:2] = 0, in real mode or at CPL > 0, and (to
    64-bit mode) for a non-canonical RCX or RDX. RSP <- RCX, RIP <- RDX (32-bit: ECX, EDX); CS
    <- SYSENTER_CS + 32 (64-bit, L = 1) or + 16 (32-bit, D = 1), RPL 3; SS <- CS + 8; CPL 3."""
    if not msrs.sysenter_cs & 0xFFFC or not st.cr0 & CR0_PE or st.cpl != 0:
        return _gp0()
    if operand_size == 64:
        if not canonical(gprs[RCX]) or not canonical(gprs[RDX]):
            return _gp0()
        st.rsp, st.rip = gprs[RCX], gprs[RDX]
        selector = ((msrs.sysenter_cs & 0xFFFF) + 32) | 3
        st.segments[CS] = _flat(selector, 3, _CODE64)
    else:
        st.rsp, st.rip = gprs[RCX] & _U32, gprs[RDX] & _U32
        selector = ((msrs.sysenter_cs & 0xFFFF) + 16) | 3
        st.segments[CS] = _flat(selector, 3, _CODE32)
    st.rflags &= ~RFLAGS_RF
    st.segments[SS] = _flat(selector + 8, 3, _STACK)
    return None


# --- on the engine -----------------------------------------------------------------------------
def read_msrs(cpu: UnicornCpu) -> FastCallMsrs:
    return FastCallMsrs(
        star=cpu.read_msr(MSR_STAR),
        lstar=cpu.read_msr(MSR_LSTAR),
        fmask=cpu.read_msr(MSR_SYSCALL_MASK),
        sysenter_cs=cpu.read_msr(MSR_IA32_SYSENTER_CS),
        sysenter_esp=cpu.read_msr(MSR_IA32_SYSENTER_ESP),
        sysenter_eip=cpu.read_msr(MSR_IA32_SYSENTER_EIP),
    )


def run_fast_call(cpu: UnicornCpu, insn: dec.DecodedInsn, canonical: Callable[[int], bool]) -> X86Fault | None:
    """Execute the fast system call ``insn`` (at the core's RIP) on the core: the fault to
    deliver, or None once it has retired (the caller counts it)."""
    assert insn.kind is not None
    st = cpu.save_state()
    gprs = cpu.read_gprs()
    before = list(gprs)
    fault = execute(KIND_OF[insn.kind], st, gprs, insn.length, insn.operand_size, read_msrs(cpu), canonical)
    if fault is not None:
        return fault
    st.interrupt_shadow = False
    cpu.load_state(st, flush_tlb=False)  # CPL selects the TLB (QEMU's MMU index)
    for index, (old, new) in enumerate(zip(before, gprs)):
        if old != new and index != RSP:
            cpu.write(GPR_IDS[index], new)
    return None
