"""Instruction emulation for MMIO: what KVM does after the MMU answers RET_PF_EMULATE
(arch/x86/kvm/x86.c x86_emulate_instruction(), emulator_read_write(); arch/x86/kvm/emulate.c
x86_decode_insn()/x86_emulate_insn()), with iced-x86 doing all of the decoding.

The emulator decodes the instruction at the guest's RIP and carries it out against an
:class:`EmulatorContext` the hypervisor implements: registers, RIP and RFLAGS; the guest's mode
(16/32/64-bit code, from CR0.PE, CS.L, CS.D -- :func:`code_bitness`); guest-linear memory for
the sides of an instruction that are RAM; linear -> guest-physical translation; and the MMIO
callbacks. Each memory access is resolved as KVM's emulator_read_write_onepage() does it:
linear -> guest-physical (for the faulting operand, the address the EPT exit reported), then RAM
if the address is in a (writable, for writes) memslot, else MMIO: an in-kernel device
(``mmio_read``/``mmio_write``) or, when none claims it, an exit to the VMM (KVM_EXIT_MMIO).

Supported (what MMIO drivers and ``memcpy_toio``/``memset_io`` compile to):

* MOV in every width and direction, MOV with an immediate, the MOV moffs forms; any addressing
  (base, index*scale, displacement, RIP-relative, 16-bit forms, segment overrides);
* MOVZX, MOVSX, MOVSXD from memory;
* ADD, ADC, SUB, SBB, AND, OR, XOR, CMP, TEST with a memory operand; INC, DEC, NOT, NEG of
  memory; XCHG of memory and a register -- with RFLAGS as the SDM defines it for each
  (CF/PF/AF/ZF/SF/OF; AF is 0 after logic ops, where the SDM leaves it undefined);
* STOS, LODS and MOVS of every element size, with REP, DF, address-size-wide RCX/RSI/RDI
  updates; either side of MOVS may be RAM; INS and OUTS whose port the guest reaches directly
  (not intercepted) with MMIO on the memory side.

Results (:class:`EmulationResult`): DONE -- the instruction retired and RIP moved past it;
USER_EXIT -- an access needs the VMM (:class:`MmioExit`, like KVM_EXIT_MMIO); for a read the
instruction is held until :meth:`MmioEmulator.complete_userspace_io` supplies the data
(complete_emulated_mmio()), for a write it has retired (unless REP iterations remain);
FAULT -- a linear address did not translate (inject #PF); UNHANDLEABLE -- an instruction or form
this emulator does not do (KVM: X86EMUL_UNHANDLEABLE -> internal error / #UD).

Not modelled: segment limit and privilege checks, alignment checks, LOCK semantics beyond
doing the read-modify-write in one go, CMPS/SCAS/INS/OUTS, the REP fast-string chunking (one
element per step), more than one VMM exit per access that crosses a page.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from iced_x86 import Decoder, Formatter, FormatterSyntax, Instruction, MemorySizeExt, Mnemonic, OpKind, Register

# GPR numbers in the x86 encoding order (SDM Table 28-3; Linux VCPU_REGS_*).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI = range(8)
SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = range(6)

# RFLAGS (SDM 3.4.3).
X86_EFLAGS_CF = 1 << 0
X86_EFLAGS_PF = 1 << 2
X86_EFLAGS_AF = 1 << 4
X86_EFLAGS_ZF = 1 << 6
X86_EFLAGS_SF = 1 << 7
X86_EFLAGS_DF = 1 << 10
X86_EFLAGS_OF = 1 << 11
ARITH_FLAGS = X86_EFLAGS_CF | X86_EFLAGS_PF | X86_EFLAGS_AF | X86_EFLAGS_ZF | X86_EFLAGS_SF | X86_EFLAGS_OF

PAGE_SIZE = 4096
MAX_INSN_LEN = 15
_MASK64 = (1 << 64) - 1


def gpr_index(reg: int | str) -> int:
    """A GPR number from its number or its 64-bit name ("rax" ... "r15")."""
    if isinstance(reg, str):
        return GPR_NAMES.index(reg.lower())
    if not 0 <= reg < 16:
        raise ValueError(f"GPR number {reg} is outside 0..15")
    return reg


def code_bitness(*, cr0_pe: bool, efer_lma: bool, cs_l: bool, cs_d: bool, rflags_vm: bool = False) -> int:
    """The default operand/address size of the code running (SDM 3.4.5, 5.2.1): 64 in 64-bit
    mode (IA-32e with CS.L), else 32 with CS.D, else 16 (real mode, virtual-8086 mode too)."""
    if not cr0_pe or rflags_vm:
        return 16
    if efer_lma and cs_l:
        return 64
    return 32 if cs_d else 16


class EmulatorContext(Protocol):
    """What the emulator needs from the vCPU (KVM's ``struct x86_emulate_ops``)."""

    def read_gpr(self, index: int) -> int: ...

    def write_gpr(self, index: int, value: int) -> None: ...

    def read_rip(self) -> int: ...

    def write_rip(self, value: int) -> None: ...

    def read_rflags(self) -> int: ...

    def write_rflags(self, value: int) -> None: ...

    def bitness(self) -> int:
        """16, 32 or 64: see :func:`code_bitness`."""
        ...

    def segment_base(self, segment: int) -> int:
        """Base of ES, CS, SS, DS, FS, GS (0..5)."""
        ...

    def read_linear(self, linear: int, size: int) -> bytes | None:
        """Read guest RAM by linear address (also used to fetch the instruction); None if the
        address does not translate."""
        ...

    def write_linear(self, linear: int, data: bytes) -> bool:
        """Write guest RAM by linear address; False if the address does not translate."""
        ...

    def translate(self, linear: int, write: bool) -> int | None:
        """The guest-physical address of ``linear`` (the guest's own paging), None on a fault."""
        ...

    def is_mmio(self, gpa: int, write: bool) -> bool:
        """True when ``gpa`` is not RAM for this access: no memslot, or a write to a read-only
        memslot (kvm_vcpu_read_guest()/emulator_write_phys() would fail)."""
        ...

    def mmio_read(self, gpa: int, size: int) -> int | None:
        """An in-kernel device's value, or None: no device here, exit to the VMM."""
        ...

    def mmio_write(self, gpa: int, size: int, value: int) -> bool:
        """True if an in-kernel device took the write, False to exit to the VMM."""
        ...

    def port_read(self, port: int, size: int) -> int:
        """IN from a port the VMCS lets the guest reach (INS not intercepted): the platform's."""
        ...

    def port_write(self, port: int, size: int, value: int) -> None:
        """OUT to a port the guest reaches directly (OUTS not intercepted)."""
        ...


class EmulationResult(enum.Enum):
    DONE = "done"
    USER_EXIT = "user_exit"
    FAULT = "fault"
    UNHANDLEABLE = "unhandleable"


@dataclass(frozen=True, slots=True)
class MmioExit:
    """``KVM_EXIT_MMIO`` (struct kvm_run.mmio): ``size`` bytes at ``gpa``; for a write ``data``
    is the value written (little-endian in the VMM's buffer), for a read None until completed."""

    gpa: int
    size: int
    is_write: bool
    data: int | None = None

    @property
    def data_bytes(self) -> bytes:
        return (self.data or 0).to_bytes(self.size, "little")


@dataclass(frozen=True, slots=True)
class EmulationOutcome:
    """The result of emulating one instruction (or, for REP, of the iterations done so far).
    ``length`` and ``text`` describe the instruction; ``mmio`` is the exit for USER_EXIT;
    ``fault_address``/``fault_write`` the linear address that did not translate for FAULT;
    ``rip_advanced`` whether RIP now points past the instruction; ``reason`` says why an
    instruction is UNHANDLEABLE."""

    result: EmulationResult
    length: int = 0
    text: str = ""
    mmio: MmioExit | None = None
    fault_address: int | None = None
    fault_write: bool = False
    rip_advanced: bool = False
    reason: str = ""


class _UserExit(Exception):
    def __init__(self, exit: MmioExit) -> None:
        self.exit = exit


class _Fault(Exception):
    def __init__(self, linear: int, write: bool) -> None:
        self.linear = linear
        self.write = write


class _Unhandleable(Exception):
    pass


# --- registers ----------------------------------------------------------------------------------
def _register_table() -> dict[int, tuple[int, int, int]]:
    """iced register -> (GPR number, size in bytes, bit shift: 8 for AH/CH/DH/BH)."""
    table: dict[int, tuple[int, int, int]] = {}
    low8 = ["AL", "CL", "DL", "BL", "SPL", "BPL", "SIL", "DIL"] + [f"R{n}L" for n in range(8, 16)]
    w16 = ["AX", "CX", "DX", "BX", "SP", "BP", "SI", "DI"] + [f"R{n}W" for n in range(8, 16)]
    d32 = ["EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI"] + [f"R{n}D" for n in range(8, 16)]
    q64 = ["RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI"] + [f"R{n}" for n in range(8, 16)]
    for size, names in ((1, low8), (2, w16), (4, d32), (8, q64)):
        for number, name in enumerate(names):
            table[int(getattr(Register, name))] = (number, size, 0)
    for number, name in enumerate(("AH", "CH", "DH", "BH")):
        table[int(getattr(Register, name))] = (number, 1, 8)
    return table


_REGISTERS = _register_table()
_SEGMENTS = {int(getattr(Register, name)): n for n, name in enumerate(("ES", "CS", "SS", "DS", "FS", "GS"))}
_IP_REGISTERS = frozenset({int(Register.RIP), int(Register.EIP)})
_IMMEDIATE_KINDS = frozenset(
    int(getattr(OpKind, name))
    for name in ("IMMEDIATE8", "IMMEDIATE16", "IMMEDIATE32", "IMMEDIATE64", "IMMEDIATE8TO16", "IMMEDIATE8TO32",
                 "IMMEDIATE8TO64", "IMMEDIATE32TO64")
)
_OP_REGISTER = int(OpKind.REGISTER)
_OP_MEMORY = int(OpKind.MEMORY)
_STRING_SOURCE = frozenset(int(getattr(OpKind, n)) for n in ("MEMORY_SEG_SI", "MEMORY_SEG_ESI", "MEMORY_SEG_RSI"))
_STRING_DEST = frozenset(int(getattr(OpKind, n)) for n in ("MEMORY_ESDI", "MEMORY_ESEDI", "MEMORY_ESRDI"))
_LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})

