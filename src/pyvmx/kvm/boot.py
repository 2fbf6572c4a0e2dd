"""Starting a vCPU in a chosen mode, the way firmware or a boot loader hands over to a kernel:
tables built in guest memory, then the registers set through KVM_SET_SREGS/KVM_SET_REGS
(SDM 10.8 "Software initialization for protected-mode operation", 10.8.5 "Initializing IA-32e
mode"; the x86 boot protocol's 32- and 64-bit entry states, Documentation/arch/x86/boot.rst).

* real mode: CS:IP from the entry address, flat 64-KiB segments; needs "unrestricted guest"
  (SDM 27.3.1.1), which this hypervisor always uses;
* 32-bit protected mode, paging off: flat 4-GiB code and data segments from a GDT;
* 64-bit long mode: the same GDT with a 64-bit code segment, 4-level page tables identity-mapping
  the first 4 GiB with 2-MiB pages, CR4.PAE, EFER.LME/LMA, CR0.PG.

The GDT (and, for long mode, the page tables) live at ``tables_gpa`` (default 0x1000) and use
``BOOT_TABLES_SIZE`` bytes of guest RAM from there.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING

from pyvmx.arch.x86 import Cr0, Cr4, Efer
from pyvmx.kvm.regs import DTable, Regs, Segment, Sregs

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu

SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_CODE16 = 0x20
SEL_TSS = 0x28
GDT_OFFSET = 0x000
TSS_OFFSET = 0x080
PML4_OFFSET = 0x1000
PDPT_OFFSET = 0x2000
PD_OFFSET = 0x3000  # four page directories: 4 GiB of 2-MiB pages
BOOT_TABLES_SIZE = 0x7000
DEFAULT_TABLES_GPA = 0x1000

PTE_P, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7


def gdt_entry(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte segment descriptor (SDM 3.4.5, Figure 3-8): ``access`` is byte 5 (P, DPL, S,
    type), ``flags`` the high nibble of byte 6 (G, D/B, L, AVL)."""
    return struct.pack(
        "<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
        ((limit >> 16) & 0xF) | (flags << 4), (base >> 24) & 0xFF,
    )


def build_gdt(tss_base: int) -> bytes:
    """Null, 32-bit code, data, 64-bit code, 16-bit code, and a 16-byte TSS descriptor."""
    tss_low = gdt_entry(tss_base, 0x67, 0x89, 0x0)
    tss_high = struct.pack("<II", (tss_base >> 32) & 0xFFFFFFFF, 0)
    return b"".join([
        bytes(8),
        gdt_entry(0, 0xFFFFF, 0x9B, 0xC),
        gdt_entry(0, 0xFFFFF, 0x93, 0xC),
        gdt_entry(0, 0xFFFFF, 0x9B, 0xA),
        gdt_entry(0, 0xFFFF, 0x9B, 0x0),
        tss_low,
        tss_high,
    ])


@functools.cache
def _identity_page_directories() -> bytes:
    """Four page directories of 2-MiB pages mapping the first 4 GiB 1:1 (the same every boot)."""
    return b"".join(struct.pack("<Q", (i << 21) | PTE_P | PTE_RW | PTE_PS) for i in range(4 * 512))


def write_boot_tables(vcpu: Vcpu, tables_gpa: int, *, paging: bool) -> None:
    vm = vcpu.vm
    vm.write_guest(tables_gpa + GDT_OFFSET, build_gdt(tables_gpa + TSS_OFFSET))
    vm.write_guest(tables_gpa + TSS_OFFSET, bytes(0x68))
    if paging:
        pml4, pdpt, pd = tables_gpa + PML4_OFFSET, tables_gpa + PDPT_OFFSET, tables_gpa + PD_OFFSET
        vm.write_guest(pml4, struct.pack("<Q", pdpt | PTE_P | PTE_RW) + bytes(4088))
        vm.write_guest(pdpt, b"".join(struct.pack("<Q", (pd + i * 0x1000) | PTE_P | PTE_RW) for i in range(4)) + bytes(4096 - 32))
        vm.write_guest(pd, _identity_page_directories())


def _flat(selector: int, seg_type: int, *, code64: bool = False) -> Segment:
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=seg_type, s=True, present=True,
                   db=not code64, l=code64, g=True)


def _protected_sregs(tables_gpa: int) -> Sregs:
    data = _flat(SEL_DATA, 3)
    return Sregs(
        cs=_flat(SEL_CODE32, 11),
        ds=data, es=data, fs=data, gs=data, ss=data,
        tr=Segment(base=tables_gpa + TSS_OFFSET, limit=0x67, selector=SEL_TSS, type=11, s=False),
        ldt=Segment(type=2, s=False, present=False, unusable=True),
        gdt=DTable(tables_gpa + GDT_OFFSET, 0x2F + 8),
        idt=DTable(0, 0),
        cr0=int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE),
        cr4=0,
        efer=0,
    )


def setup_real_mode(vcpu: Vcpu, entry: int, *, stack: int = 0x7C00) -> None:
    """Real mode at ``entry`` (a physical address below 1 MiB): CS = entry >> 4 rounded down to a
    64-KiB boundary, IP the rest; DS = ES = SS = 0, SP = ``stack``."""
    if not 0 <= entry < 0x100000:
        raise ValueError(f"a real-mode entry point must be below 1 MiB, not {entry:#x}")
    cs = (entry & 0xF0000) >> 4
    sregs = Sregs(cs=Segment(base=cs << 4, limit=0xFFFF, selector=cs, type=11))
    sregs.cr0 = int(Cr0.ET)
    sregs.idt = DTable(0, 0x3FF)
    sregs.apic_base = vcpu.get_sregs().apic_base
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=entry & 0xFFFF, rsp=stack, rflags=0x2))


def setup_protected_mode(vcpu: Vcpu, entry: int, *, stack: int = 0xA000, tables_gpa: int = DEFAULT_TABLES_GPA) -> None:
    """32-bit protected mode, paging off, flat segments."""
    write_boot_tables(vcpu, tables_gpa, paging=False)
    sregs = _protected_sregs(tables_gpa)
    sregs.apic_base = vcpu.get_sregs().apic_base
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=entry, rsp=stack, rflags=0x2))


def setup_long_mode(vcpu: Vcpu, entry: int, *, stack: int = 0xA000, tables_gpa: int = DEFAULT_TABLES_GPA) -> None:
    """64-bit mode: identity paging of 4 GiB, CR0.PG, CR4.PAE, EFER.LME|LMA (SDM 10.8.5)."""
    write_boot_tables(vcpu, tables_gpa, paging=True)
    sregs = _protected_sregs(tables_gpa)
    sregs.cs = _flat(SEL_CODE64, 11, code64=True)
    sregs.cr0 = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG)
    sregs.cr3 = tables_gpa + PML4_OFFSET
    sregs.cr4 = int(Cr4.PAE)
    sregs.efer = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX)
    sregs.apic_base = vcpu.get_sregs().apic_base
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=entry, rsp=stack, rflags=0x2))
