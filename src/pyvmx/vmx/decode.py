"""Instruction decoding for VMX non-root operation, on iced-x86 (no hand-written x86 decoding).

The machine scans every newly translated block for the instructions it must see before they
execute (:class:`InsnKind`): those that can cause a VM exit (SDM 26.1.2, 26.1.3), those whose
behaviour VMX changes (SDM 26.3: MOV from CR0/CR4, SMSW, RDTSC with TSC offsetting, #UD for
RDTSCP/RDPID/INVPCID/XSAVES/... when their "enable" control is 0), and those it only observes
for interrupt and NMI windows (STI, POPF, IRET) and blocking by MOV SS (MOV SS, POP SS; SDM
26.7.5, Table 25-3).

:func:`scan_block` is on the hot path (once per translated block): it classifies each
instruction by its iced ``Code`` through a precomputed table and builds a full
:class:`DecodedInsn` (operands, disassembly) only for the sensitive ones.

Instructions that #UD before any VM exit can be considered are not sensitive: iced already
rejects LOCK MOV CR (AMD's alternative CR8 encoding, #UD on Intel), MOV to/from CR1/CR5-7/
CR9-15 and DR8-15; MOV to/from CR2 is decoded but no VMX control can intercept it, so it is
not sensitive either.  ENCLU is not sensitive: no VM-execution control intercepts it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from iced_x86 import (
    Code,
    CodeSize,
    Decoder,
    Formatter,
    FormatterSyntax,
    Instruction,
    InstructionInfoFactory,
    MemorySizeExt,
    OpAccess,
    OpCodeInfo,
    OpKind,
    Register,
)

__all__ = [
    "DecodeError",
    "DecodedInsn",
    "InsnKind",
    "MemAccess",
    "MemOperand",
    "SEG_CS",
    "SEG_DS",
    "SEG_ES",
    "SEG_FS",
    "SEG_GS",
    "SEG_SS",
    "decode",
    "effective_address",
    "memory_operands",
    "scan_block",
]

# Segment registers in the x86 encoding order (SDM 3.4.2; also the VM-exit instruction-
# information segment field, SDM 28.2.5).
SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = range(6)

# GPR numbers in the x86 encoding order, RAX = 0 ... R15 = 15 (SDM 28.2.1, Table 28-3).
REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI = range(8)

_MASK64 = (1 << 64) - 1


class DecodeError(ValueError):
    """The bytes at ``address`` do not form a valid instruction (for the given bitness)."""

    def __init__(self, address: int, code: bytes, bitness: int) -> None:
        super().__init__(
            f"no valid {bitness}-bit instruction at {address:#x}: {code[:15].hex(' ') or '(no bytes)'}"
        )
        self.address = address
        self.code = bytes(code[:15])
        self.bitness = bitness


class InsnKind(enum.Enum):
    """Instructions the machine must see before they execute, by SDM name.

    Grouped as SDM 26.1.2 (unconditional exits), 26.1.3 (conditional exits), 26.3 (changed
    behaviour only) and, last, instructions merely observed for event windows.
    """

    # SDM 26.1.2: unconditional VM exits
    CPUID = enum.auto()
    GETSEC = enum.auto()
    INVD = enum.auto()
    XSETBV = enum.auto()
    VMCALL = enum.auto()
    VMCLEAR = enum.auto()
    VMLAUNCH = enum.auto()
    VMPTRLD = enum.auto()
    VMPTRST = enum.auto()
    VMREAD = enum.auto()  # conditional with "VMCS shadowing"
    VMRESUME = enum.auto()
    VMWRITE = enum.auto()  # conditional with "VMCS shadowing"
    VMXOFF = enum.auto()
    VMXON = enum.auto()
    INVEPT = enum.auto()
    INVVPID = enum.auto()
    # SDM 26.1.3: conditional VM exits
    VMFUNC = enum.auto()
    ENCLS = enum.auto()
    ENCLV = enum.auto()
    HLT = enum.auto()
    INVLPG = enum.auto()
    INVPCID = enum.auto()
    MWAIT = enum.auto()
    MONITOR = enum.auto()
    RDPMC = enum.auto()
    RDTSC = enum.auto()
    RDTSCP = enum.auto()
    PAUSE = enum.auto()
    WBINVD = enum.auto()
    WBNOINVD = enum.auto()
    RDRAND = enum.auto()
    RDSEED = enum.auto()
    LGDT = enum.auto()
    LIDT = enum.auto()
    SGDT = enum.auto()
    SIDT = enum.auto()
    LLDT = enum.auto()
    LTR = enum.auto()
    SLDT = enum.auto()
    STR = enum.auto()
    IN = enum.auto()
    OUT = enum.auto()
    INS = enum.auto()
    OUTS = enum.auto()
    RDMSR = enum.auto()
    WRMSR = enum.auto()
    MOV_TO_CR = enum.auto()  # CR0, CR3, CR4, CR8
    MOV_FROM_CR = enum.auto()  # CR0, CR3, CR4, CR8
    CLTS = enum.auto()
    LMSW = enum.auto()
    MOV_TO_DR = enum.auto()
    MOV_FROM_DR = enum.auto()
    XSAVES = enum.auto()
    XRSTORS = enum.auto()
    UMWAIT = enum.auto()
    TPAUSE = enum.auto()
    # SDM 26.3: behaviour changed, never a VM exit by itself
    SMSW = enum.auto()  # reads the CR0 read shadow for host-owned bits
    RDPID = enum.auto()  # #UD when "enable RDTSCP" = 0
    UMONITOR = enum.auto()  # #UD when "enable user wait and pause" = 0
    INT1 = enum.auto()  # ICEBP (F1): a privileged software exception, via the exception bitmap
    # Observed only: interrupt/NMI windows and blocking by STI / MOV SS (SDM 26.7.5, 6.8.3)
    STI = enum.auto()
    POPF = enum.auto()
    IRET = enum.auto()
    MOV_SS = enum.auto()  # MOV SS, r/m16
    POP_SS = enum.auto()  # 16/32-bit code only
    # Executed by the machine, not the engine: the fast system calls (Unicorn runs only hooks for
    # SYSCALL/SYSENTER; pyvmx.engine.syscall), and WRFSBASE/WRGSBASE, whose non-canonical #GP
    # the engine lacks.
    SYSCALL = enum.auto()
    SYSRET = enum.auto()
    SYSENTER = enum.auto()
    SYSEXIT = enum.auto()
    WRFSBASE = enum.auto()
    WRGSBASE = enum.auto()


@dataclass(frozen=True, slots=True)
class MemOperand:
    """An instruction's memory operand, as the VM-exit instruction information describes it
    (SDM 28.2.5): segment, base + index * scale + displacement, address size.

    ``displacement`` is the instruction's displacement field sign-extended (the raw field, also
    for RIP-relative operands, whose address is ``rip_next + displacement``).  ``bitness`` is the
    code size the instruction was decoded in (64 = 64-bit mode, where ES/CS/SS/DS bases are 0).
    """

    segment: int
    base: int | None
    index: int | None
    scale: int
    displacement: int
    address_size: int
    rip_relative: bool
    bitness: int


@dataclass(frozen=True, slots=True)
class MemAccess:
    """One memory access of an instruction, explicit or implicit (stack, string operands).

    ``size`` is in bytes; 0 means the size depends on run-time state (XSAVE family).  For
    REP-prefixed string instructions it is the size of one element.
    """

    segment: int
    base: int | None
    index: int | None
    scale: int
    displacement: int
    address_size: int
    size: int
    write: bool
    rip_relative: bool
    bitness: int


@dataclass(frozen=True, slots=True)
class DecodedInsn:
    """One decoded instruction with the operands VMX exit decisions and exit information need.

    ``gpr`` is the general-purpose register in the ModRM r/m position when it names a register
    (the SDM's "Reg1", Table 28-14): the GPR of MOV CR/DR, LMSW/SMSW/LLDT/LTR/SLDT/STR and the
    VMREAD/VMWRITE r/m operand in register form, RDRAND/RDSEED/RDPID's destination, the
    UMONITOR/UMWAIT/TPAUSE operand, MOV SS's source.  ``reg2`` is the register in the ModRM reg
    position (the SDM's "Reg2"): VMREAD's source / VMWRITE's destination (the field encoding),
    INVEPT/INVVPID/INVPCID's type register.

    ``port`` is the immediate port of IN/OUT imm8 (None: the port is in DX); ``io_size`` is
    1, 2 or 4 for I/O instructions.  ``memory`` is the memory operand: the explicit one, or
    ES:[rDI] for INS, seg:[rSI] for OUTS and seg:[rAX] for MONITOR.
    """

    address: int
    length: int
    kind: InsnKind | None
    text: str
    operand_size: int
    address_size: int
    bitness: int
    rep: bool = False
    gpr: int | None = None
    reg2: int | None = None
    cr: int | None = None
    dr: int | None = None
    port: int | None = None
    io_size: int | None = None
    memory: MemOperand | None = None
    is_write_to_memory: bool = False
    raw: bytes = b""


# --- classification tables --------------------------------------------------------------------
_Classifier = Callable[[Instruction], "InsnKind | None"]
_BY_CODE: dict[int, InsnKind | _Classifier] = {}


def _add(kind: InsnKind, *names: str) -> None:
    for name in names:
        _BY_CODE[int(getattr(Code, name))] = kind


_K = InsnKind
_add(_K.CPUID, "CPUID")
_add(_K.GETSEC, "GETSECD", "GETSECQ")
_add(_K.INVD, "INVD")
_add(_K.XSETBV, "XSETBV")
_add(_K.VMCALL, "VMCALL")
_add(_K.VMCLEAR, "VMCLEAR_M64")
_add(_K.VMLAUNCH, "VMLAUNCH")
_add(_K.VMPTRLD, "VMPTRLD_M64")
_add(_K.VMPTRST, "VMPTRST_M64")
_add(_K.VMREAD, "VMREAD_RM32_R32", "VMREAD_RM64_R64")
_add(_K.VMRESUME, "VMRESUME")
_add(_K.VMWRITE, "VMWRITE_R32_RM32", "VMWRITE_R64_RM64")
_add(_K.VMXOFF, "VMXOFF")
_add(_K.VMXON, "VMXON_M64")
_add(_K.INVEPT, "INVEPT_R32_M128", "INVEPT_R64_M128")
_add(_K.INVVPID, "INVVPID_R32_M128", "INVVPID_R64_M128")
_add(_K.VMFUNC, "VMFUNC")
_add(_K.ENCLS, "ENCLS")
_add(_K.ENCLV, "ENCLV")
_add(_K.HLT, "HLT")
_add(_K.INVLPG, "INVLPG_M")
_add(_K.INVPCID, "INVPCID_R32_M128", "INVPCID_R64_M128")
_add(_K.MWAIT, "MWAIT")
_add(_K.MONITOR, "MONITORW", "MONITORD", "MONITORQ")
_add(_K.RDPMC, "RDPMC")
_add(_K.RDTSC, "RDTSC")
_add(_K.RDTSCP, "RDTSCP")
_add(_K.RDPID, "RDPID_R32", "RDPID_R64")
_add(_K.PAUSE, "PAUSE")
_add(_K.WBINVD, "WBINVD")
_add(_K.WBNOINVD, "WBNOINVD")
_add(_K.RDRAND, "RDRAND_R16", "RDRAND_R32", "RDRAND_R64")
_add(_K.RDSEED, "RDSEED_R16", "RDSEED_R32", "RDSEED_R64")
_add(_K.LGDT, "LGDT_M1632_16", "LGDT_M1632", "LGDT_M1664")
_add(_K.LIDT, "LIDT_M1632_16", "LIDT_M1632", "LIDT_M1664")
_add(_K.SGDT, "SGDT_M1632_16", "SGDT_M1632", "SGDT_M1664")
_add(_K.SIDT, "SIDT_M1632_16", "SIDT_M1632", "SIDT_M1664")
_add(_K.LLDT, "LLDT_RM16", "LLDT_R32M16", "LLDT_R64M16")
_add(_K.LTR, "LTR_RM16", "LTR_R32M16", "LTR_R64M16")
_add(_K.SLDT, "SLDT_RM16", "SLDT_R32M16", "SLDT_R64M16")
_add(_K.STR, "STR_RM16", "STR_R32M16", "STR_R64M16")
_add(_K.IN, "IN_AL_IMM8", "IN_AX_IMM8", "IN_EAX_IMM8", "IN_AL_DX", "IN_AX_DX", "IN_EAX_DX")
_add(_K.OUT, "OUT_IMM8_AL", "OUT_IMM8_AX", "OUT_IMM8_EAX", "OUT_DX_AL", "OUT_DX_AX", "OUT_DX_EAX")
_add(_K.INS, "INSB_M8_DX", "INSW_M16_DX", "INSD_M32_DX")
_add(_K.OUTS, "OUTSB_DX_M8", "OUTSW_DX_M16", "OUTSD_DX_M32")
_add(_K.RDMSR, "RDMSR")
_add(_K.WRMSR, "WRMSR")
_add(_K.CLTS, "CLTS")
_add(_K.LMSW, "LMSW_RM16", "LMSW_R32M16", "LMSW_R64M16")
_add(_K.SMSW, "SMSW_RM16", "SMSW_R32M16", "SMSW_R64M16")
_add(_K.MOV_TO_DR, "MOV_DR_R32", "MOV_DR_R64")
_add(_K.MOV_FROM_DR, "MOV_R32_DR", "MOV_R64_DR")
_add(_K.XSAVES, "XSAVES_MEM", "XSAVES64_MEM")
_add(_K.XRSTORS, "XRSTORS_MEM", "XRSTORS64_MEM")
_add(_K.UMONITOR, "UMONITOR_R16", "UMONITOR_R32", "UMONITOR_R64")
_add(_K.UMWAIT, "UMWAIT_R32", "UMWAIT_R64")
_add(_K.TPAUSE, "TPAUSE_R32", "TPAUSE_R64")
_add(_K.INT1, "INT1")
_add(_K.STI, "STI")
_add(_K.POPF, "POPFW", "POPFD", "POPFQ")
_add(_K.IRET, "IRETW", "IRETD", "IRETQ")
_add(_K.POP_SS, "POPW_SS", "POPD_SS")
_add(_K.SYSCALL, "SYSCALL")
_add(_K.SYSRET, "SYSRETD", "SYSRETQ")
_add(_K.SYSENTER, "SYSENTER")
_add(_K.SYSEXIT, "SYSEXITD", "SYSEXITQ")
_add(_K.WRFSBASE, "WRFSBASE_R32", "WRFSBASE_R64")
_add(_K.WRGSBASE, "WRGSBASE_R32", "WRGSBASE_R64")

# Control registers VMX can intercept or shadow (SDM 26.1.3 MOV to/from CR0, CR3, CR4, CR8).
_INTERCEPTABLE_CRS = frozenset({0, 3, 4, 8})
_CR0 = int(Register.CR0)
_DR0 = int(Register.DR0)


def _mov_to_cr(instr: Instruction) -> InsnKind | None:
    cr = int(instr.op0_register) - _CR0
    return InsnKind.MOV_TO_CR if cr in _INTERCEPTABLE_CRS else None


def _mov_from_cr(instr: Instruction) -> InsnKind | None:
    cr = int(instr.op1_register) - _CR0
    return InsnKind.MOV_FROM_CR if cr in _INTERCEPTABLE_CRS else None


def _mov_sreg(instr: Instruction) -> InsnKind | None:
    return InsnKind.MOV_SS if instr.op0_register == Register.SS else None


for _name in ("MOV_CR_R32", "MOV_CR_R64"):
    _BY_CODE[int(getattr(Code, _name))] = _mov_to_cr
for _name in ("MOV_R32_CR", "MOV_R64_CR"):
    _BY_CODE[int(getattr(Code, _name))] = _mov_from_cr
for _name in ("MOV_SREG_RM16", "MOV_SREG_R32M16", "MOV_SREG_R64M16"):
    _BY_CODE[int(getattr(Code, _name))] = _mov_sreg


def _classify(instr: Instruction) -> InsnKind | None:
    entry = _BY_CODE.get(instr.code)
    if entry is None or isinstance(entry, InsnKind):
        return entry
    return entry(instr)


# --- registers --------------------------------------------------------------------------------
def _gpr_numbers() -> dict[int, int]:
    table: dict[int, int] = {}
    for first in (Register.AX, Register.EAX, Register.RAX):
        for n in range(16):
            table[int(first) + n] = n
    return table


_GPR_NUMBER = _gpr_numbers()  # 16/32/64-bit GPRs -> 0..15 (8-bit registers are never needed)
_GPR_BITS = {int(Register.AX) + n: 16 for n in range(16)}
_GPR_BITS.update({int(Register.EAX) + n: 32 for n in range(16)})
_GPR_BITS.update({int(Register.RAX) + n: 64 for n in range(16)})
_IP_REGISTERS = frozenset({int(Register.RIP), int(Register.EIP)})
_ES = int(Register.ES)
_OP_REGISTER = int(OpKind.REGISTER)
_OP_MEMORY = int(OpKind.MEMORY)
_OP_IMMEDIATE8 = int(OpKind.IMMEDIATE8)
_CODE_SIZE_BITS = {int(CodeSize.CODE16): 16, int(CodeSize.CODE32): 32, int(CodeSize.CODE64): 64}

# Which operand is ModRM.reg (the SDM's Reg2) for the kinds that have one.
_REG2_OPERAND = {
    InsnKind.VMREAD: 1,
    InsnKind.VMWRITE: 0,
    InsnKind.INVEPT: 0,
    InsnKind.INVVPID: 0,
    InsnKind.INVPCID: 0,
}
_MEMORY_WRITERS = frozenset({
    InsnKind.SGDT, InsnKind.SIDT, InsnKind.SLDT, InsnKind.STR, InsnKind.SMSW,
    InsnKind.VMPTRST, InsnKind.VMREAD, InsnKind.XSAVES, InsnKind.INS,
})
_IO_KINDS = frozenset({InsnKind.IN, InsnKind.OUT, InsnKind.INS, InsnKind.OUTS})
_PORT_KINDS = frozenset({InsnKind.IN, InsnKind.OUT})
_ACCUMULATOR_SIZE = {int(Register.AL): 1, int(Register.AX): 2, int(Register.EAX): 4}
_CR_RANGE = range(int(Register.CR0), int(Register.CR15) + 1)
_DR_RANGE = range(int(Register.DR0), int(Register.DR15) + 1)
_STRING_IO_SIZE = {
    int(Code.INSB_M8_DX): 1, int(Code.INSW_M16_DX): 2, int(Code.INSD_M32_DX): 4,
    int(Code.OUTSB_DX_M8): 1, int(Code.OUTSW_DX_M16): 2, int(Code.OUTSD_DX_M32): 4,
}
_MONITOR_ADDRESS_SIZE = {int(Code.MONITORW): 16, int(Code.MONITORD): 32, int(Code.MONITORQ): 64}
_STRING_OP_KINDS = {
    # op kind -> (segment override applies?, base register, address size)
    int(OpKind.MEMORY_SEG_SI): (True, REG_RSI, 16),
    int(OpKind.MEMORY_SEG_ESI): (True, REG_RSI, 32),
    int(OpKind.MEMORY_SEG_RSI): (True, REG_RSI, 64),
    int(OpKind.MEMORY_SEG_DI): (True, REG_RDI, 16),
    int(OpKind.MEMORY_SEG_EDI): (True, REG_RDI, 32),
    int(OpKind.MEMORY_SEG_RDI): (True, REG_RDI, 64),
    int(OpKind.MEMORY_ESDI): (False, REG_RDI, 16),
    int(OpKind.MEMORY_ESEDI): (False, REG_RDI, 32),
    int(OpKind.MEMORY_ESRDI): (False, REG_RDI, 64),
}
_LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_WRITE_ACCESSES = frozenset({
    int(OpAccess.WRITE), int(OpAccess.COND_WRITE), int(OpAccess.READ_WRITE),
    int(OpAccess.READ_COND_WRITE),
})
_NO_ACCESS = frozenset({int(OpAccess.NONE), int(OpAccess.NO_MEM_ACCESS)})

_opcode_operand_size: dict[int, int] = {}


def _fixed_operand_size(code: int) -> int:
    """The operand size fixed by iced's opcode table (0 when the opcode does not fix one)."""
    size = _opcode_operand_size.get(code)
    if size is None:
        info = OpCodeInfo(code)  # type: ignore[arg-type]
        size = int(info.operand_size)
        if size == 0 and info.mode64 and not (info.mode16 or info.mode32):
            size = 64  # 64-bit-mode-only forms (MOV CR r64, VMREAD r/m64, LGDT m16&64, ...)
        _opcode_operand_size[code] = size
    return size


def _sign_extend(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _prefix_sizes(raw: bytes, bitness: int) -> tuple[int, int]:
    """Default operand and address size after the 66/67 prefixes and REX.W (SDM 2.2.1, 3.6)."""
    opsize66 = addr67 = rex_w = False
    for byte in raw:
        if byte in _LEGACY_PREFIXES:
            opsize66 |= byte == 0x66
            addr67 |= byte == 0x67
            rex_w = False  # a REX prefix is ignored unless it immediately precedes the opcode
        elif bitness == 64 and 0x40 <= byte <= 0x4F:
            rex_w = bool(byte & 8)
        else:
            break
    if bitness == 64:
        return (64 if rex_w else 16 if opsize66 else 32), (32 if addr67 else 64)
    if bitness == 32:
        return (16 if opsize66 else 32), (16 if addr67 else 32)
    return (32 if opsize66 else 16), (32 if addr67 else 16)


_formatter = Formatter(FormatterSyntax.INTEL)
_formatter.space_after_operand_separator = True
_formatter.hex_prefix = "0x"
_formatter.hex_suffix = ""
_formatter.uppercase_hex = False
_formatter.rip_relative_addresses = True


# --- decoding -----------------------------------------------------------------------------------
def _check_bitness(bitness: int) -> None:
    if bitness not in (16, 32, 64):
        raise ValueError(f"bitness must be 16, 32 or 64, not {bitness!r}")


def _explicit_memory(instr: Instruction, address_size: int, bitness: int) -> MemOperand:
    segment = int(instr.memory_segment) - _ES
    base_reg = int(instr.memory_base)
    index_reg = int(instr.memory_index)
    if base_reg in _IP_REGISTERS:
        # iced gives the absolute target; the displacement field is its distance from next IP.
        disp = _sign_extend(instr.memory_displacement - instr.next_ip, 32)
        return MemOperand(segment, None, None, 1, disp, address_size, True, bitness)
    return MemOperand(
        segment,
        _GPR_NUMBER.get(base_reg),
        _GPR_NUMBER.get(index_reg),
        int(instr.memory_index_scale),
        _sign_extend(instr.memory_displacement, address_size),
        address_size,
        False,
        bitness,
    )


def _build(instr: Instruction, raw: bytes, address: int, bitness: int, kind: InsnKind | None) -> DecodedInsn:
    """The full record (slow path: only for sensitive instructions and single decodes)."""
    default_opsize, address_size = _prefix_sizes(raw, bitness)
    code = int(instr.code)
    gpr: int | None = None
    reg2: int | None = None
    cr: int | None = None
    dr: int | None = None
    port: int | None = None
    io_size: int | None = None
    memory: MemOperand | None = None
    gpr_bits = 0
    reg2_index = _REG2_OPERAND.get(kind) if kind is not None else None
    io = kind in _IO_KINDS
    for i in range(instr.op_count):
        op_kind = int(instr.op_kind(i))
        if op_kind == _OP_REGISTER:
            reg = int(instr.op_register(i))
            if io:
                io_size = _ACCUMULATOR_SIZE.get(reg, io_size)
                continue
            number = _GPR_NUMBER.get(reg)
            if number is not None:
                if i == reg2_index:
                    reg2 = number
                else:
                    gpr = number
                gpr_bits = max(gpr_bits, _GPR_BITS[reg])
            elif reg in _CR_RANGE:
                cr = reg - _CR0
            elif reg in _DR_RANGE:
                dr = reg - _DR0
        elif op_kind == _OP_MEMORY:
            memory = _explicit_memory(instr, address_size, bitness)
        elif op_kind == _OP_IMMEDIATE8 and kind in _PORT_KINDS:
            port = int(instr.immediate8)
        elif op_kind in _STRING_OP_KINDS:
            override, base, size = _STRING_OP_KINDS[op_kind]
            segment = int(instr.memory_segment) - _ES if override else SEG_ES
            memory = MemOperand(segment, base, None, 1, 0, size, False, bitness)
    if kind is InsnKind.MONITOR:
        prefix = int(instr.segment_prefix)
        segment = prefix - _ES if prefix != Register.NONE else SEG_DS
        memory = MemOperand(segment, REG_RAX, None, 1, 0, _MONITOR_ADDRESS_SIZE[code], False, bitness)
    if code in _STRING_IO_SIZE:
        io_size = _STRING_IO_SIZE[code]
    if memory is not None:
        address_size = memory.address_size
    operand_size = _fixed_operand_size(code) or gpr_bits or (8 * io_size if io_size else default_opsize)
    rep = code in _STRING_IO_SIZE and (instr.has_rep_prefix or instr.has_repne_prefix)
    return DecodedInsn(
        address=address,
        length=instr.len,
        kind=kind,
        text=_formatter.format(instr),
        operand_size=operand_size,
        address_size=address_size,
        bitness=bitness,
        rep=rep,
        gpr=gpr,
        reg2=reg2,
        cr=cr,
        dr=dr,
        port=port,
        io_size=io_size,
        memory=memory,
        is_write_to_memory=memory is not None and kind in _MEMORY_WRITERS,
        raw=raw,
    )


def _decode_one(code: bytes, address: int, bitness: int) -> Instruction:
    _check_bitness(bitness)
    decoder = Decoder(bitness, bytes(code), ip=address)
    instr = decoder.decode()
    if instr.is_invalid:
        raise DecodeError(address, bytes(code), bitness)
    return instr


def decode(code: bytes, address: int, bitness: int) -> DecodedInsn:
    """Decode the first instruction of ``code`` (at linear address ``address``) in 16-, 32- or
    64-bit code.  Bytes after the instruction are ignored.  Raises :class:`DecodeError` if the
    bytes are not a valid instruction (including a truncated one)."""
    instr = _decode_one(code, address, bitness)
    return _build(instr, bytes(code[: instr.len]), address, bitness, _classify(instr))


def scan_block(
    code: bytes, address: int, bitness: int, max_instructions: int
) -> tuple[list[int], list[DecodedInsn]]:
    """Decode a translated block: the addresses of all its instructions (for instruction
    counting) and the decoded sensitive ones.  Stops after ``max_instructions``, at the end of
    ``code`` or at bytes that are not a (complete) valid instruction."""
    _check_bitness(bitness)
    data = bytes(code)
    decoder = Decoder(bitness, data, ip=address)
    instr = Instruction()
    addresses: list[int] = []
    sensitive: list[DecodedInsn] = []
    by_code = _BY_CODE
    while len(addresses) < max_instructions and decoder.can_decode:
        offset = decoder.position
        decoder.decode_out(instr)
        if instr.is_invalid:
            break
        addresses.append(address + offset)
        entry = by_code.get(instr.code)
        if entry is None:
            continue
        kind = entry if isinstance(entry, InsnKind) else entry(instr)
        if kind is not None:
            raw = data[offset : offset + instr.len]
            sensitive.append(_build(instr, raw, address + offset, bitness, kind))
    return addresses, sensitive


# --- memory accesses of any instruction -----------------------------------------------------------
_info_factory = InstructionInfoFactory()


def memory_operands(insn_bytes: bytes, address: int, bitness: int) -> list[MemAccess]:
    """Every memory access of the instruction at the start of ``insn_bytes``: explicit operands
    and implicit ones (stack pushes and pops, string operands), in iced's order.  Operands that
    do not access memory (LEA, hint NOPs) are left out, and so are the processor's own system
    accesses (descriptor tables, paging structures)."""
    instr = _decode_one(insn_bytes, address, bitness)
    ip_rel_target = instr.ip_rel_memory_address if instr.is_ip_rel_memory_operand else None
    element = int(MemorySizeExt.size(instr.memory_size)) if instr.is_string_instruction else 0
    accesses: list[MemAccess] = []
    for used in _info_factory.info(instr).used_memory():
        access = int(used.access)
        if access in _NO_ACCESS:
            continue
        address_size = _CODE_SIZE_BITS.get(int(used.address_size), bitness)
        size = int(MemorySizeExt.size(used.memory_size)) or element
        base_reg, index_reg = int(used.base), int(used.index)
        segment = int(used.segment) - _ES
        write = access in _WRITE_ACCESSES
        if (
            ip_rel_target is not None
            and base_reg == Register.NONE
            and index_reg == Register.NONE
            and used.displacement == ip_rel_target
        ):
            disp = _sign_extend(used.displacement - instr.next_ip, 32)
            accesses.append(MemAccess(segment, None, None, 1, disp, address_size, size, write, True, bitness))
            continue
        accesses.append(
            MemAccess(
                segment,
                _GPR_NUMBER.get(base_reg),
                _GPR_NUMBER.get(index_reg),
                int(used.scale),
                _sign_extend(used.displacement, address_size),
                address_size,
                size,
                write,
                False,
                bitness,
            )
        )
    return accesses


def effective_address(
    m: MemAccess | MemOperand,
    regs: Sequence[int],
    segment_bases: Sequence[int],
    rip_next: int,
) -> int:
    """The linear address of a memory operand (SDM 3.7.5, 3.3.7).

    ``regs`` are the 16 GPRs in encoding order, ``segment_bases`` the 6 segment bases in
    ES, CS, SS, DS, FS, GS order, ``rip_next`` the RIP of the next instruction (for
    RIP-relative operands).  The effective address wraps at the address size; in 64-bit mode
    only FS and GS contribute a base and the sum wraps at 64 bits, elsewhere it wraps at 32.
    """
    address_mask = (1 << m.address_size) - 1
    if m.rip_relative:
        ea = rip_next + m.displacement
    else:
        ea = m.displacement
        if m.base is not None:
            ea += regs[m.base]
        if m.index is not None:
            ea += regs[m.index] * m.scale
    ea &= address_mask
    if m.bitness == 64:
        base = segment_bases[m.segment] if m.segment in (SEG_FS, SEG_GS) else 0
        return (base + ea) & _MASK64
    return (segment_bases[m.segment] + ea) & 0xFFFFFFFF


# --- near branches ----------------------------------------------------------------------------------
class NearBranch(enum.Enum):
    """What a near control transfer did besides loading RIP (SDM Vol. 2A CALL, JMP, Jcc, RET)."""

    JUMP = enum.auto()  # JMP, Jcc: nothing else
    CALL = enum.auto()  # pushed the return address
    RETURN = enum.auto()  # popped it, and released imm16 more bytes


_RET_STACK_BYTES = {
    int(Code.RETNQ): 8, int(Code.RETNQ_IMM16): 8, int(Code.RETND): 4, int(Code.RETND_IMM16): 4,
    int(Code.RETNW): 2, int(Code.RETNW_IMM16): 2,
}


def near_branch(code: bytes, address: int, bitness: int) -> tuple[NearBranch, int, int] | None:
    """The near branch at the start of ``code``: its kind, length, and the bytes of stack it
    pushed (CALL) or released (RET); None for anything else (far transfers, LOOP, ...)."""
    try:
        instr = _decode_one(code, address, bitness)
    except DecodeError:
        return None
    ret = _RET_STACK_BYTES.get(int(instr.code))
    if ret is not None:
        extra = int(instr.immediate16) if instr.op_count else 0
        return NearBranch.RETURN, instr.len, ret + extra
    if instr.is_call_near or instr.is_call_near_indirect:
        size = 8 if bitness == 64 else (_prefix_sizes(bytes(code[: instr.len]), bitness)[0] // 8)
        return NearBranch.CALL, instr.len, size
    if instr.is_jmp_short_or_near or instr.is_jmp_near_indirect or instr.is_jcc_short_or_near:
        return NearBranch.JUMP, instr.len, 0
    return None
