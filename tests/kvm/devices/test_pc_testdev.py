"""QEMU's pc-testdev (hw/misc/pc-testdev.c), as kvm-unit-tests drives it: the scratch register
at 0xE0 (and its byte window at 0xE8), the flush-page port at 0xE4, the ISA IRQ lines at 0x2000,
the 64-KiB iomem at 0xFF000000 -- on its own, then on a VM's PC platform under guests (the I/O
of kvm-unit-tests' realmode.c and emulator.c test_stringio, ioapic.c's set_irq_line(), the
MMIO of emulator.c, eventinj.c's flush_phys_addr())."""

from __future__ import annotations

import pytest

from pyvmx.kvm.devices.bus import IoBus, MmioBus
from pyvmx.kvm.devices.pc_testdev import PC_TESTDEV_IOMEM, PC_TESTDEV_IOMEM_LEN, PcTestdev
from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image, u32


def make_testdev() -> tuple[PcTestdev, IoBus, MmioBus, list[tuple[int, bool]], list[int]]:
    irqs: list[tuple[int, bool]] = []
    flushed: list[int] = []
    dev = PcTestdev(lambda line, level: irqs.append((line, level)), flushed.append)
    io, mmio = IoBus(), MmioBus()
    io.register_all(dev, dev.io_ranges)
    for base, length, name in dev.mmio_ranges:
        mmio.register(base, length, dev, name)
    return dev, io, mmio, irqs, flushed


def test_scratch_register_reads_back_by_byte_offset() -> None:
    """test_ioport_write/read: an n-byte access at 0xE0 + k touches bytes k .. k+n-1 of one
    32-bit register; the byte window at 0xE8 is the same register."""
    dev, io, _, _, _ = make_testdev()
    io.write(0xE0, 4, 0x11223344)
    assert io.read(0xE0, 4) == 0x11223344
    assert io.read(0xE1, 1) == 0x33 and io.read(0xE2, 2) == 0x1122
    io.write(0xE3, 1, 0xAB)
    assert dev.ioport_data == 0xAB223344
    io.write(0xE2, 4, 0xFFFF5566)  # runs past the register: only bytes 2 and 3 are its own
    assert dev.ioport_data == 0x55663344
    assert io.read(0xE8, 4) == 0x55663344
    io.write(0xE9, 2, 0x7788)
    assert io.read(0xE0, 4) == 0x55778844


def test_flush_page_takes_one_aligned_dword_and_irq_lines_one_byte() -> None:
    """The flush-page region accepts 4-byte accesses only (valid.min/max_access_size = 4) and
    passes the page of the address; an IRQ-line port takes a byte: level = (value != 0)."""
    dev, io, _, irqs, flushed = make_testdev()
    io.write(0xE4, 4, 0x12345678)
    io.write(0xE4, 2, 0x9000)
    io.write(0xE5, 1, 0x90)
    assert flushed == [0x12345000] == dev.flushed
    io.write(0x2000 + 14, 1, 1)
    io.write(0x2000 + 14, 1, 0)
    io.write(0x2000 + 23, 1, 0x80)
    io.write(0x2000 + 3, 2, 1)  # not a byte: ignored
    assert irqs == [(14, True), (14, False), (23, True)]


def test_iomem_is_plain_bytes() -> None:
    """test_iomem_read/write: the 64 KiB at 0xFF000000 keep what is stored, little-endian; an
    access running past the end keeps only its bytes inside."""
    _, _, mmio, _, _ = make_testdev()
    mmio.write(PC_TESTDEV_IOMEM + 0x100, 8, 0x0102030405060708)
    assert mmio.read(PC_TESTDEV_IOMEM + 0x100, 2) == 0x0708
    assert mmio.read(PC_TESTDEV_IOMEM + 0x104, 4) == 0x01020304
    last = PC_TESTDEV_IOMEM + PC_TESTDEV_IOMEM_LEN - 2
    mmio.write(last, 4, 0xAABBCCDD)
    assert mmio.read(last, 4) == 0xCCDD
    assert mmio.find(PC_TESTDEV_IOMEM + PC_TESTDEV_IOMEM_LEN) is None