_formatter = Formatter(FormatterSyntax.GAS)


def _gpr_operand(instr: Instruction, op: int) -> tuple[int, int, int]:
    entry = _REGISTERS.get(int(instr.op_register(op)))
    if entry is None:
        raise _Unhandleable(f"operand {op} of {_formatter.format(instr)} is not a general-purpose register")
    return entry


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _sign_extend(value: int, size: int) -> int:
    bits = 8 * size
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _address_size(raw: bytes, bitness: int) -> int:
    """Address size in bytes after a 67h prefix (SDM 3.6)."""
    addr67 = False
    for byte in raw:
        if byte in _LEGACY_PREFIXES:
            addr67 |= byte == 0x67
        elif bitness == 64 and 0x40 <= byte <= 0x4F:
            continue
        else:
            break
    if bitness == 64:
        return 4 if addr67 else 8
    if bitness == 32:
        return 2 if addr67 else 4
    return 4 if addr67 else 2


_PARITY = bytes(1 - bin(i).count("1") % 2 for i in range(256))


def _szp(result: int, size: int) -> int:
    flags = 0
    if result & _mask(size) == 0:
        flags |= X86_EFLAGS_ZF
    if result >> (8 * size - 1) & 1:
        flags |= X86_EFLAGS_SF
    if _PARITY[result & 0xFF]:
        flags |= X86_EFLAGS_PF
    return flags


