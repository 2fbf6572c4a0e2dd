"""A 64-bit guest kernel with a user mode, for tests that cross privilege levels: a GDT laid
out as Linux's (kernel CS 0x10 / SS 0x18, user CS32 0x23, user SS 0x2B, user CS 0x33, TSS
0x40), a TSS whose RSP0 is the kernel stack, and the boot identity map made user-accessible
(U/S = 1 in every entry of the first 8 MiB, SDM 4.6)."""

from __future__ import annotations

import struct

from pyvmx.guest.assemble import GuestImage
from pyvmx.kvm.boot import DEFAULT_TABLES_GPA, PD_OFFSET, PDPT_OFFSET, PML4_OFFSET
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vcpu import Vcpu
from pyvmx.kvm.vm import Vm

from tests.kvm.hv.guests import boot, source_image

TSS_BASE = 0x30000
KERNEL_STACK = 0xA000
USER_STACK = 0x70000
STOP_PORT = 0x510  # no device: an OUT there is an exit to the test

PROLOGUE = rf"""
.macro STOP                          # an exit to the test (needs IOPL 3 at CPL 3)
    mov ${STOP_PORT}, %dx
    out %al, %dx
.endm
.macro KERNEL_SETUP
    lgdt gdtr(%rip)
    mov $0x18, %ax
    mov %ax, %ss
    mov %ax, %ds
    mov %ax, %es
    pushq $0x10
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  movq ${KERNEL_STACK}, {TSS_BASE + 4}   # TSS.RSP0
    mov $0x40, %ax
    ltr %ax
    LOAD_IDT
.endm
.macro KGATE vector, handler, dpl=0  # an interrupt gate to the kernel CS 0x10
    SET_GATE \vector, \handler
    movw $0x10, idt + \vector * 16 + 2(%rip)
    orb $(\dpl << 5), idt + \vector * 16 + 5(%rip)
.endm
.macro WRMSR64 msr, value
    mov $\msr, %ecx
    mov \value, %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
.endm
"""

EPILOGUE = rf"""
    .align 16
gdt:
    .quad 0
    .quad 0
    .quad 0x00AF9B000000FFFF         # 0x10 kernel code, 64-bit
    .quad 0x00CF93000000FFFF         # 0x18 kernel data
    .quad 0x00CFFB000000FFFF         # 0x23 user code, 32-bit
    .quad 0x00CFF3000000FFFF         # 0x2B user data
    .quad 0x00AFFB000000FFFF         # 0x33 user code, 64-bit
    .quad 0x00CFF3000000FFFF         # 0x3B user data (SYSEXIT's SS = CS + 8)
    .word 0x67, {TSS_BASE & 0xFFFF}  # 0x40 64-bit TSS
    .byte {(TSS_BASE >> 16) & 0xFF}, 0x89, 0x00, {TSS_BASE >> 24}
    .long 0, 0
{{extra_gdt}}
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    IDT_TABLE
"""


def user_accessible(vm: Vm, tables_gpa: int = DEFAULT_TABLES_GPA) -> None:
    """Set U/S in the boot identity map's PML4E 0, PDPTE 0 and the first four 2-MiB PDEs."""
    for gpa in (tables_gpa + PML4_OFFSET, tables_gpa + PDPT_OFFSET, *(tables_gpa + PD_OFFSET + 8 * i for i in range(4))):
        (entry,) = struct.unpack("<Q", vm.read_guest(gpa, 8))
        vm.write_guest(gpa, struct.pack("<Q", entry | 4))


def ring3_guest(body: str, kvm: Kvm | None = None, *, extra_gdt: str = "") -> tuple[Vm, Vcpu, GuestImage]:
    """Assemble ``body`` between the macros and the tables (``extra_gdt``: descriptors from
    selector 0x50 on) and boot it at CPL 0."""
    vm = (kvm or Kvm()).create_vm(memory_size=8 << 20)
    img = source_image(PROLOGUE + body + EPILOGUE.replace("{extra_gdt}", extra_gdt))
    vcpu = boot(vm, img, stack=KERNEL_STACK)
    user_accessible(vm)
    return vm, vcpu, img