REAL_MODE_IO = r"""
    mov $0x12, %al
    out %al, $0xe0
    in $0xe0, %al
    mov %al, %bl
    mov $0x3456, %ax
    out %ax, $0xe0
    in $0xe0, %ax
    cmp $0x3456, %ax
    jne fail
    mov $0xe0, %dx
    mov $0x789abcde, %eax
    out %eax, %dx
    xor %eax, %eax
    in %dx, %eax
    cmp $0x789abcde, %eax
    jne fail
    cld
    mov $text, %si
    mov $16, %cx
    rep outsb                      # emulator.c test_stringio: the last byte stays
    in %dx, %al
    cmp $'p', %al
    jne fail
    mov %bl, %al
    out %al, $0xf4
fail:
    mov $0xee, %al
    out %al, $0xf4
text: .ascii "abcdefghijklmnop"
"""


def test_real_mode_guest_io_to_testdev() -> None:
    """kvm-unit-tests realmode.c's I/O tests (out/in of AL, AX, EAX at 0xE0, DX-relative too)
    and emulator.c's ``rep outsb`` to the register: what was written reads back."""
    vm = Kvm().create_vm(memory_size=4 << 20)
    img = source_image(REAL_MODE_IO, base=0x7C00, bits=16)
    vcpu = boot(vm, img, mode="real", stack=0x7000)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x12)
    assert vm.platform is not None and vm.platform.testdev.ioport_data & 0xFF == ord("p")


LONG_MODE = r"""
    mov $0xff000000, %rbx
    movl $0xcafef00d, 8(%rbx)      # iomem: emulated MMIO stores and loads
    movw $0x4242, 0xfff0(%rbx)
    mov 8(%rbx), %eax
    movzwl 0xfff0(%rbx), %ecx
    mov %eax, result(%rip)
    mov %ecx, result+4(%rip)
    mov $3, %al                    # set_irq_line(3, 1): the PIC's IRQ 3 goes high
    mov $0x2003, %dx
    out %al, %dx
    lea data(%rip), %rax
    movl $1, (%rax)                # the data page is mapped now
    {flush}
    movl $2, (%rax)
    mov $0x55, %al
    out %al, $0xf4
    .balign 4096
data: .long 0
result: .quad 0
"""


def run_long_mode_guest(flush: str) -> tuple[Kvm, int, int, int]:
    kvm = Kvm()
    vm = kvm.create_vm(memory_size=4 << 20)
    img = source_image(LONG_MODE.format(flush=flush))
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x55)
    assert u32(vm, img.symbol("data")) == 2
    return kvm, img.symbol("data"), img.symbol("result"), vcpu.stats.exits["EPT_VIOLATION"]


def test_long_mode_guest_mmio_irq_line_and_flush_page() -> None:
    """A 64-bit guest stores to and loads from the iomem (EPT misconfiguration -> emulated MMIO
    to the in-kernel device, no exit to the user), raises ISA IRQ 3 at the PIC through port
    0x2003, and flushes its data page (eventinj.c flush_phys_addr()): KVM drops the page's EPT
    mapping (kvm_unmap_gfn_range()), so the next store takes one EPT violation more than the
    same guest without the flush."""
    kvm, data, result, violations = run_long_mode_guest("out %eax, $0xe4")
    vm = kvm.vms[0]
    platform = vm.platform
    assert platform is not None
    assert (u32(vm, result), u32(vm, result + 4)) == (0xCAFEF00D, 0x4242)
    assert platform.testdev.iomem[8:12] == (0xCAFEF00D).to_bytes(4, "little")
    assert platform.pic.master.irr & (1 << 3)
    assert platform.testdev.flushed == [data]
    _, _, _, without_flush = run_long_mode_guest("nop")
    assert violations == without_flush + 1


@pytest.mark.parametrize("platform", [True, False])
def test_testdev_is_part_of_the_pc_platform(platform: bool) -> None:
    """On the PC platform (QEMU ``-device pc-testdev``, which kvm-unit-tests' x86/run passes),
    not on a VM without one."""
    vm = Kvm(engine=False).create_vm(memory_size=1 << 20, platform=platform)
    assert (vm.io_bus.find(0xE0) is not None) is platform
    assert (vm.mmio_bus.find(PC_TESTDEV_IOMEM) is not None) is platform