def alu(mnemonic: str, a: int, b: int, size: int, rflags: int) -> tuple[int, int]:
    """Result and new RFLAGS of ``a OP b`` at ``size`` bytes (SDM Vol. 2 ADD/ADC/SUB/SBB/CMP/
    AND/OR/XOR/TEST/INC/DEC/NEG/NOT). Flags the instruction does not write are kept."""
    m = _mask(size)
    a &= m
    b &= m
    sign = 1 << (8 * size - 1)
    cf_in = rflags & X86_EFLAGS_CF
    if mnemonic in ("ADD", "ADC", "INC"):
        carry = 1 if mnemonic == "ADC" and cf_in else 0
        full = a + b + carry
        result = full & m
        flags = _szp(result, size)
        if full > m:
            flags |= X86_EFLAGS_CF
        if (a ^ b ^ result) & 0x10:
            flags |= X86_EFLAGS_AF
        if ~(a ^ b) & (a ^ result) & sign:
            flags |= X86_EFLAGS_OF
        if mnemonic == "INC":
            flags = (flags & ~X86_EFLAGS_CF) | cf_in
        return result, (rflags & ~ARITH_FLAGS) | flags
    if mnemonic in ("SUB", "SBB", "CMP", "DEC", "NEG"):
        if mnemonic == "NEG":
            a, b = 0, a
        borrow = 1 if mnemonic == "SBB" and cf_in else 0
        full = a - b - borrow
        result = full & m
        flags = _szp(result, size)
        if full < 0:
            flags |= X86_EFLAGS_CF
        if (a ^ b ^ result) & 0x10:
            flags |= X86_EFLAGS_AF
        if (a ^ b) & (a ^ result) & sign:
            flags |= X86_EFLAGS_OF
        if mnemonic == "DEC":
            flags = (flags & ~X86_EFLAGS_CF) | cf_in
        if mnemonic == "NEG":
            flags = (flags & ~X86_EFLAGS_CF) | (X86_EFLAGS_CF if b else 0)
        return result, (rflags & ~ARITH_FLAGS) | flags
    if mnemonic in ("AND", "TEST"):
        result = a & b
    elif mnemonic == "OR":
        result = a | b
    elif mnemonic == "XOR":
        result = a ^ b
    elif mnemonic == "NOT":
        return ~a & m, rflags
    else:
        raise ValueError(f"not an ALU mnemonic: {mnemonic}")
    return result, (rflags & ~ARITH_FLAGS) | _szp(result, size)


