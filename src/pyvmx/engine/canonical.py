"""Canonical-address checks the engine does not make (SDM 3.3.7.1: in 64-bit mode an address
whose bits 63 down to the linear-address width - 1 are not all equal is non-canonical).

QEMU as built into Unicorn 2.1.4 loads a non-canonical value into FS/GS base and the syscall
MSRs (WRMSR, WRFSBASE/WRGSBASE), into GDTR/IDTR (LGDT/LIDT) and into LDTR/TR (LLDT/LTR with a
16-byte descriptor), and -- since the machine replaces Unicorn's MMU -- passes non-canonical
data addresses to the page walker, which ignores bits 63:48. Each of those must raise
(SDM Vol. 2 for each instruction; SDM 6.15 for accesses):

* WRMSR of IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GS_BASE, IA32_LSTAR, IA32_CSTAR,
  IA32_SYSENTER_ESP, IA32_SYSENTER_EIP: #GP(0);
* WRFSBASE/WRGSBASE of a non-canonical 64-bit register: #GP(0);
* LGDT/LIDT in 64-bit mode of a non-canonical base: #GP(0);
* LLDT/LTR in IA-32e mode of a descriptor with a non-canonical base: #GP(selector); LTR of
  a null selector: #GP(0) (QEMU loads an invalid TR instead), and in IA-32e mode of a 16-bit
  TSS: #GP(selector) (QEMU loads it);
* a data access to a non-canonical address: #SS(0) for a stack reference (SS as segment:
  PUSH/POP/CALL/RET, RSP/RBP-based operands), else #GP(0).

:func:`fault_before` answers for an instruction the executor is about to run (it then raises
the fault through the usual path: the exception bitmap or the guest's IDT);
:func:`access_fault` for the non-canonical access the page walker refused
(:class:`pyvmx.vmx.faults.NonCanonicalAccess`), :func:`rewind_branch` for a fetch from a
non-canonical branch target (the fault belongs to the branch). LLDT of a null selector is also emulated here:
QEMU keeps the old LDTR attributes where the SDM makes LDTR unusable (SDM Vol. 2A LLDT).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvmx.engine.unicorn_cpu import GPR_IDS, REG_RIP, UnicornCpu
from pyvmx.vmx import decode as dec
from pyvmx.vmx.faults import TranslationFault, X86Fault
from pyvmx.vmx.state import AR_UNUSABLE, LDTR, Segment

MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
CANONICAL_MSRS = frozenset({
    MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR, MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
})

_k = dec.InsnKind
CHECKED_KINDS = frozenset({_k.WRMSR, _k.WRFSBASE, _k.WRGSBASE, _k.LGDT, _k.LIDT, _k.LLDT, _k.LTR})

CR0_PE = 1
CR4_FSGSBASE = 1 << 16
EFER_LMA = 1 << 10
RFLAGS_VM = 1 << 17
DESC_TYPE_LDT = 2
DESC_TYPE_TSS_AVAILABLE = 9
DESC_TYPE_TSS16_AVAILABLE = 1
SS_VECTOR, GP_VECTOR = 12, 13
RSP_INDEX = 4
_U64 = (1 << 64) - 1

Canonical = Callable[[int], bool]
ReadLinear = Callable[[int, int], bytes]  # (linear address, size) at CPL 0; raises TranslationFault


@dataclass(frozen=True, slots=True)
class LoadNullLdt:
    """LLDT of a null selector: LDTR becomes unusable (SDM Vol. 2A LLDT)."""

    selector: int


def _gp(error_code: int = 0) -> X86Fault:
    return X86Fault(GP_VECTOR, error_code)


def fault_before(
    insn: dec.DecodedInsn,
    cpu: UnicornCpu,
    canonical: Canonical,
    read_linear: ReadLinear,
    operand_address: Callable[[dec.MemOperand], int],
) -> X86Fault | LoadNullLdt | None:
    """What the checked instruction ``insn`` must do instead of running on the engine: a fault
    to raise, a null LLDT to emulate, or None (it runs; the engine raises its other faults)."""
    kind = insn.kind
    if kind is _k.WRMSR:
        msr = cpu.read(GPR_IDS[1]) & 0xFFFFFFFF
        value = (cpu.read(GPR_IDS[2]) & 0xFFFFFFFF) << 32 | (cpu.read(GPR_IDS[0]) & 0xFFFFFFFF)
        return _gp() if msr in CANONICAL_MSRS and not canonical(value) else None
    if kind in (_k.WRFSBASE, _k.WRGSBASE):
        # #UD for CR4.FSGSBASE = 0 comes first: the engine raises it.
        cr4 = cpu.paging_registers()[2]
        if insn.operand_size != 64 or not cr4 & CR4_FSGSBASE:
            return None
        return None if canonical(cpu.read(GPR_IDS[insn.gpr or 0])) else _gp()
    st = cpu.save_state()
    if not st.cr0 & CR0_PE or st.rflags & RFLAGS_VM:
        return None  # #UD in real and virtual-8086 mode: the engine's
    if kind in (_k.LGDT, _k.LIDT):
        if insn.bitness != 64 or insn.memory is None:
            return None
        try:
            raw = read_linear(operand_address(insn.memory), 10)
        except TranslationFault:
            return None  # the engine raises the access's own fault
        base = struct.unpack_from("<Q", raw, 2)[0]
        return None if canonical(base) else _gp()
    selector = _selector(insn, cpu, read_linear, operand_address)
    if selector is None:
        return None
    if selector & 0xFFFC == 0:
        return LoadNullLdt(selector) if kind is _k.LLDT else _gp()
    if not st.efer & EFER_LMA or selector & 4:
        return None
    offset = selector & ~7
    if offset + 15 > st.gdtr_limit:
        return None
    try:
        low, high, upper = struct.unpack("<IIQ", read_linear(st.gdtr_base + offset, 16))
    except TranslationFault:
        return None
    seg_type = (high >> 8) & 0xF
    if kind is _k.LTR and seg_type == DESC_TYPE_TSS16_AVAILABLE and not high & (1 << 12):
        return _gp(selector & 0xFFFC)  # no 16-bit TSS in IA-32e mode (SDM 8.2.3); QEMU takes it
    wanted = DESC_TYPE_LDT if kind is _k.LLDT else DESC_TYPE_TSS_AVAILABLE
    if high & (1 << 12) or seg_type != wanted or not high & (1 << 15):
        return None  # wrong type or not present: the engine raises #GP / #NP(selector)
    base = (low >> 16) | (high & 0xFF) << 16 | (high & 0xFF000000) | (upper & 0xFFFFFFFF) << 32
    return None if canonical(base) else _gp(selector & 0xFFFC)


def _selector(
    insn: dec.DecodedInsn, cpu: UnicornCpu, read_linear: ReadLinear, operand_address: Callable[[dec.MemOperand], int]
) -> int | None:
    if insn.memory is None:
        return cpu.read(GPR_IDS[insn.gpr or 0]) & 0xFFFF
    try:
        return int.from_bytes(read_linear(operand_address(insn.memory), 2), "little")
    except TranslationFault:
        return None


def load_null_ldt(cpu: UnicornCpu, action: LoadNullLdt) -> None:
    cpu.set_segment(LDTR, Segment(action.selector, 0, 0, AR_UNUSABLE))


def access_fault(cpu: UnicornCpu, code: bytes, rip_linear: int, bitness: int, canonical: Canonical) -> X86Fault:
    """The fault for an instruction whose memory access is non-canonical: #SS(0) when that
    access is a stack reference, else #GP(0) (SDM 6.15 "Interrupt 12", "Interrupt 13")."""
    try:
        accesses = dec.memory_operands(code, rip_linear, bitness)
        length = dec.decode(code, rip_linear, bitness).length
    except dec.DecodeError:
        return _gp()
    regs = cpu.read_gprs()
    st = cpu.save_state()
    bases = [s.base for s in st.segments[:6]]
    next_rip = st.rip + length
    for m in accesses:
        first = dec.effective_address(m, regs, bases, next_rip)
        last = (first + max(m.size, 1) - 1) & _U64
        if m.segment == dec.SEG_SS and not (canonical(first) and canonical(last)):
            return X86Fault(SS_VECTOR, 0)
    return _gp()


