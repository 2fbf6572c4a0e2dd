"""The MMIO emulator against a made-up vCPU (no CPU engine): each instruction form, table-driven,
in 64-, 32- and 16-bit code; VMM exits and their completion; faults; what it refuses.

Linux: arch/x86/kvm/emulate.c (x86_decode_insn(), x86_emulate_insn(), em_mov, em_add ...,
string_insn_completed()), arch/x86/kvm/x86.c (emulator_read_write(), complete_emulated_mmio()).
SDM Vol. 2 for each instruction; Vol. 1 3.4.3 (RFLAGS), 7.3.9 (string operations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given

from pyvmx.guest.assemble import assemble
from pyvmx.kvm.mmu.emulate import (
    X86_EFLAGS_CF,
    X86_EFLAGS_DF,
    X86_EFLAGS_OF,
    X86_EFLAGS_PF,
    X86_EFLAGS_SF,
    X86_EFLAGS_ZF,
    EmulationResult,
    MmioEmulator,
    alu,
    code_bitness,
    gpr_index,
)

from tests.kvm.mmu.strategies import alu_operands

MMIO = 0x4000_0000  # in reach of RIP-relative addressing from the code at 0x1000
CODE = 0x1000


@dataclass
class FakeVcpu:
    """An EmulatorContext: identity paging (linear = guest-physical) except ``unmapped`` pages,
    sparse RAM everywhere but the MMIO page(s), a register-bank device in them."""

    bitness_: int = 64
    regs: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = CODE
    rflags: int = 0x2
    segments: list[int] = field(default_factory=lambda: [0] * 6)
    ram: dict[int, bytearray] = field(default_factory=dict)
    mmio_pages: tuple[int, ...] = (MMIO,)
    device: bytearray = field(default_factory=lambda: bytearray(range(256)) * 16)
    in_kernel: bool = True
    log: list[tuple[str, int, int, int]] = field(default_factory=list)
    unmapped: set[int] = field(default_factory=set)

    def load(self, code: bytes, at: int = CODE) -> None:
        self.write_linear(at, code)

    def read_gpr(self, index: int) -> int:
        return self.regs[index]

    def write_gpr(self, index: int, value: int) -> None:
        assert 0 <= value < 1 << 64
        self.regs[index] = value

    def read_rip(self) -> int:
        return self.rip

    def write_rip(self, value: int) -> None:
        self.rip = value

    def read_rflags(self) -> int:
        return self.rflags

    def write_rflags(self, value: int) -> None:
        self.rflags = value

    def bitness(self) -> int:
        return self.bitness_

    def segment_base(self, segment: int) -> int:
        return self.segments[segment]

    def translate(self, linear: int, write: bool) -> int | None:
        return None if linear & ~0xFFF in self.unmapped else linear

    def _page(self, gpa: int) -> bytearray:
        return self.ram.setdefault(gpa & ~0xFFF, bytearray(4096))

    def read_linear(self, linear: int, size: int) -> bytes | None:
        out = bytearray()
        for address in range(linear, linear + size):
            if address & ~0xFFF in self.unmapped:
                return None
            out.append(self._page(address)[address & 0xFFF])
        return bytes(out)

    def write_linear(self, linear: int, data: bytes) -> bool:
        for i, byte in enumerate(data):
            if (linear + i) & ~0xFFF in self.unmapped:
                return False
            self._page(linear + i)[(linear + i) & 0xFFF] = byte
        return True

    def ram_read(self, gpa: int, size: int) -> int:
        data = self.read_linear(gpa, size)
        assert data is not None
        return int.from_bytes(data, "little")

    def is_mmio(self, gpa: int, write: bool) -> bool:
        return gpa & ~0xFFF in self.mmio_pages

    def _offset(self, gpa: int) -> int:
        return self.mmio_pages.index(gpa & ~0xFFF) * 0x1000 + (gpa & 0xFFF)

    def dev(self, gpa: int, size: int) -> int:
        off = self._offset(gpa)
        return int.from_bytes(self.device[off : off + size], "little")

    def mmio_read(self, gpa: int, size: int) -> int | None:
        if not self.in_kernel:
            return None
        value = self.dev(gpa, size)
        self.log.append(("r", gpa, size, value))
        return value

    def mmio_write(self, gpa: int, size: int, value: int) -> bool:
        if not self.in_kernel:
            return False
        off = self._offset(gpa)
        self.device[off : off + size] = value.to_bytes(size, "little")
        self.log.append(("w", gpa, size, value))
        return True


def vcpu_for(source: str, bitness: int = 64, **regs: int) -> FakeVcpu:
    directive = {16: ".code16", 32: ".code32", 64: ".code64"}[bitness]
    image = assemble(f"{directive}\n{source}\n", CODE)
    vcpu = FakeVcpu(bitness_=bitness)
    vcpu.load(image.code)
    for name, value in regs.items():
        if name == "rflags":
            vcpu.rflags = value
        else:
            vcpu.regs[gpr_index(name)] = value
    vcpu.symbols = image.symbols  # type: ignore[attr-defined]
    return vcpu


def run_one(vcpu: FakeVcpu, gpa: int | None = None) -> None:
    outcome = MmioEmulator().emulate(vcpu, gpa)
    assert outcome.result is EmulationResult.DONE, outcome
    assert outcome.rip_advanced


B = MMIO  # %rbx in most rows
# (id, asm, registers before, expected registers after, expected device log)
FORMS_64 = [
    ("mov r32 -> m", "mov %eax, 4(%rbx)", {"rax": 0xAABBCCDD_11223344, "rbx": B}, {}, [("w", B + 4, 4, 0x11223344)]),
    ("mov m -> r64", "mov 8(%rbx), %rcx", {"rbx": B}, {"rcx": 0x0F0E0D0C_0B0A0908}, [("r", B + 8, 8, 0x0F0E0D0C_0B0A0908)]),
    ("mov m -> r32 zero-extends", "mov (%rbx), %ecx", {"rbx": B, "rcx": -1 & (2**64 - 1)}, {"rcx": 0x03020100}, None),
    ("mov m -> r16 keeps upper", "mov 2(%rbx), %cx", {"rbx": B, "rcx": 0xFFFF_FFFF_FFFF_FFFF}, {"rcx": 0xFFFF_FFFF_FFFF_0302}, None),
    ("mov m -> r8 high", "mov 5(%rbx), %ah", {"rbx": B, "rax": 0x1111}, {"rax": 0x0511}, None),
    ("mov r8 high -> m", "mov %bh, 1(%rsi)", {"rsi": B, "rbx": 0x7700}, {}, [("w", B + 1, 1, 0x77)]),
    ("mov r8 rex -> m", "mov %sil, (%rbx)", {"rbx": B, "rsi": 0x99}, {}, [("w", B, 1, 0x99)]),
    ("mov r64 ext -> m sib", "mov %r9, 0x10(%rbx,%rcx,8)", {"rbx": B, "rcx": 2, "r9": 0x123456789}, {}, [("w", B + 0x20, 8, 0x123456789)]),
    ("mov m sib no base", "mov 0x40000000(,%rdx,2), %eax", {"rdx": 8}, {"rax": 0x13121110}, None),
    ("mov imm8 -> m", "movb $0x5a, 3(%rbx)", {"rbx": B}, {}, [("w", B + 3, 1, 0x5A)]),
    ("mov imm16 -> m", "movw $0xbeef, (%rbx)", {"rbx": B}, {}, [("w", B, 2, 0xBEEF)]),
    ("mov imm32 -> m", "movl $0xdeadbeef, (%rbx)", {"rbx": B}, {}, [("w", B, 4, 0xDEADBEEF)]),
    ("mov imm32 sign-extended -> m64", "movq $-2, (%rbx)", {"rbx": B}, {}, [("w", B, 8, 0xFFFF_FFFF_FFFF_FFFE)]),
    ("mov moffs64 -> al", "movabs 0x40000007, %al", {"rax": 0xFF00}, {"rax": 0xFF07}, None),
    ("mov moffs64 -> rax", "movabs 0x40000010, %rax", {}, {"rax": 0x17161514_13121110}, None),
    ("mov eax -> moffs64", "movabs %eax, 0x40000020", {"rax": 0xCAFE}, {}, [("w", B + 0x20, 4, 0xCAFE)]),
    ("mov rip-relative load (mov disp32(%rip), %edx)", ".byte 0x8b, 0x15\n.long 0x40000030 - 1f\n1:", {}, {"rdx": 0x33323130}, None),
    ("mov rip-relative store (movw $7, disp32(%rip))", ".byte 0x66, 0xc7, 0x05\n.long 0x40000030 - 1f\n.word 7\n1:", {}, {}, [("w", B + 0x30, 2, 7)]),
    ("mov fs-relative", "mov %fs:0x8, %eax", {}, {"rax": 0x0B0A0908}, None),
    ("movzx byte", "movzbl 0x80(%rbx), %eax", {"rbx": B, "rax": 2**64 - 1}, {"rax": 0x80}, None),
    ("movzx word -> r64", "movzwq 0x80(%rbx), %rax", {"rbx": B}, {"rax": 0x8180}, None),
    ("movsx byte", "movsbl 0x80(%rbx), %ecx", {"rbx": B}, {"rcx": 0xFFFFFF80}, None),
    ("movsx word -> r64", "movswq 0xfe(%rbx), %rcx", {"rbx": B}, {"rcx": 0xFFFF_FFFF_FFFF_FFFE}, None),
    ("movsxd", "movslq 0xfc(%rbx), %rdx", {"rbx": B}, {"rdx": 0xFFFF_FFFF_FFFE_FDFC}, None),
    ("xchg m, r32", "xchg %eax, (%rbx)", {"rbx": B, "rax": 0x55}, {"rax": 0x03020100}, [("r", B, 4, 0x03020100), ("w", B, 4, 0x55)]),
    ("xchg r8, m", "xchg 9(%rbx), %cl", {"rbx": B, "rcx": 0x1FF}, {"rcx": 0x109}, [("r", B + 9, 1, 9), ("w", B + 9, 1, 0xFF)]),
    ("add r -> m", "add %eax, (%rbx)", {"rbx": B, "rax": 1}, {}, [("r", B, 4, 0x03020100), ("w", B, 4, 0x03020101)]),
    ("add m -> r", "add 8(%rbx), %rax", {"rbx": B, "rax": 1}, {"rax": 0x0F0E0D0C_0B0A0909}, None),
    ("sub imm8 -> m64", "subq $1, 0x10(%rbx)", {"rbx": B}, {}, [("r", B + 0x10, 8, 0x17161514_13121110), ("w", B + 0x10, 8, 0x17161514_1312110F)]),
    ("and imm -> m8", "andb $0x0f, 0x3f(%rbx)", {"rbx": B}, {}, [("r", B + 0x3F, 1, 0x3F), ("w", B + 0x3F, 1, 0x0F)]),
    ("or r16 -> m", "or %cx, 0x20(%rbx)", {"rbx": B, "rcx": 0x8000}, {}, [("r", B + 0x20, 2, 0x2120), ("w", B + 0x20, 2, 0xA120)]),
    ("xor m -> r", "xor (%rbx), %edx", {"rbx": B, "rdx": 0x03020100}, {"rdx": 0}, None),
    ("cmp writes nothing", "cmpq $0, (%rbx)", {"rbx": B}, {}, [("r", B, 8, 0x07060504_03020100)]),
    ("test writes nothing", "testl $0x80000000, 0xfc(%rbx)", {"rbx": B}, {}, [("r", B + 0xFC, 4, 0xFFFEFDFC)]),
    ("inc m8", "incb 0xff(%rbx)", {"rbx": B}, {}, [("r", B + 0xFF, 1, 0xFF), ("w", B + 0xFF, 1, 0)]),
    ("dec m16", "decw (%rbx)", {"rbx": B}, {}, [("r", B, 2, 0x0100), ("w", B, 2, 0x00FF)]),
    ("not m32", "notl (%rbx)", {"rbx": B}, {}, [("r", B, 4, 0x03020100), ("w", B, 4, 0xFCFDFEFF)]),
    ("neg m64", "negq (%rbx)", {"rbx": B}, {}, [("r", B, 8, 0x07060504_03020100), ("w", B, 8, 0xF8F9FAFB_FCFDFF00)]),
    ("adc with carry", "adcl $0, (%rbx)", {"rbx": B, "rflags": 0x3}, {}, [("r", B, 4, 0x03020100), ("w", B, 4, 0x03020101)]),
    ("sbb with carry", "sbbb $0, 1(%rbx)", {"rbx": B, "rflags": 0x3}, {}, [("r", B + 1, 1, 1), ("w", B + 1, 1, 0)]),
]


@pytest.mark.parametrize(("asm", "before", "after", "log"), [f[1:] for f in FORMS_64], ids=[f[0] for f in FORMS_64])
def test_forms_64(asm: str, before: dict[str, int], after: dict[str, int], log: list[tuple[str, int, int, int]] | None) -> None:
    """emulate.c: MOV (all widths, both directions, immediates, moffs, SIB, RIP- and FS-relative),
    MOVZX/MOVSX/MOVSXD, XCHG and the read-modify-write ALU forms against an MMIO register bank;
    registers are written as the SDM says (32-bit writes zero-extend, 8/16-bit ones merge)."""
    vcpu = vcpu_for(asm, **before)
    vcpu.segments[4] = MMIO  # FS base
    expected = list(vcpu.regs)
    for name, value in after.items():
        expected[gpr_index(name)] = value
    run_one(vcpu)
    assert vcpu.regs == expected
    if log is not None:
        assert vcpu.log == log
    assert vcpu.rip > CODE


def flags_of(vcpu: FakeVcpu) -> set[str]:
    names = {"CF": X86_EFLAGS_CF, "PF": X86_EFLAGS_PF, "ZF": X86_EFLAGS_ZF, "SF": X86_EFLAGS_SF, "OF": X86_EFLAGS_OF}
    return {name for name, bit in names.items() if vcpu.rflags & bit}


@pytest.mark.parametrize(
    ("asm", "device_value", "flags"),
    [
        ("addb $1, (%rbx)", 0x7F, {"SF", "OF"}),  # 0x80: signed overflow; PF: 0x80 has one bit
        ("addb $1, (%rbx)", 0xFF, {"CF", "ZF", "PF"}),
        ("subl $1, (%rbx)", 0, {"CF", "SF", "PF"}),
        ("cmpw $0x8000, (%rbx)", 0x7FFF, {"CF", "SF", "OF", "PF"}),
        ("andq $0, (%rbx)", 0x1234, {"ZF", "PF"}),
        ("testb $0x80, (%rbx)", 0x80, {"SF"}),
        ("incb (%rbx)", 0x7F, {"SF", "OF"}),  # CF untouched (clear before)
        ("negl (%rbx)", 5, {"CF", "SF"}),  # 0x...FB: seven bits set in the low byte
    ],
)
def test_arithmetic_flags(asm: str, device_value: int, flags: set[str]) -> None:
    """SDM Vol. 1 3.4.3.1: CF, PF, ZF, SF, OF after each arithmetic form on an MMIO operand."""
    vcpu = vcpu_for(asm, rbx=MMIO)
    vcpu.device[0:8] = device_value.to_bytes(8, "little")
    run_one(vcpu)
    assert flags_of(vcpu) == flags


@given(alu_operands())
def test_alu_matches_integer_semantics(case: tuple[str, int, int, int, bool]) -> None:
    """The ALU against the definitions (SDM Vol. 2): the result modulo 2^n, CF as unsigned
    overflow/borrow, OF as signed overflow, ZF/SF/PF from the result."""
    op, size, a, b, carry = case
    bits = 8 * size
    m = (1 << bits) - 1

    def signed(v: int) -> int:
        return v - (1 << bits) if v >> (bits - 1) else v

    c = 1 if carry and op in ("ADC", "SBB") else 0
    exact = {
        "ADD": (a + b, signed(a) + signed(b)), "ADC": (a + b + c, signed(a) + signed(b) + c),
        "SUB": (a - b, signed(a) - signed(b)), "SBB": (a - b - c, signed(a) - signed(b) - c),
        "CMP": (a - b, signed(a) - signed(b)),
    }
    result, flags = alu(op, a, b, size, X86_EFLAGS_CF if carry else 0)
    if op in exact:
        unsigned_value, signed_value = exact[op]
        assert result == unsigned_value & m
        assert bool(flags & X86_EFLAGS_CF) == (not 0 <= unsigned_value <= m)
        assert bool(flags & X86_EFLAGS_OF) == (not -(1 << (bits - 1)) <= signed_value < 1 << (bits - 1))
    else:
        assert result == {"AND": a & b, "OR": a | b, "XOR": a ^ b, "TEST": a & b}[op]
        assert not flags & (X86_EFLAGS_CF | X86_EFLAGS_OF)
    assert bool(flags & X86_EFLAGS_ZF) == (result == 0)
    assert bool(flags & X86_EFLAGS_SF) == bool(result >> (bits - 1))
    assert bool(flags & X86_EFLAGS_PF) == (bin(result & 0xFF).count("1") % 2 == 0)


# --- strings ---------------------------------------------------------------------------------------
def test_rep_stos_to_mmio_updates_rcx_rdi() -> None:
    """emulate.c em_stos + REP (string_insn_completed()): each element written, RDI advanced by
    the element size, RCX counted down to 0, RIP past the instruction."""
    vcpu = vcpu_for("rep stosl", rax=0xA5A5_5A5A_1234_5678, rcx=3, rdi=MMIO + 0x40)
    run_one(vcpu, MMIO + 0x40)
    assert vcpu.log == [("w", MMIO + 0x40 + 4 * i, 4, 0x12345678) for i in range(3)]
    assert vcpu.regs[1] == 0 and vcpu.regs[7] == MMIO + 0x4C


def test_rep_stos_backwards_with_df() -> None:
    """DF = 1 (SDM 7.3.9): the string goes down."""
    vcpu = vcpu_for("rep stosw", rax=0xBEEF, rcx=2, rdi=MMIO + 0x10, rflags=0x2 | X86_EFLAGS_DF)
    run_one(vcpu)
    assert [entry[1] for entry in vcpu.log] == [MMIO + 0x10, MMIO + 0x0E]
    assert vcpu.regs[7] == MMIO + 0x0C


def test_rep_movs_ram_to_mmio_and_back() -> None:
    """MOVS with one side RAM (memcpy_toio / memcpy_fromio): the RAM side goes through guest
    linear memory, the MMIO side to the device; RSI, RDI, RCX all advance."""
    vcpu = vcpu_for("rep movsq", rcx=3, rsi=0x8000, rdi=MMIO + 0x100)
    vcpu.write_linear(0x8000, b"".join(n.to_bytes(8, "little") for n in (11, 22, 33)))
    run_one(vcpu)
    assert vcpu.log == [("w", MMIO + 0x100 + 8 * i, 8, v) for i, v in enumerate((11, 22, 33))]
    assert (vcpu.regs[1], vcpu.regs[6], vcpu.regs[7]) == (0, 0x8018, MMIO + 0x118)

    back = vcpu_for("rep movsw", rcx=4, rsi=MMIO + 2, rdi=0x9000)
    run_one(back)
    assert back.read_linear(0x9000, 8) == bytes(range(2, 10))
    assert [entry[0] for entry in back.log] == ["r"] * 4


def test_movs_mmio_to_mmio_and_lods() -> None:
    """MOVSB between two device pages; LODSD loads the accumulator (32-bit: zero-extends)."""
    vcpu = vcpu_for("movsb", rsi=MMIO + 1, rdi=MMIO + 0x1000 + 7)
    vcpu.mmio_pages = (MMIO, MMIO + 0x1000)
    run_one(vcpu)
    assert vcpu.log == [("r", MMIO + 1, 1, 1), ("w", MMIO + 0x1007, 1, 1)]
    lods = vcpu_for("lodsl", rsi=MMIO + 4, rax=2**64 - 1)
    run_one(lods)
    assert lods.regs[0] == 0x07060504 and lods.regs[6] == MMIO + 8


def test_rep_with_32bit_address_size_in_64bit_mode() -> None:
    """67h prefix: ECX/EDI count and advance, written as 32-bit registers (SDM 3.6, 7.3.9)."""
    vcpu = vcpu_for("addr32 rep stosb", rax=0x42, rcx=0xFFFF_FFFF_0000_0002, rdi=0xFFFF_FFFF_0000_0000 | MMIO)
    run_one(vcpu)
    assert [entry[1] for entry in vcpu.log] == [MMIO, MMIO + 1]
    assert vcpu.regs[1] == 0 and vcpu.regs[7] == MMIO + 2


def test_rep_with_zero_count_does_nothing() -> None:
    """SDM Vol. 2 REP: with (E/R)CX = 0 no element is touched and the instruction completes."""
    vcpu = vcpu_for("rep stosq", rcx=0, rdi=MMIO)
    run_one(vcpu)
    assert vcpu.log == [] and vcpu.rip == CODE + 3


# --- other modes -------------------------------------------------------------------------------------
def test_32bit_code_with_segment_bases() -> None:
    """32-bit code: DS and ES bases are added (SDM 3.4.2); STOS uses ES:EDI, MOV uses DS."""
    vcpu = vcpu_for("mov %eax, 0x10(%ebx)\nstosw", bitness=32, rax=0xC0DE, rbx=0x100, rdi=0x200)
    vcpu.segments[3] = MMIO - 0x100  # DS
    vcpu.segments[0] = MMIO - 0x200  # ES
    run_one(vcpu)
    run_one(vcpu)
    assert vcpu.log == [("w", MMIO + 0x10, 4, 0xC0DE), ("w", MMIO, 2, 0xC0DE)]
    assert vcpu.regs[7] == 0x202 and vcpu.rip == CODE + 3 + 2


def test_16bit_code_addressing() -> None:
    """16-bit code: [bx+si+disp] wraps at 64K, the 66h prefix gives 32-bit operands, and the
    segment base is the real-mode selector * 16."""
    vcpu = vcpu_for("mov %ax, 2(%bx,%si)\nmovl 4(%bx), %ecx", bitness=16, rax=0x1234, rbx=0xFFFE, rsi=4, rcx=0)
    vcpu.segments[3] = MMIO - 0x10000 + 0x0
    vcpu.mmio_pages = (MMIO - 0x10000,)
    run_one(vcpu)
    assert vcpu.log == [("w", MMIO - 0x10000 + 4, 2, 0x1234)]
    run_one(vcpu)  # 4 + 0xFFFE wraps to 2: bytes 2, 3 and the 0x1234 just written
    assert vcpu.regs[1] == 0x12340302
    assert code_bitness(cr0_pe=False, efer_lma=False, cs_l=False, cs_d=True) == 16
    assert code_bitness(cr0_pe=True, efer_lma=True, cs_l=True, cs_d=False) == 64
    assert code_bitness(cr0_pe=True, efer_lma=True, cs_l=False, cs_d=True) == 32


# --- the VMM side ---------------------------------------------------------------------------------------
def test_read_exits_to_vmm_and_completes_with_its_data() -> None:
    """x86.c: no in-kernel device -> KVM_EXIT_MMIO (vcpu->mmio_needed); the instruction is not
    retired until complete_userspace_io() (complete_emulated_mmio()) supplies the data."""
    vcpu = vcpu_for("add 8(%rbx), %eax", rbx=MMIO, rax=1)
    vcpu.in_kernel = False
    emulator = MmioEmulator()
    outcome = emulator.emulate(vcpu, MMIO + 8)
    assert outcome.result is EmulationResult.USER_EXIT and outcome.mmio is not None
    assert (outcome.mmio.gpa, outcome.mmio.size, outcome.mmio.is_write) == (MMIO + 8, 4, False)
    assert vcpu.rip == CODE and vcpu.regs[0] == 1 and emulator.pending == outcome.mmio
    with pytest.raises(RuntimeError):
        emulator.emulate(vcpu, MMIO + 8)
    done = emulator.complete_userspace_io(vcpu, (41).to_bytes(4, "little"))
    assert done.result is EmulationResult.DONE and vcpu.regs[0] == 42 and vcpu.rip == CODE + 3


def test_write_exits_to_vmm_after_retiring() -> None:
    """A write the VMM must see exits with the data; the instruction has retired."""
    vcpu = vcpu_for("movw $0x55aa, 6(%rbx)", rbx=MMIO)
    vcpu.in_kernel = False
    emulator = MmioEmulator()
    outcome = emulator.emulate(vcpu, MMIO + 6)
    assert outcome.result is EmulationResult.USER_EXIT and outcome.rip_advanced
    assert outcome.mmio is not None and outcome.mmio.is_write and outcome.mmio.data == 0x55AA
    assert outcome.mmio.data_bytes == b"\xaa\x55"
    assert emulator.complete_userspace_io(vcpu).result is EmulationResult.DONE


def test_rep_stos_to_vmm_exits_per_element_and_continues() -> None:
    """REP STOS with every element going to the VMM: one exit per element; the instruction is
    re-entered after each (EMULATION_RESTART) until RCX is 0, and only then RIP moves."""
    vcpu = vcpu_for("rep stosb", rax=0x7E, rcx=3, rdi=MMIO)
    vcpu.in_kernel = False
    emulator = MmioEmulator()
    outcome = emulator.emulate(vcpu)
    seen = []
    while outcome.result is EmulationResult.USER_EXIT:
        assert outcome.mmio is not None
        seen.append(outcome.mmio.gpa)
        if len(seen) < 3:
            assert vcpu.rip == CODE and not outcome.rip_advanced
        outcome = emulator.complete_userspace_io(vcpu)
    assert seen == [MMIO, MMIO + 1, MMIO + 2]
    assert outcome.result is EmulationResult.DONE and vcpu.regs[1] == 0 and vcpu.rip == CODE + 2


def test_rep_movs_from_vmm_keeps_completed_iterations() -> None:
    """REP MOVS reading from the VMM: completed iterations stay committed across each exit."""
    vcpu = vcpu_for("rep movsw", rcx=2, rsi=MMIO, rdi=0x8000)
    vcpu.in_kernel = False
    emulator = MmioEmulator()
    outcome = emulator.emulate(vcpu)
    values = iter((0x1111, 0x2222))
    while outcome.result is EmulationResult.USER_EXIT:
        outcome = emulator.complete_userspace_io(vcpu, next(values))
    assert outcome.result is EmulationResult.DONE
    assert vcpu.read_linear(0x8000, 4) == b"\x11\x11\x22\x22" and vcpu.regs[1] == 0


def test_access_crossing_from_ram_into_mmio() -> None:
    """An access that straddles a page boundary is split (emulator_read_write_onepage()): the
    RAM part from memory, the MMIO part from the device."""
    vcpu = vcpu_for("mov (%rbx), %eax", rbx=MMIO - 2)
    vcpu.write_linear(MMIO - 2, b"\xaa\xbb")
    run_one(vcpu)
    assert vcpu.regs[0] == 0x0100BBAA and vcpu.log == [("r", MMIO, 2, 0x0100)]


def test_fault_and_unhandleable() -> None:
    """A string element whose linear address does not translate -> FAULT (the caller injects
    #PF), with the completed iterations kept; an instruction outside the supported set ->
    UNHANDLEABLE (X86EMUL_UNHANDLEABLE)."""
    vcpu = vcpu_for("rep stosb", rcx=3, rdi=MMIO + 0xFFF)
    vcpu.unmapped = {MMIO + 0x1000}
    outcome = MmioEmulator().emulate(vcpu)
    assert outcome.result is EmulationResult.FAULT and outcome.fault_address == MMIO + 0x1000 and outcome.fault_write
    assert vcpu.regs[1] == 2 and vcpu.rip == CODE
    for asm in ("btsl $3, (%rbx)", "cmpsb", "mov %cr0, %rax"):
        bad = vcpu_for(asm, rbx=MMIO, rsi=MMIO, rdi=MMIO)
        outcome = MmioEmulator().emulate(bad)
        assert outcome.result is EmulationResult.UNHANDLEABLE, asm
        assert bad.rip == CODE