_ALU_BINARY = frozenset({"ADD", "ADC", "SUB", "SBB", "AND", "OR", "XOR", "CMP", "TEST"})
_ALU_UNARY = frozenset({"INC", "DEC", "NOT", "NEG"})
_NO_WRITEBACK = frozenset({"CMP", "TEST"})
_MNEMONIC_NAMES = {int(getattr(Mnemonic, name)): name for name in dir(Mnemonic) if name.isupper()}


@dataclass(slots=True)
class _Pending:
    """An instruction held for the VMM: ``read`` -- waiting for data (re-executed with it);
    ``restart`` -- a REP instruction to continue after a write exit."""

    read: MmioExit | None
    restart: bool
    gpa_hint: int | None
    earlier: dict[tuple[int, int], int] = field(default_factory=dict)  # pieces already read


@dataclass(slots=True)
class _Step:
    """State of one execution attempt: buffered register writes (committed only when the
    iteration completes, so an exit for read data leaves the vCPU untouched)."""

    ctx: EmulatorContext
    bitness: int
    gpa_hint: int | None
    read_data: dict[tuple[int, int], int]
    regs: dict[int, int] = field(default_factory=dict)
    # MMIO pieces this iteration read (from the VMM or a device): an access split in pieces
    # that exits for a later one is re-executed with them, not read again (KVM's mmio_fragments).
    consumed: dict[tuple[int, int], int] = field(default_factory=dict)
    rflags: int = 0
    write_exit: MmioExit | None = None

    def gpr(self, index: int) -> int:
        value = self.regs.get(index)
        return self.ctx.read_gpr(index) if value is None else value