def rewind_branch(cpu: UnicornCpu, code: bytes, branch: int, bitness: int) -> bool:
    """Intel raises #GP(0) at a near JMP, Jcc, CALL or RET whose target is non-canonical, before
    the instruction changes anything (SDM Vol. 2A, their 64-bit-mode exceptions; kvm-unit-tests
    emulator64 "jump to non-canonical address" looks the fault up by the JMP's address). The
    engine has executed the branch (``code`` at linear ``branch``, the last instruction that
    ran) and faults fetching the target: put RIP back on the branch and RSP as it was before a
    CALL's push or a RET's pop. False -- nothing undone -- for anything but a taken near branch
    (execution that ran sequentially into the non-canonical range faults there)."""
    found = dec.near_branch(code, branch, bitness)
    if found is None:
        return False
    kind, length, stack = found
    branch_rip = (branch - cpu.cs_base()) & _U64
    if kind is dec.NearBranch.JUMP and cpu.read(REG_RIP) == (branch_rip + length) & _U64:
        return False  # not taken: the fall-through is what faulted
    rsp = cpu.read(GPR_IDS[RSP_INDEX])
    if kind is dec.NearBranch.CALL:
        rsp += stack
    elif kind is dec.NearBranch.RETURN:
        rsp -= stack
    cpu.write(GPR_IDS[RSP_INDEX], rsp & _U64)
    cpu.write(REG_RIP, branch_rip)
    return True


def insn_fits(code: bytes, address: int, bitness: int) -> bool:
    """Whether ``code`` -- the bytes up to where fetching failed -- hold a whole instruction."""
    try:
        dec.decode(code, address, bitness)
    except dec.DecodeError:
        return False
    return True


def translate_one_instruction(cpu: UnicornCpu) -> None:
    """Make the engine translate the next block as one instruction: QEMU's i386 translator ends
    a block after its first instruction when the block starts with HF_INHIBIT_IRQ set, and
    clears the flag after that instruction -- the only side effect, an interrupt shadow over an
    instruction boundary that has already been checked for events."""
    st = cpu.save_state()
    st.interrupt_shadow = True
    cpu.load_state(st, flush_tlb=False)
