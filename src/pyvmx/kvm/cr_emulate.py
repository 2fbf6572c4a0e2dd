"""Emulation of control-register accesses that exit (SDM 28.2.1 Table 28-3; Linux
arch/x86/kvm/vmx/vmx.c handle_cr(), arch/x86/kvm/x86.c kvm_set_cr0/3/4/8, kvm_lmsw).

The guest's view of CR0 and CR4 is KVM's ``kvm_read_cr0/4()``: guest-owned bits from the
GUEST_CR0/CR4 fields, host-owned bits (the guest/host mask) from the read shadows. Writing one
goes through the checks of ``kvm_set_crN()`` -- a refused value makes the caller inject #GP(0)
(``kvm_complete_insn_gp()``) -- and then ``vmx_set_cr0/4()``: the read shadow gets the guest's
value, the CR field the value the processor needs (NE and VMXE forced on, NW/CD off), and a CR0.PG
change with EFER.LME set switches IA-32e mode on or off (``enter_lmode()`` / ``exit_lmode()``):
EFER.LMA and the "IA-32e mode guest" VM-entry control follow, and TR is made a busy 64-bit TSS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pyvmx.arch import qualifications as q
from pyvmx.arch.controls import VmEntryControls
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import (
    CR0_RESERVED_BITS,
    VMX_AR_L_MASK,
    VMX_AR_TYPE_BUSY_64_TSS,
    VMX_AR_TYPE_MASK,
    Cr0,
    Cr4,
    Efer,
)
from pyvmx.kvm.cpuid import CPUID_1_ECX_XSAVE, CPUID_7_EBX_FSGSBASE, CPUID_7_EBX_SMAP, CPUID_7_EBX_SMEP, CpuidTable
from pyvmx.kvm.vmcs_setup import hw_cr0, hw_cr4

_U64 = (1 << 64) - 1
_EFER_LMA = int(Efer.LMA)  # a plain int: tested on every skipped instruction
X86_CR0_PDPTR_BITS = int(Cr0.CD | Cr0.NW | Cr0.PG)
X86_CR4_PDPTR_BITS = int(Cr4.PGE | Cr4.PSE | Cr4.PAE | Cr4.SMEP)
X86_CR3_PCID_MASK = 0xFFF
PDPTE_PRESENT = 1
PDPTE_RESERVED_LOW = 0x1E6  # bits 2:1 and 8:5 (SDM 4.4.1)


class CrHost(Protocol):
    """What CR emulation needs from the vCPU."""

    cpuid: CpuidTable
    cr8: int

    def vmcs_read(self, field: F) -> int: ...

    def vmcs_write(self, field: F, value: int) -> None: ...

    def set_efer(self, efer: int) -> None: ...

    def read_guest_phys(self, gpa: int, size: int) -> bytes | None: ...

    @property
    def cr4_host_supported(self) -> int: ...


@dataclass(frozen=True)
class CrAccess:
    """A decoded CR-access exit qualification (SDM 28.2.1, Table 28-3)."""

    cr: int
    access_type: int  # 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW
    gpr: int
    lmsw_source: int
    lmsw_memory: bool

    @classmethod
    def decode(cls, qualification: int) -> CrAccess:
        return cls(
            cr=qualification & q.CR_ACCESS_NUM_MASK,
            access_type=(qualification & q.CR_ACCESS_TYPE_MASK) >> q.CR_ACCESS_TYPE_SHIFT,
            gpr=(qualification & q.CR_ACCESS_REG_MASK) >> q.CR_ACCESS_REG_SHIFT,
            lmsw_source=(qualification >> q.LMSW_SOURCE_DATA_SHIFT) & 0xFFFF,
            lmsw_memory=bool(qualification & q.CR_ACCESS_LMSW_MEMORY),
        )


# --- the guest's view -------------------------------------------------------------------------
def read_cr0(h: CrHost) -> int:
    """``kvm_read_cr0()``."""
    mask = h.vmcs_read(F.CR0_GUEST_HOST_MASK)
    return (h.vmcs_read(F.GUEST_CR0) & ~mask) | (h.vmcs_read(F.CR0_READ_SHADOW) & mask)


def read_cr4(h: CrHost) -> int:
    """``kvm_read_cr4()``."""
    mask = h.vmcs_read(F.CR4_GUEST_HOST_MASK)
    return (h.vmcs_read(F.GUEST_CR4) & ~mask) | (h.vmcs_read(F.CR4_READ_SHADOW) & mask)


def efer(h: CrHost) -> int:
    return h.vmcs_read(F.GUEST_IA32_EFER)


def is_paging(h: CrHost) -> bool:
    return bool(read_cr0(h) & Cr0.PG)


def is_long_mode(h: CrHost) -> bool:
    return bool(efer(h) & _EFER_LMA)


def is_pae(h: CrHost) -> bool:
    return bool(read_cr4(h) & Cr4.PAE)


def is_64_bit_mode(h: CrHost) -> bool:
    return is_long_mode(h) and bool(h.vmcs_read(F.GUEST_CS_AR_BYTES) & VMX_AR_L_MASK)


def cr4_guest_rsvd_bits(cpuid: CpuidTable) -> int:
    """``__cr4_reserved_bits(guest_cpuid_has, ...)``: CR4 bits the guest's CPUID does not
    allow (plus VMXE: no nested VMX here)."""
    reserved = int(Cr4.VMXE)
    if not cpuid.has(1, 0, "ecx", CPUID_1_ECX_XSAVE):
        reserved |= Cr4.OSXSAVE
    if not cpuid.has(7, 0, "ebx", CPUID_7_EBX_SMEP):
        reserved |= Cr4.SMEP
    if not cpuid.has(7, 0, "ebx", CPUID_7_EBX_SMAP):
        reserved |= Cr4.SMAP
    if not cpuid.has(7, 0, "ebx", CPUID_7_EBX_FSGSBASE):
        reserved |= Cr4.FSGSBASE
    reserved |= Cr4.PKE | Cr4.LA57 | Cr4.UMIP | Cr4.PCIDE | Cr4.CET | Cr4.PKS | Cr4.LAM_SUP | Cr4.KL | Cr4.SMXE
    return int(reserved)


# --- PAE PDPTEs (load_pdptrs(), ept_save/load_pdptrs()) -----------------------------------------
def load_pdptrs(h: CrHost, cr3: int) -> bool:
    """Read the four PDPTEs at CR3[31:5] into GUEST_PDPTR0-3 (SDM 4.4.1, 27.3.1.6); False
    (-> #GP) if one is present with a reserved bit set or cannot be read."""
    raw = h.read_guest_phys(cr3 & 0xFFFFFFE0, 32)
    if raw is None:
        return False
    maxphy = h.cpuid.guest_maxphyaddr
    reserved = PDPTE_RESERVED_LOW | (_U64 & ~((1 << maxphy) - 1))
    entries = [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(4)]
    for pdpte in entries:
        if pdpte & PDPTE_PRESENT and pdpte & reserved:
            return False
    for i, pdpte in enumerate(entries):
        h.vmcs_write(F[f"GUEST_PDPTR{i}"], pdpte)
    return True


# --- writes -------------------------------------------------------------------------------------
def _enter_lmode(h: CrHost) -> None:
    """``enter_lmode()``: TR must be a busy 64-bit TSS in IA-32e mode; EFER.LMA on."""
    ar = h.vmcs_read(F.GUEST_TR_AR_BYTES)
    if ar & VMX_AR_TYPE_MASK != VMX_AR_TYPE_BUSY_64_TSS:
        h.vmcs_write(F.GUEST_TR_AR_BYTES, (ar & ~VMX_AR_TYPE_MASK) | VMX_AR_TYPE_BUSY_64_TSS)
    h.set_efer(efer(h) | Efer.LMA)


def _exit_lmode(h: CrHost) -> None:
    """``exit_lmode()``."""
    h.set_efer(efer(h) & ~int(Efer.LMA))


def vmx_set_cr0(h: CrHost, cr0: int) -> None:
    """``vmx_set_cr0()`` with unrestricted guest."""
    old_pg = bool(read_cr0(h) & Cr0.PG)
    h.vmcs_write(F.CR0_READ_SHADOW, cr0)
    h.vmcs_write(F.GUEST_CR0, hw_cr0(cr0))
    if efer(h) & Efer.LME:
        if not old_pg and cr0 & Cr0.PG:
            _enter_lmode(h)
        elif old_pg and not cr0 & Cr0.PG:
            _exit_lmode(h)
    # The CR4 bits that must be off while paging is off (hw_cr4) depend on CR0.PG.
    h.vmcs_write(F.GUEST_CR4, hw_cr4(read_cr4(h), paging=bool(cr0 & Cr0.PG)))


def kvm_set_cr0(h: CrHost, cr0: int) -> bool:
    """``kvm_set_cr0()``: False when the write must #GP."""
    old = read_cr0(h)
    if cr0 >> 32:
        return False
    if cr0 & Cr0.NW and not cr0 & Cr0.CD:
        return False
    if cr0 & Cr0.PG and not cr0 & Cr0.PE:
        return False
    cr0 |= Cr0.ET
    cr0 &= ~CR0_RESERVED_BITS
    cur_efer = efer(h)
    if cur_efer & Efer.LME and not old & Cr0.PG and cr0 & Cr0.PG:
        if not is_pae(h):
            return False
        if h.vmcs_read(F.GUEST_CS_AR_BYTES) & VMX_AR_L_MASK:
            return False
    if (
        not cur_efer & Efer.LME and cr0 & Cr0.PG and is_pae(h)
        and (cr0 ^ old) & X86_CR0_PDPTR_BITS and not load_pdptrs(h, h.vmcs_read(F.GUEST_CR3))
    ):
        return False
    if not cr0 & Cr0.PG and (is_64_bit_mode(h) or read_cr4(h) & Cr4.PCIDE):
        return False
    vmx_set_cr0(h, int(cr0))
    return True


def kvm_set_cr4(h: CrHost, cr4: int) -> bool:
    """``kvm_set_cr4()``: False when the write must #GP."""
    old = read_cr4(h)
    host_reserved = _U64 & ~(h.cr4_host_supported | Cr4.VMXE)
    if cr4 & host_reserved or cr4 & cr4_guest_rsvd_bits(h.cpuid):
        return False
    if is_long_mode(h):
        if not cr4 & Cr4.PAE:
            return False
        if (cr4 ^ old) & Cr4.LA57:
            return False
    elif (
        is_paging(h) and cr4 & Cr4.PAE and (cr4 ^ old) & X86_CR4_PDPTR_BITS
        and not load_pdptrs(h, h.vmcs_read(F.GUEST_CR3))
    ):
        return False
    if cr4 & Cr4.PCIDE and not old & Cr4.PCIDE:
        if h.vmcs_read(F.GUEST_CR3) & X86_CR3_PCID_MASK or not is_long_mode(h):
            return False
    h.vmcs_write(F.CR4_READ_SHADOW, cr4)
    h.vmcs_write(F.GUEST_CR4, hw_cr4(cr4, paging=is_paging(h)))
    return True


def kvm_set_cr3(h: CrHost, cr3: int) -> bool:
    """``kvm_set_cr3()`` (exits only with "CR3-load exiting", i.e. never with EPT unless the
    user asks for it): reserved bits above the guest MAXPHYADDR in long mode; PDPTEs with PAE."""
    if is_long_mode(h):
        if cr3 & (_U64 & ~((1 << h.cpuid.guest_maxphyaddr) - 1)) & ~(1 << 63):
            return False
        cr3 &= ~(1 << 63)  # bit 63: "don't flush" with PCIDE
    elif is_pae(h) and is_paging(h) and not load_pdptrs(h, cr3):
        return False
    h.vmcs_write(F.GUEST_CR3, cr3)
    return True


def kvm_set_cr8(h: CrHost, cr8: int) -> bool:
    """``kvm_set_cr8()``: the task-priority register (no local APIC here: kept as a value)."""
    if cr8 & ~0xF:
        return False
    h.cr8 = cr8
    return True


def kvm_lmsw(h: CrHost, msw: int) -> bool:
    """``kvm_lmsw()``: CR0[3:1] replaced, PE can be set but not cleared."""
    return kvm_set_cr0(h, (read_cr0(h) & ~0x0E) | (msw & 0x0F))


def clts(h: CrHost) -> bool:
    """CLTS that exited (``handle_cr()`` type 2): clear TS through vmx_set_cr0()."""
    vmx_set_cr0(h, read_cr0(h) & ~int(Cr0.TS))
    return True


def mov_from_cr(h: CrHost, cr: int) -> int | None:
    """The value MOV from CR3/CR8 reads when it exits (CR3-store / CR8-store exiting)."""
    if cr == 3:
        return h.vmcs_read(F.GUEST_CR3)
    if cr == 8:
        return h.cr8
    return None


def ia32e_entry_control(entry_controls: int, efer_value: int) -> int:
    """``vmx_set_efer()``: "IA-32e mode guest" = EFER.LMA (SDM 25.8.1, 27.3.1.1)."""
    if efer_value & Efer.LMA:
        return entry_controls | VmEntryControls.IA32E_MODE
    return entry_controls & ~int(VmEntryControls.IA32E_MODE)
