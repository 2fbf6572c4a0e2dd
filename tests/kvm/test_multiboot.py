"""Multiboot v1 loading (Multiboot Specification 0.6.96 sections 3.1-3.3; QEMU hw/i386/multiboot.c)."""

from __future__ import annotations

import struct

import pytest

from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.multiboot import MULTIBOOT_BOOTLOADER_MAGIC, MultibootError, find_header, load_multiboot, setup_multiboot_vcpu

MAGIC = 0x1BADB002


def _kludge_image(entry_off: int = 0x20) -> bytes:
    """An a.out-kludge image (flags bit 16) loaded at 0x100000: header at file offset 0."""
    flags = 1 << 16
    header = struct.pack("<IIIIIIII", MAGIC, flags, (-(MAGIC + flags)) & 0xFFFFFFFF,
                         0x100000, 0x100000, 0, 0x102000, 0x100000 + entry_off)
    return header + b"\xf4" * 16


def test_header_needs_magic_flags_checksum_summing_to_zero_spec_3_1_2() -> None:
    assert find_header(b"\0" * 64) is None
    bad = struct.pack("<III", MAGIC, 0, 0)
    assert find_header(bad + bytes(16)) is None
    good = struct.pack("<III", MAGIC, 0, (-MAGIC) & 0xFFFFFFFF)
    header = find_header(bytes(8) + good + bytes(16))
    assert header is not None and header.offset == 8


def test_header_past_8192_bytes_is_not_found_spec_3_1_1() -> None:
    good = struct.pack("<III", MAGIC, 0, (-MAGIC) & 0xFFFFFFFF)
    assert find_header(bytes(8192) + good) is None


def test_kludge_load_info_and_machine_state_spec_3_2_3_3() -> None:
    kvm = Kvm(memory_size=64 << 20)
    vm = kvm.create_vm(memory_size=16 << 20)
    boot = load_multiboot(vm, _kludge_image(), "kernel a=1", 16 << 20)
    assert boot.entry == 0x100020 and boot.info == 0x102000
    assert vm.read_guest(0x100020, 1) == b"\xf4" and vm.read_guest(0x101000, 4) == bytes(4)  # bss zeroed
    flags, mem_lower, mem_upper, _dev, cmdline = struct.unpack("<IIIII", vm.read_guest(boot.info, 20))
    assert flags & 0b1000101 == 0b1000101  # mem, cmdline, mmap
    assert (mem_lower, mem_upper) == (639, 15 * 1024)
    assert vm.read_guest(cmdline, 11) == b"kernel a=1\0"
    mmap_len, mmap_addr = struct.unpack("<II", vm.read_guest(boot.info + 44, 8))
    entries = [struct.unpack_from("<IQQI", vm.read_guest(mmap_addr, mmap_len), i) for i in range(0, mmap_len, 24)]
    assert entries == [(20, 0, 0x9FC00, 1), (20, 0x100000, 15 << 20, 1)]
    vcpu = vm.create_vcpu()
    setup_multiboot_vcpu(vcpu, boot)
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    assert (regs.rax, regs.rbx, regs.rip) == (MULTIBOOT_BOOTLOADER_MAGIC, boot.info, boot.entry)
    assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31) and sregs.cs.db and not regs.rflags & (1 << 9)


def test_image_without_address_fields_must_be_elf_qemu_multiboot_c() -> None:
    kvm = Kvm(memory_size=64 << 20)
    vm = kvm.create_vm(memory_size=16 << 20)
    with pytest.raises(MultibootError, match="ELF"):
        load_multiboot(vm, struct.pack("<III", MAGIC, 0, (-MAGIC) & 0xFFFFFFFF) + bytes(32), "", 16 << 20)
