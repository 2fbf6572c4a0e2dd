"""Hypothesis strategies shared by the fuzz suite: guest code per processor mode (random bytes
and small programs of I/O, MMIO, MSR and control-register accesses), intercept sets for the
KVM-style hypervisor and for a bare VMCS, random VMCS field writes and random EPT entries.

The programs are machine code built here byte by byte (no assembler: one input must cost
microseconds to make). Each mode's encoding differs only in operand/address-size prefixes:
``mov $imm, %reg`` is ``B8+r imm32`` in 32-bit code, ``66 B8+r imm32`` in 16-bit code and
``REX.W B8+r imm64`` in 64-bit code (SDM Vol. 2, "MOV -- Move"; 2.1 instruction format).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from hypothesis import strategies as st

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4
from pyvmx.kvm.vmcs_setup import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_SW_BP

U64 = (1 << 64) - 1


class GuestMode(enum.Enum):
    """The processor modes guests are fuzzed in: (code bits, paging)."""

    REAL = (16, False)
    PROTECTED16 = (16, False, "pm16")  # protected mode, a 16-bit code segment (D = 0)
    PROTECTED32 = (32, False)
    PROTECTED32_PAGING = (32, True)  # 32-bit paging with 4-MiB pages (CR4.PSE)
    VIRTUAL8086 = (16, False, "v86")  # RFLAGS.VM = 1 in protected mode (SDM 20.2), CPL 3
    LONG = (64, True)

    @property
    def bits(self) -> int:
        return int(self.value[0])

    @property
    def paging(self) -> bool:
        return bool(self.value[1])


ALL_MODES = list(GuestMode)

# --- random bytes -------------------------------------------------------------------------------
# Mostly uniform bytes, sometimes biased towards the opcode bytes that reach the hypervisor:
# prefixes 0F/66/67/F3, I/O E4-EF and 6C-6F, HLT F4, CLI/STI FA/FB, INT CD/CC, IRET CF.
_HOT = bytes([0x0F, 0x66, 0x67, 0xF3, 0xF2, 0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D,
              0x6E, 0x6F, 0xF4, 0xFA, 0xFB, 0xCD, 0xCC, 0xCF, 0x01, 0x20, 0x22, 0x30, 0x32, 0xA2, 0x31])
guest_bytes = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.lists(st.sampled_from(list(_HOT)) | st.integers(0, 255), min_size=1, max_size=48).map(bytes),
)


# --- small programs ----------------------------------------------------------------------------
EAX, ECX, EDX, EBX, ESI, EDI = 0, 1, 2, 3, 6, 7
HLT = b"\xf4"


def mov_imm(reg: int, value: int, bits: int) -> bytes:
    """``mov $value, %reg`` (reg 0-7) in ``bits``-bit code."""
    if bits == 64:
        return bytes([0x48, 0xB8 + reg]) + (value & U64).to_bytes(8, "little")
    prefix = b"\x66" if bits == 16 else b""
    return prefix + bytes([0xB8 + reg]) + (value & 0xFFFFFFFF).to_bytes(4, "little")


def _size_prefix(size: int, bits: int) -> bytes:
    """Operand-size prefix for a 2/4/8-byte operand (the non-byte opcode form)."""
    if size == 8:
        return b"\x48" if bits == 64 else b""
    if size == 2:
        return b"" if bits == 16 else b"\x66"
    return b"\x66" if bits == 16 else b""


def _addr_prefix(bits: int) -> bytes:
    """32-bit addressing in 16-bit code (67H), so [EBX]/ESI/EDI/ECX are used everywhere."""
    return b"\x67" if bits == 16 else b""


@dataclass(frozen=True)
class PortIo:
    """IN/OUT (or REP INS/OUTS with ``count``) of ``size`` bytes at ``port``."""

    port: int
    size: int
    write: bool
    value: int = 0
    count: int | None = None  # REP string I/O element count (RCX)
    buffer: int = 0x9000  # RSI/RDI of string I/O

    def encode(self, bits: int) -> bytes:
        code = mov_imm(EDX, self.port, bits) + mov_imm(EAX, self.value, bits)
        op = _size_prefix(self.size, bits)
        if self.count is None:
            opcode = (0xEE if self.write else 0xEC) + (self.size != 1)
            return code + op + bytes([opcode])
        opcode = (0x6E if self.write else 0x6C) + (self.size != 1)
        index = ESI if self.write else EDI
        return code + mov_imm(ECX, self.count, bits) + mov_imm(index, self.buffer, bits) + _addr_prefix(bits) + op + bytes([0xF3, opcode])


@dataclass(frozen=True)
class MemAccess:
    """A load or store of ``size`` bytes at ``address`` ([EBX]): RAM, MMIO or nothing."""

    address: int
    size: int
    write: bool
    value: int = 0

    def encode(self, bits: int) -> bytes:
        size = 4 if self.size == 8 and bits != 64 else self.size
        code = mov_imm(EBX, self.address, bits) + mov_imm(EAX, self.value, bits)
        opcode = (0x88 if self.write else 0x8A) + (size != 1)
        return code + _addr_prefix(bits) + _size_prefix(size, bits) + bytes([opcode, 0x03])  # ModRM: [EBX], EAX


@dataclass(frozen=True)
class MsrAccess:
    """WRMSR (EDX:EAX to MSR ECX) or RDMSR."""

    msr: int
    write: bool
    value: int = 0

    def encode(self, bits: int) -> bytes:
        code = mov_imm(ECX, self.msr, bits)
        if self.write:
            code += mov_imm(EAX, self.value & 0xFFFFFFFF, bits) + mov_imm(EDX, self.value >> 32, bits)
        return code + (b"\x0f\x30" if self.write else b"\x0f\x32")


@dataclass(frozen=True)
class CrAccess:
    """MOV to or from CR0/CR2/CR3/CR4/CR8 (CR8 only in 64-bit mode: REX.R)."""

    cr: int
    write: bool
    value: int = 0

    def encode(self, bits: int) -> bytes:
        if self.cr == 8 and bits != 64:
            return b""
        rex = b"\x44" if self.cr == 8 else b""
        modrm = 0xC0 | ((self.cr & 7) << 3) | EAX
        code = mov_imm(EAX, self.value, bits) if self.write else b""
        return code + rex + bytes([0x0F, 0x22 if self.write else 0x20, modrm])


GuestOp = PortIo | MemAccess | MsrAccess | CrAccess


def encode_program(ops: list[GuestOp], bits: int, tail: bytes = HLT) -> bytes:
    return b"".join(op.encode(bits) for op in ops) + tail


# Ports: the in-kernel devices (PIC, PIT, port 61, COM1, debug-exit) and unclaimed ones.
DEVICE_PORTS = [0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x4D0, 0x4D1,
                0x3F8, 0x3F9, 0x3FA, 0x3FB, 0x3FC, 0x3FD, 0x3FE, 0x3FF, 0xF4]
ports = st.sampled_from(DEVICE_PORTS) | st.sampled_from([0x80, 0xE9, 0x3F7, 0x7FFF, 0x8000, 0xFFFF]) | st.integers(0, 0xFFFF)
io_sizes = st.sampled_from([1, 2, 4])
values = st.sampled_from([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, U64, 1 << 63, 0x8000_0000]) | st.integers(0, U64)

# Guest-physical addresses: RAM (the fuzz VMs have 128 KiB at 0), just past it, page and RAM/MMIO
# boundaries (to split accesses), the APIC/IOAPIC/high MMIO holes, beyond MAXPHYADDR.
RAM_SIZE = 128 << 10
addresses = st.one_of(
    st.integers(0, RAM_SIZE - 1),
    st.sampled_from([RAM_SIZE - 1, RAM_SIZE - 2, RAM_SIZE - 3, RAM_SIZE - 4, RAM_SIZE - 7, RAM_SIZE, RAM_SIZE + 0xFFF,
                     0xFEC00000, 0xFEE00000, 0xFEE00FFD, 0xFFFFFFFC, 0xFFFFFFFF, 0xB8000, 0xA0000]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, U64),
)

port_io = st.builds(
    PortIo, port=ports, size=io_sizes, write=st.booleans(), value=values,
    count=st.none() | st.sampled_from([0, 1, 2, 3, 4096, 4097, 0xFFFF, 0x10000]) | st.integers(0, 5000),
    buffer=addresses,
)
mem_access = st.builds(MemAccess, address=addresses, size=st.sampled_from([1, 2, 4, 8]), write=st.booleans(), value=values)

INTERESTING_MSRS = [
    int(Msr.IA32_EFER), int(Msr.IA32_PAT), int(Msr.IA32_TSC), int(Msr.IA32_APIC_BASE), int(Msr.IA32_SYSENTER_CS),
    int(Msr.IA32_SYSENTER_ESP), int(Msr.IA32_SYSENTER_EIP), 0xC0000100, 0xC0000101,
    0xC0000102, int(Msr.IA32_DEBUGCTL), int(Msr.IA32_VMX_BASIC),
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000103,  # STAR, LSTAR, CSTAR, FMASK, TSC_AUX
    0x3B, 0x1A0, 0x48, 0x49, 0x10A, 0x2FF, 0x200, 0x201, 0x250, 0x258, 0x268, 0xFE,  # MTRRs, SPEC_CTRL ...
    0x4B564D00, 0x4B564D01, 0x4B564D02, 0x4B564D03, 0x4B564D04, 0x4B564D05,  # KVM paravirtual MSRs
    0x11, 0x12, 0x40000000, 0x800, 0x80B, 0x830, 0x1FFF, 0x2000, 0xC0001FFF, 0xC0002000, 0xFFFFFFFF,
]
msrs = st.sampled_from(INTERESTING_MSRS) | st.integers(0, 0xFFFFFFFF)
msr_access = st.builds(MsrAccess, msr=msrs, write=st.booleans(), value=values)

_CR0_BITS = [int(b) for b in (Cr0.PE, Cr0.MP, Cr0.EM, Cr0.TS, Cr0.ET, Cr0.NE, Cr0.WP, Cr0.AM, Cr0.NW, Cr0.CD, Cr0.PG)]
_CR4_BITS = [1 << i for i in range(25)]
cr_values = st.one_of(
    st.lists(st.sampled_from(_CR0_BITS + _CR4_BITS), max_size=6).map(lambda bits: sum(set(bits))),
    values,
)
cr_access = st.builds(CrAccess, cr=st.sampled_from([0, 2, 3, 4, 8]) | st.integers(0, 15), write=st.booleans(), value=cr_values)

io_programs = st.lists(port_io | mem_access, min_size=1, max_size=6)
msr_cr_programs = st.lists(msr_access | cr_access, min_size=1, max_size=6)


# --- hypervisor intercepts (what vcpu.intercept_* set) ----------------------------------------
@dataclass(frozen=True)
class HvIntercepts:
    """A seed-002 intercept policy for a KVM-style vCPU."""

    io: tuple[int, ...] | None = None  # None: unconditional I/O exiting; else only these ports
    msrs: tuple[tuple[int, bool, bool], ...] | None = None  # None: KVM's default bitmap; (msr, read, write)
    all_msrs: bool = False
    cr0_bits: int | None = None  # host-owned CR0 bits (only these)
    cr4_bits: int | None = None
    exceptions: tuple[int, ...] = ()
    hlt: bool = True
    preemption: int | None = None  # a preemption-timer slice in TSC ticks
    external_interrupts: bool = True
    interrupt_flag: bool | None = None
    guest_debug: int = 0  # KVM_SET_GUEST_DEBUG control
    nmi: bool = False  # KVM_NMI before the first run
    irq: int | None = None  # a PIC input raised before the first run (KVM_IRQ_LINE)


hv_intercepts = st.builds(
    HvIntercepts,
    io=st.none() | st.lists(ports, max_size=4).map(tuple),
    msrs=st.none() | st.lists(st.tuples(st.sampled_from(INTERESTING_MSRS), st.booleans(), st.booleans()), max_size=4).map(tuple),
    all_msrs=st.booleans(),
    cr0_bits=st.none() | st.sampled_from([0, int(Cr0.PG), int(Cr0.PE | Cr0.PG), int(Cr0.TS), 0xFFFFFFFF]),
    cr4_bits=st.none() | st.sampled_from([0, int(Cr4.PAE), int(Cr4.PSE | Cr4.PGE), 0xFFFFFFFF]),
    exceptions=st.lists(st.integers(0, 31), max_size=4).map(tuple),
    hlt=st.booleans(),
    preemption=st.none() | st.integers(500, 5000),  # at most ~40 slices in a run's time limit
    external_interrupts=st.booleans(),
    interrupt_flag=st.none() | st.booleans(),
    guest_debug=st.sampled_from([0, 0, 0, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP,
                                 KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP]),
    nmi=st.booleans(),
    irq=st.none() | st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]),  # not 2, the cascade
)


# --- bare-VMCS controls (what a hypervisor writes before VMLAUNCH) -------------------------------
_OPTIONAL_EXITS = [
    C.HLT_EXITING, C.INVLPG_EXITING, C.MWAIT_EXITING, C.RDPMC_EXITING, C.RDTSC_EXITING,
    C.CR3_LOAD_EXITING, C.CR3_STORE_EXITING, C.CR8_LOAD_EXITING, C.CR8_STORE_EXITING, C.MOV_DR_EXITING,
    C.UNCOND_IO_EXITING, C.MONITOR_EXITING, C.PAUSE_EXITING, C.INTR_WINDOW_EXITING, C.MONITOR_TRAP_FLAG,
    C.NMI_WINDOW_EXITING,
]
_OPTIONAL_SECONDARY = [S.DESC, S.WBINVD_EXITING, S.RDRAND_EXITING, S.RDSEED_EXITING, S.ENABLE_RDTSCP,
                       S.ENABLE_INVPCID, S.ENABLE_VPID]
_OPTIONAL_PIN = [P.EXT_INTR_MASK, P.NMI_EXITING, P.VIRTUAL_NMIS]


@dataclass(frozen=True)
class MachineControls:
    """Optional exiting controls, bitmaps and masks for a bare VMCS (SDM 25.6)."""

    proc: tuple[int, ...] = ()
    secondary: tuple[int, ...] = ()
    pin: tuple[int, ...] = ()
    exception_bitmap: int = 0
    cr0_mask: int = 0
    cr4_mask: int = 0
    timer: int | None = 40
    io_ports: tuple[int, ...] | None = None  # use the I/O bitmaps with only these ports
    msr_bitmap: tuple[int, ...] | None = None  # use an MSR bitmap with these MSRs exiting (read and write)


def _valid_nmi_controls(c: MachineControls) -> MachineControls:
    """SDM 27.2.1.1: "virtual NMIs" needs "NMI exiting", and "NMI-window exiting" needs "virtual
    NMIs" -- add what is missing, so that these inputs run guest code (the VMCS-write fuzz makes
    the invalid combinations)."""
    pin = set(c.pin)
    if int(C.NMI_WINDOW_EXITING) in c.proc:
        pin.add(int(P.VIRTUAL_NMIS))
    if int(P.VIRTUAL_NMIS) in pin:
        pin.add(int(P.NMI_EXITING))
    return dataclasses.replace(c, pin=tuple(sorted(pin)))


machine_controls = st.builds(
    MachineControls,
    proc=st.lists(st.sampled_from([int(c) for c in _OPTIONAL_EXITS]), unique=True, max_size=4).map(tuple),
    secondary=st.lists(st.sampled_from([int(c) for c in _OPTIONAL_SECONDARY]), unique=True, max_size=3).map(tuple),
    pin=st.lists(st.sampled_from([int(c) for c in _OPTIONAL_PIN]), unique=True, max_size=2).map(tuple),
    exception_bitmap=st.sampled_from([0, 0xFFFFFFFF, 1 << 14, 1 << 6, 1 << 13]) | st.integers(0, 2**32 - 1),
    cr0_mask=st.sampled_from([0, 0x80000001, 0xFFFFFFFF]) | st.integers(0, U64),
    cr4_mask=st.sampled_from([0, int(Cr4.VMXE), 0xFFFFFFFF]),
    timer=st.none() | st.integers(0, 200),
    io_ports=st.none() | st.lists(ports, max_size=3).map(tuple),
    msr_bitmap=st.none() | st.lists(msrs, max_size=3).map(tuple),
).map(_valid_nmi_controls)


# --- VMCS field writes ------------------------------------------------------------------------------
def _field_value(f: F) -> st.SearchStrategy[int]:
    bits = f.bits or 64
    top = (1 << bits) - 1
    return st.sampled_from([0, 1, top, top >> 1, 1 << (bits - 1)]) | st.integers(0, top)


_WRITABLE = [f for f in F if not f.is_read_only]


@dataclass(frozen=True)
class VmcsWrite:
    field: F
    value: int = 0
    flip: int | None = None  # XOR this bit into the current value instead of writing ``value``


vmcs_writes = st.lists(
    st.sampled_from(_WRITABLE).flatmap(
        lambda f: st.builds(VmcsWrite, field=st.just(f), value=_field_value(f),
                            flip=st.none() | st.integers(0, (f.bits or 64) - 1))
    ),
    min_size=1,
    max_size=4,
)


# --- EPT entries ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EptEdit:
    """Overwrite the EPT paging-structure entry at ``level`` (4 = PML4E ... 1 = PTE) that maps
    ``gpa`` with ``value`` (SDM 29.3.2, Tables 29-1 to 29-6): permissions, memory type, the
    large-page bit, reserved bits and the address may all be anything."""

    gpa: int
    level: int
    value: int = 0
    flip: int | None = None


_EPT_GPAS = [0x10000, 0x8000 - 8, 0x7000, 0x1000, 0x3000, 0x5000, 0x2000, 0x9000, 0x0]
# Host-physical pages of the bare machine (pyvmx.guest.sandbox's layout) a guest must never reach
# unless EPT hands them over: the VMXON region, the I/O and MSR bitmaps, the VMCS and EPT tables
# (allocated from 0x10000), guest RAM (0x100000), the last page and past the end of memory.
HOST_PAGES = [0x1000, 0x4000, 0x5000, 0x6000, 0x10000, 0x11000, 0x12000, 0x13000, 0x14000, 0x100000, 0x110000,
              (4 << 20) - 0x1000, 4 << 20, 1 << 32, (1 << 46) - 0x1000]
ept_entry_values = st.one_of(
    st.builds(
        lambda addr, perms, mtype, ipat, large, high: (addr & 0x000FFFFFFFFFF000) | perms | (mtype << 3) | (ipat << 6) | (large << 7) | high,
        st.sampled_from(HOST_PAGES) | st.integers(0, 1 << 26) | st.integers(0, U64), st.integers(0, 7), st.integers(0, 7), st.integers(0, 1),
        st.integers(0, 1), st.sampled_from([0, 1 << 8, 1 << 9, 1 << 10, 1 << 52, 1 << 63, 0xFFF0_0000_0000_0000]),
    ),
    st.integers(0, U64),
)
ept_edits = st.lists(
    st.builds(EptEdit, gpa=st.sampled_from(_EPT_GPAS) | st.integers(0, (1 << 21) - 1), level=st.integers(1, 4),
              value=ept_entry_values, flip=st.none() | st.integers(0, 63)),
    min_size=1,
    max_size=4,
)
# EPTP: memory type (bits 2:0), page-walk length - 1 (5:3), A/D enable (6), reserved (11:7), address.
eptp_low_bits = st.sampled_from([0x1E, 0x5E]) | st.integers(0, 0xFFF)


@dataclass(frozen=True)
class FuzzCase:
    """One input: what the generator made, for the failure message."""

    mode: GuestMode
    code: bytes
    extra: object = field(default=None)
