"""What the VM exit saves for the segment registers is what the instructions that loaded them
set (SDM 28.3.2; the instructions' pseudocode in SDM Vol. 2), so the next VM entry's
guest-state checks (SDM 27.3.1.2) pass:

* LTR marks the TSS descriptor busy, in the GDT and in TR (LTR: "Set busy flag of TSS
  descriptor"; type 9 -> 11) -- before, TR was saved as type 9 and VMRESUME failed with "guest
  TR type must be 11";
* LLDT loads an LDT descriptor (type 2, usable); LLDT of a null selector makes LDTR unusable;
* MOV to a data-segment register sets the descriptor's accessed bit, in memory and in the
  register (SDM 3.4.5.1); a null selector makes DS/ES/FS/GS unusable (SDM 3.4.3);
* a far transfer to another code segment (LRETQ) loads CS with the accessed bit set;
* SS.DPL is the CPL (SDM 5.5).
"""

from __future__ import annotations

import struct

import pytest

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.kvm.exits import DebugExit, IoExit
from pyvmx.kvm.kvm import Kvm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image

pytestmark = pytest.mark.machine

TSS_BASE, LDT_BASE = 0x30000, 0x31000
STOP_PORT = 0x510  # nobody claims it: each OUT is an exit to the test

SEGMENTS = rf"""
.macro STOP
    mov ${STOP_PORT}, %dx
    out %al, %dx
.endm
    lgdt gdtr(%rip)
    mov $0x28, %ax
    ltr %ax
    mov $1, %al
    STOP                             # stop 1: TR
    mov $0x38, %ax
    lldt %ax
    mov $0x48, %ax
    mov %ax, %ds                     # a data descriptor with A = 0
    xor %eax, %eax
    mov %ax, %es                     # null
    pushq $0x50                      # LRETQ to a second 64-bit code segment
    lea next(%rip), %rax
    push %rax
    lretq
next:
    mov $2, %al
    STOP                             # stop 2: LDTR, DS, ES, CS
    xor %eax, %eax
    lldt %ax                         # a null selector: LDTR unusable
    mov $3, %al
    STOP                             # stop 3
    EXIT_WITH $3
    hlt
    .align 16
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF         # 0x08 32-bit code
    .quad 0x00CF93000000FFFF         # 0x10 data
    .quad 0x00AF9B000000FFFF         # 0x18 64-bit code
    .quad 0x00009B000000FFFF         # 0x20 16-bit code
    .word 0x67, {TSS_BASE & 0xFFFF}  # 0x28 64-bit TSS, available (type 9)
    .byte {(TSS_BASE >> 16) & 0xFF}, 0x89, 0x00, {TSS_BASE >> 24}
    .long 0, 0
    .word 0x0F, {LDT_BASE & 0xFFFF}  # 0x38 LDT (type 2)
    .byte {(LDT_BASE >> 16) & 0xFF}, 0x82, 0x00, {LDT_BASE >> 24}
    .long 0, 0
    .quad 0x00CF92000000FFFF         # 0x48 data, not accessed
    .quad 0x00AF9A000000FFFF         # 0x50 64-bit code, not accessed
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
"""


def test_segment_registers_saved_as_loaded() -> None:
    vm = Kvm().create_vm(memory_size=8 << 20)
    img = source_image(SEGMENTS)
    vcpu = boot(vm, img)
    gdt = img.symbol("gdt")

    stop = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(stop, IoExit) and stop.port == STOP_PORT and bytes(stop.data) == b"\x01"
    tr_ar = vcpu.vmcs_read(F.GUEST_TR_AR_BYTES)
    assert tr_ar & 0x1F == 11 and tr_ar & 0x80 and not tr_ar & 0x10000  # busy 64-bit TSS, present
    assert vcpu.vmcs_read(F.GUEST_TR_SELECTOR) == 0x28
    assert vcpu.vmcs_read(F.GUEST_TR_BASE) == TSS_BASE and vcpu.vmcs_read(F.GUEST_TR_LIMIT) == 0x67
    assert vm.read_guest(gdt + 0x28 + 5, 1)[0] & 0x0F == 11  # busy in the GDT too

    stop = vcpu.run(time_limit=DEFAULT_LIMIT)  # the VM entry with that TR succeeds
    assert isinstance(stop, IoExit) and bytes(stop.data) == b"\x02"
    ldtr_ar = vcpu.vmcs_read(F.GUEST_LDTR_AR_BYTES)
    assert ldtr_ar & 0x1F == 2 and ldtr_ar & 0x80 and not ldtr_ar & 0x10000
    assert vcpu.vmcs_read(F.GUEST_LDTR_BASE) == LDT_BASE and vcpu.vmcs_read(F.GUEST_LDTR_LIMIT) == 0x0F
    ds_ar = vcpu.vmcs_read(F.GUEST_DS_AR_BYTES)
    assert ds_ar == 0xC093  # G, D/B, P, S, type 3 (accessed): the A bit set by the load
    assert vm.read_guest(gdt + 0x48 + 5, 1)[0] == 0x93  # ... and in the descriptor
    assert vcpu.vmcs_read(F.GUEST_DS_LIMIT) == 0xFFFFFFFF
    assert vcpu.vmcs_read(F.GUEST_ES_AR_BYTES) & 0x10000  # null: unusable
    cs_ar = vcpu.vmcs_read(F.GUEST_CS_AR_BYTES)
    assert vcpu.vmcs_read(F.GUEST_CS_SELECTOR) == 0x50 and cs_ar == 0xA09B  # G, L, P, S, type 11
    assert (vcpu.vmcs_read(F.GUEST_SS_AR_BYTES) >> 5) & 3 == 0  # SS.DPL = CPL 0

    stop = vcpu.run(time_limit=DEFAULT_LIMIT)
    assert isinstance(stop, IoExit) and bytes(stop.data) == b"\x03"
    assert vcpu.vmcs_read(F.GUEST_LDTR_AR_BYTES) & 0x10000  # QEMU kept the old attributes
    assert vcpu.vmcs_read(F.GUEST_LDTR_SELECTOR) == 0
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(3)


def test_gdt_layout_is_what_the_guest_builds() -> None:
    """The TSS and LDT descriptors of the guest above encode the bases the test expects."""
    img = source_image(SEGMENTS)
    raw = img.code[img.symbol("gdt") - img.base + 0x28 : img.symbol("gdt") - img.base + 0x30]
    low, high = struct.unpack("<II", raw)
    assert (low >> 16) | (high & 0xFF) << 16 | (high >> 24) << 24 == TSS_BASE
