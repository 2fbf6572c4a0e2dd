"""Register layouts of the GDB stub and the target descriptions that announce them.

gdb learns the layout of the 'g' packet from a target description (gdb manual, "Target
Descriptions"), read with ``qXfer:features:read:target.xml``, as QEMU's gdbstub serves one: the
registers in the order of the XML are the registers of the 'g' packet.  The features are those
gdb's i386 support knows ("i386 Features": ``org.gnu.gdb.i386.core``, ``.sse``,
``.segments``), plus the guest's control registers and EFER in ``org.pyvmx.system`` (read-only;
gdb shows a feature it does not know as plain registers).

The layout follows the vCPU's mode when gdb connects: ``i386:x86-64`` in IA-32e mode, ``i386``
in 32-bit protected mode and ``i8086`` in real mode (gdb then disassembles 16-bit code); the
last two use the 32-bit register set (eax, ecx, edx, ebx, esp, ebp, esi, edi, eip, ...).
:data:`LEGACY` is the layout gdb assumes for amd64 when no description is read.
"""

from __future__ import annotations

from dataclasses import dataclass

_CORE, _SSE, _SEGMENTS, _SYSTEM = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments", "org.pyvmx.system"
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_DEFAULTS = {"fctrl": 0x37F, "mxcsr": 0x1F80}  # after FNINIT and at reset (SDM 8.1.5, 10.2.3)
_ALIASES = {"eax": "rax", "ecx": "rcx", "edx": "rdx", "ebx": "rbx", "esp": "rsp", "ebp": "rbp",
            "esi": "rsi", "edi": "rdi", "eip": "rip"}  # 32-bit names -> the target's register


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""
    writable: bool = True

    @property
    def size(self) -> int:
        return self.bits // 8

    @property
    def source(self) -> str:
        """The name of the target register that holds the value."""
        return _ALIASES.get(self.name, self.name)


@dataclass(frozen=True, slots=True)
class Layout:
    architecture: str
    registers: tuple[Register, ...]

    def encode(self, values: dict[str, int]) -> str:
        """The 'g' packet: every register, little-endian, in order."""
        return "".join(encode_value(self.value(reg, values), reg.size) for reg in self.registers)

    @staticmethod
    def value(reg: Register, values: dict[str, int]) -> int:
        return values.get(reg.source, _DEFAULTS.get(reg.name, 0))

    def decode(self, data: bytes, current: dict[str, int]) -> dict[str, int]:
        """The writable registers a 'G' packet carries (it may stop short, as gdb allows)."""
        out, offset = {}, 0
        for reg in self.registers:
            if offset + reg.size > len(data):
                break
            if reg.writable:
                out[reg.source] = merge(reg, int.from_bytes(data[offset : offset + reg.size], "little"), current)
            offset += reg.size
        return out

    def xml(self) -> str:
        parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
                 f"<architecture>{self.architecture}</architecture>", "<osabi>none</osabi>"]
        feature = ""
        for number, reg in enumerate(self.registers):
            if reg.feature != feature:
                if feature:
                    parts.append("</feature>")
                feature = reg.feature
                parts.append(f'<feature name="{feature}">')
                parts.extend(_TYPES.get(feature, ()))
            group = f' group="{reg.group}"' if reg.group else ""
            parts.append(f'<reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" regnum="{number}"{group}/>')
        parts += ["</feature>", "</target>"]
        return "\n".join(parts) + "\n"


def encode_value(value: int, size: int) -> str:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex()


def merge(reg: Register, value: int, current: dict[str, int]) -> int:
    """The target register's new value: a 32-bit view (eax of rax ...) keeps the upper half,
    as a 32-bit write would not touch it while the vCPU is outside 64-bit mode."""
    if reg.source == reg.name:
        return value
    return (current.get(reg.source, 0) & ~((1 << reg.bits) - 1)) | value


def _flags(ident: str, names: dict[int, str]) -> str:
    fields = "".join(f'<field name="{name}" start="{bit}" end="{bit}"/>' for bit, name in sorted(names.items()))
    return f'<flags id="{ident}" size="4">{fields}</flags>'


# RFLAGS (SDM 3.4.3) and MXCSR (SDM 10.2.3) bit names.
_EFLAGS = {0: "CF", 1: "", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF", 11: "OF",
           14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID"}
_MXCSR = {0: "IE", 1: "DE", 2: "ZE", 3: "OE", 4: "UE", 5: "PE", 6: "DAZ", 7: "IM", 8: "DM", 9: "ZM",
          10: "OM", 11: "UM", 12: "PM", 15: "FZ"}
_VEC128 = ('<vector id="v4f" type="ieee_single" count="4"/>', '<vector id="v2d" type="ieee_double" count="2"/>',
           '<vector id="v16i8" type="int8" count="16"/>', '<vector id="v8i16" type="int16" count="8"/>',
           '<vector id="v4i32" type="int32" count="4"/>', '<vector id="v2i64" type="int64" count="2"/>',
           '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
           '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
           '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
           '<field name="uint128" type="uint128"/></union>')
_TYPES = {_CORE: (_flags("i386_eflags", _EFLAGS),), _SSE: (*_VEC128, _flags("i386_mxcsr", _MXCSR))}


def _tail(xmm: int) -> list[Register]:
    """eflags, the selectors, x87 and SSE state: the same in both register sets."""
    regs = [Register("eflags", 32, "i386_eflags", _CORE, "general")]
    regs += [Register(s, 32, "int32", _CORE, "general") for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    regs += [Register(f"st{i}", 80, "i387_ext", _CORE, writable=False) for i in range(8)]
    regs += [Register(name, 32, "int", _CORE, "float", writable=False) for name in _X87_CONTROL]
    regs += [Register(f"xmm{i}", 128, "vec128", _SSE, "vector", writable=False) for i in range(xmm)]
    regs.append(Register("mxcsr", 32, "i386_mxcsr", _SSE, "vector", writable=False))
    return regs


def _amd64_core() -> list[Register]:
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{i}" for i in range(8, 16)))
    regs = [Register(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", _CORE, "general") for n in names]
    return [*regs, Register("rip", 64, "code_ptr", _CORE, "general"), *_tail(16)]


def _system(bits: int) -> list[Register]:
    return [Register(name, bits, f"int{bits}", _SYSTEM, "system", writable=False) for name in ("cr0", "cr3", "cr4", "efer")]


LEGACY = Layout("i386:x86-64", tuple(_amd64_core()))
"""gdb's amd64 'g' packet without a description: 57 registers, 536 bytes."""

AMD64 = Layout("i386:x86-64", (*_amd64_core(), Register("fs_base", 64, "int", _SEGMENTS, "system", writable=False),
                               Register("gs_base", 64, "int", _SEGMENTS, "system", writable=False), *_system(64)))

_I386_CORE = [Register(n, 32, "data_ptr" if n in ("esp", "ebp") else "int32", _CORE, "general")
              for n in ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")]
I386 = Layout("i386", (*_I386_CORE, Register("eip", 32, "code_ptr", _CORE, "general"), *_tail(8), *_system(32)))
I8086 = Layout("i8086", I386.registers)


def layout_for(bitness: int) -> Layout:
    """The description for a vCPU whose code size is ``bitness`` (16, 32 or 64; SDM 3.4.5)."""
    return {64: AMD64, 32: I386}.get(bitness, I8086)
