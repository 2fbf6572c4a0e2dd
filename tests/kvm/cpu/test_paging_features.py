"""The paging features CPUID advertises, exercised by guests (SDM ch. 4): PSE and PSE-36
(4-MByte pages of 32-bit paging, PDE bits 20:13 giving physical-address bits 39:32, SDM 4.3),
1-GByte pages (PDPE1GB, SDM 4.5), XD (NX, SDM 4.6), SMEP and SMAP (SDM 4.6.1) -- SMAP with
STAC/CLAC switching RFLAGS.AC between accesses to the same user page, so a translation cached
while AC = 1 must not let an access through once AC = 0."""

from __future__ import annotations

import struct

import pytest

from pyvmx.kvm.boot import DEFAULT_TABLES_GPA, PD_OFFSET, PDPT_OFFSET, PML4_OFFSET
from pyvmx.kvm.exits import DebugExit, MmioExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vm import Vm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image, u32, u64

pytestmark = pytest.mark.machine

USER_PAGE = 0x200000  # the 2-MiB page PD[1]: made user-accessible
XD_PAGE = 0x400000  # PD[2]: execute-disable
PF_P, PF_W, PF_U, PF_I = 1, 2, 4, 16


def _or_entry(vm: Vm, gpa: int, bits: int) -> None:
    (entry,) = struct.unpack("<Q", vm.read_guest(gpa, 8))
    vm.write_guest(gpa, struct.pack("<Q", entry | bits))


PROTECTIONS = r"""
    SET_GATE 14, pf_handler
    LOAD_IDT
    # 1. XD: fetching from a page with XD = 1 (EFER.NXE = 1) is a #PF with I/D = 1
    lea 1f(%rip), %rax
    mov %rax, resume(%rip)
    mov $0x400000, %rax
    call *%rax
1:  # 2. SMEP: a supervisor fetch from a user page
    mov %cr4, %rax
    or $(1 << 20), %rax
    mov %rax, %cr4
    lea 2f(%rip), %rax
    mov %rax, resume(%rip)
    mov $0x200000, %rax
    call *%rax
2:  # 3. SMAP: a supervisor read of a user page faults with AC = 0, not with AC = 1
    mov %cr4, %rax
    or $(1 << 21), %rax
    mov %rax, %cr4
    lea 3f(%rip), %rax
    mov %rax, resume(%rip)
    mov 0x200100, %eax
3:  stac
    mov 0x200100, %eax
    mov %eax, smap_read(%rip)
    clac
    lea 4f(%rip), %rax
    mov %rax, resume(%rip)
    mov 0x200100, %eax            # the same page again: AC = 0, so #PF again
4:  EXIT_WITH $0x44
    hlt
pf_handler:
    mov count(%rip), %ecx
    lea errors(%rip), %rdx
    mov (%rsp), %rax
    mov %eax, (%rdx,%rcx,8)
    mov %cr2, %rax
    mov %eax, 4(%rdx,%rcx,8)
    incl count(%rip)
    add $8, %rsp
    mov resume(%rip), %rax
    mov %rax, (%rsp)
    iretq
    .align 8
resume: .quad 0
count: .long 0
smap_read: .long 0
errors: .fill 8, 8, 0
    IDT_TABLE
"""


def test_smep_smap_and_nx() -> None:
    """XD: #PF(P|I/D) at the XD page. SMEP: #PF(P|I/D) at a user page fetched at CPL 0. SMAP:
    #PF(P) for the read with AC = 0, the value with AC = 1 (after STAC), #PF(P) again after CLAC
    (RFLAGS.AC selects the access rights, SDM 4.6.1)."""
    vm = Kvm().create_vm(memory_size=8 << 20)
    img = source_image(PROTECTIONS)
    vcpu = boot(vm, img)
    t = DEFAULT_TABLES_GPA
    _or_entry(vm, t + PML4_OFFSET, PF_U)
    _or_entry(vm, t + PDPT_OFFSET, PF_U)
    _or_entry(vm, t + PD_OFFSET + 8, PF_U)  # 0x200000-0x3FFFFF: user pages
    _or_entry(vm, t + PD_OFFSET + 16, 1 << 63)  # 0x400000-0x5FFFFF: execute-disable
    vm.write_guest(USER_PAGE, b"\xc3")  # ret
    vm.write_guest(XD_PAGE, b"\xc3")
    vm.write_guest(USER_PAGE + 0x100, (0x1234).to_bytes(4, "little"))
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x44)
    assert u32(vm, img.symbol("count")) == 4
    errors = [(u32(vm, img.symbol("errors") + 8 * i), u32(vm, img.symbol("errors") + 8 * i + 4)) for i in range(4)]
    assert errors == [
        (PF_P | PF_I, XD_PAGE),
        (PF_P | PF_I, USER_PAGE),
        (PF_P, USER_PAGE + 0x100),
        (PF_P, USER_PAGE + 0x100),
    ]
    assert u32(vm, img.symbol("smap_read")) == 0x1234


ONE_GB = r"""
    mov $0x40000000, %rax
    add $marker, %rax
    mov (%rax), %eax              # linear 1 GiB + marker -> physical marker, via a 1-GiB page
    EXIT_WITH %al
    hlt
marker: .long 0x5A
"""


def test_1gb_page() -> None:
    """A PDPTE with PS = 1 maps a 1-GByte page (SDM 4.5.4, Table 4-16): linear 40000000H + x
    reads physical x."""
    vm = Kvm().create_vm(memory_size=8 << 20)
    img = source_image(ONE_GB)
    vcpu = boot(vm, img)
    pdpte1 = DEFAULT_TABLES_GPA + PDPT_OFFSET + 8
    vm.write_guest(pdpte1, struct.pack("<Q", 0 | 0x83))  # P, R/W, PS: physical 0
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x5A)
    assert u64(vm, pdpte1) & 0x20  # accessed


PSE = r"""
    mov $0x80000, %edi
    movl $0x00000083, (%edi)       # PDE 0: 4 MiB page at 0 (P, R/W, PS)
    movl $0x00002083, 4(%edi)      # PDE 1: 4 MiB page at 1_0000_0000 (PSE-36: bit 13 = PA bit 32)
    mov %cr4, %eax
    or $0x10, %eax                 # CR4.PSE
    mov %eax, %cr4
    mov %edi, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    mov marker, %eax               # through the 4-MiB page at 0
    cmp $0x5A, %eax
    jne 1f
    mov 0x400010, %eax             # physical 1_0000_0010: no memory there, an MMIO exit
    mov $0x5A, %al
    out %al, $0xf4
1:  hlt
marker: .long 0x5A
"""


def test_pse_and_pse36_4mb_pages() -> None:
    """32-bit paging with CR4.PSE: a PDE with PS = 1 maps 4 MBytes; with PSE-36 its bits 20:13
    are physical-address bits 39:32 (SDM 4.3, Table 4-4), so linear 400010H is physical
    1_0000_0010H -- beyond RAM: the load is an MMIO exit at that address."""
    vm = Kvm().create_vm(memory_size=8 << 20)
    img = source_image(PSE, bits=32)
    vcpu = boot(vm, img, mode="protected")
    out = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(out, MmioExit) and out.gpa == 0x1_0000_0010 and not out.is_write
    out.data[:4] = b"\0\0\0\0"
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x5A)