class MmioEmulator:
    """Emulates the instruction at the guest's RIP after an MMIO exit (EPT misconfiguration on
    an MMIO SPTE, or EPT violation answered EMULATE). One per vCPU: it holds the instruction
    waiting for VMM data between a read USER_EXIT and :meth:`complete_userspace_io`.
    ``on_mmio`` is called for every MMIO access, for tracing and statistics."""

    def __init__(self, on_mmio: Callable[[MmioExit], None] | None = None) -> None:
        self._pending: _Pending | None = None
        self.on_mmio = on_mmio
        self.stats = {"insn_emulation": 0, "insn_emulation_fail": 0, "mmio_exits": 0}

    @property
    def pending(self) -> MmioExit | None:
        """The read the VMM has yet to complete, if any."""
        return self._pending.read if self._pending is not None else None

    def emulate(self, ctx: EmulatorContext, gpa: int | None = None) -> EmulationOutcome:
        """Emulate the instruction at RIP. ``gpa`` is the guest-physical address the exit
        reported (GUEST_PHYSICAL_ADDRESS), used for the instruction's explicit memory operand
        when its page offset matches; every other address is translated through ``ctx``."""
        if self._pending is not None:
            raise RuntimeError("an MMIO exit is waiting for complete_userspace_io()")
        return self._run(ctx, gpa, {})

    def complete_userspace_io(self, ctx: EmulatorContext, data: int | bytes | None = None) -> EmulationOutcome:
        """After a USER_EXIT: for a read, ``data`` is what the device returned and the
        instruction is carried out with it (complete_emulated_mmio()); for a write, a REP
        instruction with iterations left continues, anything else is already DONE."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("no MMIO exit is pending")
        self._pending = None
        if pending.read is not None:
            if data is None:
                raise ValueError("an MMIO read needs its data")
            value = int.from_bytes(data[: pending.read.size], "little") if isinstance(data, (bytes, bytearray)) else data
            read_data = dict(pending.earlier)
            read_data[(pending.read.gpa, pending.read.size)] = value & _mask(pending.read.size)
            return self._run(ctx, pending.gpa_hint, read_data)
        if pending.restart:
            return self._run(ctx, pending.gpa_hint, {})
        return EmulationOutcome(EmulationResult.DONE, rip_advanced=True)

    # --- one attempt ---------------------------------------------------------------------------
    def _run(self, ctx: EmulatorContext, gpa: int | None, read_data: dict[tuple[int, int], int]) -> EmulationOutcome:
        self.stats["insn_emulation"] += 1
        bitness = ctx.bitness()
        rip = ctx.read_rip()
        try:
            instr, raw = self._fetch(ctx, rip, bitness)
        except _Fault as fault:
            return EmulationOutcome(EmulationResult.FAULT, fault_address=fault.linear, fault_write=False)
        except _Unhandleable as error:
            self.stats["insn_emulation_fail"] += 1
            return EmulationOutcome(EmulationResult.UNHANDLEABLE, reason=str(error))
        text = _formatter.format(instr)
        step = _Step(ctx, bitness, gpa, read_data)
        try:
            done = self._execute(step, instr, raw)
        except _UserExit as user:
            # Reads come before writes in every form handled, so what is buffered is complete
            # work: REP iterations done before this one (nothing, for other instructions).
            self._commit(step)
            self._pending = _Pending(user.exit, False, gpa, dict(step.consumed))
            self.stats["mmio_exits"] += 1
            return EmulationOutcome(EmulationResult.USER_EXIT, instr.len, text, mmio=user.exit)
        except _Fault as fault:
            self._commit(step)
            return EmulationOutcome(
                EmulationResult.FAULT, instr.len, text, fault_address=fault.linear, fault_write=fault.write
            )
        except _Unhandleable as error:
            self.stats["insn_emulation_fail"] += 1
            return EmulationOutcome(EmulationResult.UNHANDLEABLE, instr.len, text, reason=str(error))
        self._commit(step)
        if done:
            ctx.write_rip(self._next_rip(rip, instr.len, bitness))
        if step.write_exit is not None:
            self._pending = _Pending(None, not done, gpa)
            self.stats["mmio_exits"] += 1
            return EmulationOutcome(EmulationResult.USER_EXIT, instr.len, text, mmio=step.write_exit, rip_advanced=done)
        return EmulationOutcome(EmulationResult.DONE, instr.len, text, rip_advanced=True)

    @staticmethod
    def _commit(step: _Step) -> None:
        for index, value in step.regs.items():
            step.ctx.write_gpr(index, value)
        step.regs.clear()
        step.ctx.write_rflags(step.rflags)

    @staticmethod
    def _next_rip(rip: int, length: int, bitness: int) -> int:
        if bitness == 64:
            return (rip + length) & _MASK64
        return (rip + length) & (0xFFFFFFFF if bitness == 32 else 0xFFFF)

    @staticmethod
    def _fetch(ctx: EmulatorContext, rip: int, bitness: int) -> tuple[Instruction, bytes]:
        linear = rip if bitness == 64 else (ctx.segment_base(SEG_CS) + rip) & 0xFFFFFFFF
        first = min(MAX_INSN_LEN, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
        code = ctx.read_linear(linear, first)
        if code is None:
            gpa = ctx.translate(linear, False)
            if gpa is None:
                raise _Fault(linear, False)
            # The code translates to a guest-physical address with no RAM behind it: KVM's fetch
            # fails (kvm_fetch_guest_virt() -> X86EMUL_IO_NEEDED) and x86_emulate_instruction()
            # ends in handle_emulation_failure(): an internal-error exit at CPL 0.
            raise _Unhandleable(f"instruction fetch at {rip:#x} from guest-physical {gpa:#x}, which is not RAM")
        instr = Decoder(bitness, code, ip=rip).decode()
        if instr.is_invalid and first < MAX_INSN_LEN:
            rest = ctx.read_linear(linear + first, MAX_INSN_LEN - first)
            if rest is not None:
                code += rest
                instr = Decoder(bitness, code, ip=rip).decode()
        if instr.is_invalid:
            raise _Unhandleable(f"no valid instruction at {rip:#x}: {code.hex(' ')}")
        return instr, bytes(code[: instr.len])

    # --- execution ----------------------------------------------------------------------------------
    def _execute(self, step: _Step, instr: Instruction, raw: bytes) -> bool:
        """Carry out ``instr``; True when it completed (False: REP iterations remain)."""
        step.rflags = step.ctx.read_rflags()
        name = _MNEMONIC_NAMES.get(int(instr.mnemonic), "")
        if instr.is_string_instruction:
            return self._string(step, instr, raw, name)
        if name == "MOV":
            size = self._op_size(instr, 0)
            self._write_op(step, instr, raw, 0, size, self._read_op(step, instr, raw, 1, size))
        elif name in ("MOVZX", "MOVSX", "MOVSXD"):
            src_size = self._op_size(instr, 1)
            dst_size = self._op_size(instr, 0)
            value = self._read_op(step, instr, raw, 1, src_size)
            if name != "MOVZX":
                value = _sign_extend(value, src_size) & _mask(dst_size)
            self._write_op(step, instr, raw, 0, dst_size, value)
        elif name in _ALU_BINARY:
            size = self._op_size(instr, 0)
            a = self._read_op(step, instr, raw, 0, size)
            b = self._read_op(step, instr, raw, 1, size)
            result, step.rflags = alu(name, a, b, size, step.rflags)
            if name not in _NO_WRITEBACK:
                self._write_op(step, instr, raw, 0, size, result)
        elif name in _ALU_UNARY:
            size = self._op_size(instr, 0)
            operand = 1 if name in ("INC", "DEC") else 0
            result, step.rflags = alu(name, self._read_op(step, instr, raw, 0, size), operand, size, step.rflags)
            self._write_op(step, instr, raw, 0, size, result)
        elif name == "XCHG":
            size = self._op_size(instr, 0)
            a = self._read_op(step, instr, raw, 0, size)
            b = self._read_op(step, instr, raw, 1, size)
            # Memory first: the register side is buffered and cannot fail.
            order = (0, 1) if instr.op_kind(0) == OpKind.MEMORY else (1, 0)
            values = {0: b, 1: a}
            for op in order:
                self._write_op(step, instr, raw, op, size, values[op])
        else:
            raise _Unhandleable(f"{_formatter.format(instr)}: not an instruction the MMIO emulator handles")
        return True

    @staticmethod
    def _op_size(instr: Instruction, op: int) -> int:
        kind = int(instr.op_kind(op))
        if kind == _OP_REGISTER:
            return _gpr_operand(instr, op)[1]
        if kind == _OP_MEMORY or kind in _STRING_SOURCE or kind in _STRING_DEST:
            return int(MemorySizeExt.size(instr.memory_size))
        raise _Unhandleable(f"operand {op} of {_formatter.format(instr)} has no size of its own")

    def _effective_linear(self, step: _Step, instr: Instruction, raw: bytes) -> int:
        """The linear address of the explicit memory operand (SDM 3.7.5): base + index*scale +
        displacement at the address size, plus the segment base (only FS/GS in 64-bit mode)."""
        asize = _address_size(raw, step.bitness)
        amask = _mask(asize)
        base = int(instr.memory_base)
        if base in _IP_REGISTERS:
            ea = instr.memory_displacement  # iced resolved it against the next RIP
        else:
            ea = instr.memory_displacement
            if base != Register.NONE:
                number, size, shift = _REGISTERS[base]
                ea += step.gpr(number) & _mask(size)
            index = int(instr.memory_index)
            if index != Register.NONE:
                number, size, shift = _REGISTERS[index]
                ea += (step.gpr(number) & _mask(size)) * instr.memory_index_scale
        ea &= amask
        return self._segmented(step, _SEGMENTS[int(instr.memory_segment)], ea)

    @staticmethod
    def _segmented(step: _Step, segment: int, ea: int) -> int:
        if step.bitness == 64:
            if segment in (SEG_FS, SEG_GS):
                return (step.ctx.segment_base(segment) + ea) & _MASK64
            return ea
        return (step.ctx.segment_base(segment) + ea) & 0xFFFFFFFF

    def _read_op(self, step: _Step, instr: Instruction, raw: bytes, op: int, size: int) -> int:
        kind = int(instr.op_kind(op))
        if kind == _OP_REGISTER:
            number, reg_size, shift = _gpr_operand(instr, op)
            return (step.gpr(number) >> shift) & _mask(reg_size)
        if kind == _OP_MEMORY:
            return self._mem_read(step, self._effective_linear(step, instr, raw), size, hinted=True)
        if kind in _IMMEDIATE_KINDS:
            return instr.immediate(op) & _mask(size)
        raise _Unhandleable(f"operand {op} of {_formatter.format(instr)} is not a register, memory or immediate")

    def _write_op(self, step: _Step, instr: Instruction, raw: bytes, op: int, size: int, value: int) -> None:
        kind = int(instr.op_kind(op))
        if kind == _OP_REGISTER:
            number, reg_size, shift = _gpr_operand(instr, op)
            self._set_reg(step, number, reg_size, shift, value)
        elif kind == _OP_MEMORY:
            self._mem_write(step, self._effective_linear(step, instr, raw), size, value, hinted=True)
        else:
            raise _Unhandleable(f"operand {op} of {_formatter.format(instr)} cannot be written")

    @staticmethod
    def _set_reg(step: _Step, number: int, size: int, shift: int, value: int) -> None:
        """Write a GPR as the SDM does: 32-bit writes zero bits 63:32, 8/16-bit ones keep the
        rest (SDM 3.4.1.1)."""
        if size == 8:
            step.regs[number] = value & _MASK64
        elif size == 4:
            step.regs[number] = value & 0xFFFFFFFF
        else:
            mask = _mask(size) << shift
            step.regs[number] = (step.gpr(number) & ~mask) | ((value << shift) & mask)

    # --- memory ---------------------------------------------------------------------------------------
    def _gpa_of(self, step: _Step, linear: int, write: bool, hinted: bool) -> int:
        hint = step.gpa_hint
        if hinted and hint is not None and (hint ^ linear) & (PAGE_SIZE - 1) == 0:
            return hint
        gpa = step.ctx.translate(linear, write)
        if gpa is None:
            raise _Fault(linear, write)
        return gpa

    @staticmethod
    def _pieces(linear: int, size: int) -> list[tuple[int, int, int]]:
        """(linear, offset in the access, length) of each page the access touches."""
        first = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
        pieces = [(linear, 0, first)]
        if first < size:
            pieces.append(((linear + first) & _MASK64, first, size - first))
        return pieces

    def _mem_read(self, step: _Step, linear: int, size: int, *, hinted: bool) -> int:
        value = 0
        ctx = step.ctx
        for piece_linear, offset, length in self._pieces(linear, size):
            gpa = self._gpa_of(step, piece_linear, False, hinted)
            if ctx.is_mmio(gpa, False):
                piece = self._mmio_read(step, gpa, length)
            else:
                data = ctx.read_linear(piece_linear, length)
                if data is None:
                    raise _Fault(piece_linear, False)
                piece = int.from_bytes(data, "little")
            value |= piece << (8 * offset)
        return value

    def _mem_write(self, step: _Step, linear: int, size: int, value: int, *, hinted: bool) -> None:
        ctx = step.ctx
        pieces = self._pieces(linear, size)
        # Translate every piece before writing any (a fault must not leave half a write).
        gpas = [self._gpa_of(step, piece_linear, True, hinted) for piece_linear, _, _ in pieces]
        for (piece_linear, offset, length), gpa in zip(pieces, gpas):
            piece = (value >> (8 * offset)) & _mask(length)
            if ctx.is_mmio(gpa, True):
                self._mmio_write(step, gpa, length, piece)
            elif not ctx.write_linear(piece_linear, piece.to_bytes(length, "little")):
                raise _Fault(piece_linear, True)

    def _mmio_read(self, step: _Step, gpa: int, size: int) -> int:
        if self.on_mmio is not None:
            self.on_mmio(MmioExit(gpa, size, False))
        supplied = step.read_data.pop((gpa, size), None)
        if supplied is None:
            supplied = step.ctx.mmio_read(gpa, size)
            if supplied is None:
                raise _UserExit(MmioExit(gpa, size, False))
            supplied &= _mask(size)
        step.consumed[(gpa, size)] = supplied
        return supplied

    def _mmio_write(self, step: _Step, gpa: int, size: int, value: int) -> None:
        if self.on_mmio is not None:
            self.on_mmio(MmioExit(gpa, size, True, value))
        if step.ctx.mmio_write(gpa, size, value):
            return
        if step.write_exit is not None:
            raise _Unhandleable("a second MMIO write for the VMM in one instruction step")
        step.write_exit = MmioExit(gpa, size, True, value)

    # --- string instructions (SDM Vol. 1 7.3.9; Vol. 2 MOVS, STOS, LODS, REP) ------------------------
    def _string(self, step: _Step, instr: Instruction, raw: bytes, name: str) -> bool:
        if name not in ("MOVSB", "MOVSW", "MOVSD", "MOVSQ", "STOSB", "STOSW", "STOSD", "STOSQ",
                        "LODSB", "LODSW", "LODSD", "LODSQ", "INSB", "INSW", "INSD", "OUTSB", "OUTSW", "OUTSD"):
            raise _Unhandleable(f"{_formatter.format(instr)}: string instruction not handled")
        size = int(MemorySizeExt.size(instr.memory_size))
        asize = _address_size(raw, step.bitness)
        amask = _mask(asize)
        rep = instr.has_rep_prefix or instr.has_repne_prefix
        delta = -size if step.rflags & X86_EFLAGS_DF else size
        source_segment = _SEGMENTS[int(instr.memory_segment)]
        # INS: port -> ES:rDI; OUTS: seg:rSI -> port (SDM Vol. 2 INS/OUTS), the port in DX.
        kind = {"INSB": "INS", "INSW": "INS", "INSD": "INS", "OUTSB": "OUTS", "OUTSW": "OUTS", "OUTSD": "OUTS"}.get(name, name[:4])
        port = step.gpr(REG_RDX) & 0xFFFF
        while True:
            if rep and step.gpr(REG_RCX) & amask == 0:
                return True
            if kind in ("MOVS", "LODS", "OUTS"):
                rsi = step.gpr(REG_RSI)
                src = self._segmented(step, source_segment, rsi & amask)
                value = self._mem_read(step, src, size, hinted=False)
            elif kind == "INS":
                value = step.ctx.port_read(port, size) & _mask(size)
            else:
                rax = step.gpr(REG_RAX)
                value = rax & _mask(size)
            if kind in ("MOVS", "STOS", "INS"):
                rdi = step.gpr(REG_RDI)
                dst = self._segmented(step, SEG_ES, rdi & amask)
                self._mem_write(step, dst, size, value, hinted=False)
                self._set_reg(step, REG_RDI, asize, 0, (rdi & amask) + delta)
            elif kind == "OUTS":
                step.ctx.port_write(port, size, value)
            else:
                self._set_reg(step, REG_RAX, size, 0, value)
            if kind in ("MOVS", "LODS", "OUTS"):
                self._set_reg(step, REG_RSI, asize, 0, (rsi & amask) + delta)
            if not rep:
                return True
            step.consumed.clear()  # this iteration is complete work
            rcx = step.gpr(REG_RCX)
            self._set_reg(step, REG_RCX, asize, 0, (rcx & amask) - 1)
            if step.write_exit is not None:
                # One element went to the VMM: stop here; the instruction is done only if this
                # was the last iteration (KVM re-enters the emulator after the exit).
                return step.gpr(REG_RCX) & amask == 0
