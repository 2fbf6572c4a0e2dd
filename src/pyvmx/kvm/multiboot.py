"""Booting a Multiboot (version 1) kernel the way QEMU's ``-kernel`` does (hw/i386/multiboot.c and
its option ROM pc-bios/optionrom/multiboot.S), after the Multiboot Specification 0.6.96:

* the header: a 32-bit-aligned ``magic = 0x1BADB002, flags, checksum`` (the three summing to 0
  mod 2^32) within the first 8192 bytes of the image (spec 3.1.1-3.1.2);
* loading: with flags bit 16 clear the image must be an ELF32 executable, loaded by its program
  headers (QEMU: "Cannot load x86-64 image, give a 32bit one" for ELF64); with bit 16 set the
  header's address fields say where the file goes (the "a.out kludge", spec 3.1.3);
* the Multiboot information structure (spec 3.3) on the page after the image: ``mem_lower`` =
  640 KiB, ``mem_upper`` = RAM above 1 MiB in KiB, boot device 0x8000FFFF, the command line
  "IMAGE ARGS" (QEMU passes the kernel's file name as argv[0]), no modules, a memory map
  (usable 0-0x9FC00 and 1 MiB-top of RAM) and the boot loader name;
* the machine state (spec 3.2): 32-bit protected mode, paging off, flat 4-GiB code and data
  segments, EFLAGS.IF = 0, EAX = 0x2BADB002, EBX = the information structure's address, EIP
  the entry point.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmx.kvm.boot import setup_protected_mode
from pyvmx.kvm.loader import ImageLoadError, load_elf
from pyvmx.kvm.mmu.guest_memory import GuestMemoryError

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu
    from pyvmx.kvm.vm import Vm

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_AOUT_KLUDGE = 1 << 16

MBI_FLAG_MEMORY = 1 << 0
MBI_FLAG_BOOT_DEVICE = 1 << 1
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_BOOTLOADER = 1 << 9
MBI_SIZE = 88
MMAP_RAM = 1
LOW_RAM_END = 0x9FC00  # QEMU's e820: the EBDA's last KiB below 640 KiB is reserved
HIGH_RAM_START = 0x100000
BOOTLOADER_NAME = b"pyvmx"


class MultibootError(ImageLoadError):
    """A Multiboot header or image that cannot be booted."""


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # of the header in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class MultibootBoot:
    entry: int
    info: int  # guest-physical address of the Multiboot information structure
    image_end: int
    symbols: dict[str, int]


def find_header(data: bytes) -> MultibootHeader | None:
    """The Multiboot header in the first 8192 bytes (32-bit aligned, valid checksum), or None."""
    for off in range(0, min(len(data), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & MULTIBOOT_AOUT_KLUDGE:
                if off + 32 > len(data):
                    raise MultibootError("the Multiboot header's address fields run past the end of the file")
                return MultibootHeader(off, flags, *struct.unpack_from("<IIIII", data, off + 12))
            return MultibootHeader(off, flags)
    return None


def _load_kludge(vm: Vm, data: bytes, h: MultibootHeader) -> tuple[int, int]:
    """Spec 3.1.3: the file from ``header_addr - (load_addr offset)`` goes to ``load_addr``."""
    start = h.offset - (h.header_addr - h.load_addr)
    if h.header_addr < h.load_addr or start < 0:
        raise MultibootError("Multiboot header_addr lies before load_addr")
    end = len(data) if h.load_end_addr == 0 else start + (h.load_end_addr - h.load_addr)
    if end > len(data) or end < start:
        raise MultibootError("Multiboot load_end_addr runs past the end of the file")
    bss_end = max(h.bss_end_addr, h.load_addr + end - start)
    try:
        vm.write_guest(h.load_addr, data[start:end] + bytes(bss_end - (h.load_addr + end - start)))
    except GuestMemoryError as exc:
        raise MultibootError(f"the Multiboot image does not fit in guest RAM: {exc}") from None
    return h.entry_addr, bss_end


def _info(info: int, cmdline_gpa: int, name_gpa: int, mmap_gpa: int, mmap_len: int, ram_size: int) -> bytes:
    flags = MBI_FLAG_MEMORY | MBI_FLAG_BOOT_DEVICE | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP | MBI_FLAG_BOOTLOADER
    mem_upper = (min(ram_size, 0xFFFFFFFF) - HIGH_RAM_START) // 1024
    mbi = bytearray(MBI_SIZE)
    struct.pack_into("<IIIIIII", mbi, 0, flags, LOW_RAM_END // 1024 if ram_size > LOW_RAM_END else 0, max(0, mem_upper),
                     0x8000FFFF, cmdline_gpa, 0, info + MBI_SIZE)
    struct.pack_into("<II", mbi, 44, mmap_len, mmap_gpa)
    struct.pack_into("<I", mbi, 64, name_gpa)
    return bytes(mbi)


def _memory_map(ram_size: int) -> bytes:
    """Spec 3.3 memory map entries: size (20, not counting itself), base, length, type."""
    ranges = [(0, min(ram_size, LOW_RAM_END))]
    if ram_size > HIGH_RAM_START:
        ranges.append((HIGH_RAM_START, ram_size - HIGH_RAM_START))
    return b"".join(struct.pack("<IQQI", 20, base, length, MMAP_RAM) for base, length in ranges)


def load_multiboot(vm: Vm, data: bytes, cmdline: str, ram_size: int) -> MultibootBoot:
    """Load the image and write the information structure; raises MultibootError."""
    header = find_header(data)
    if header is None:
        raise MultibootError("no Multiboot header in the first 8192 bytes")
    symbols: dict[str, int] = {}
    if header.flags & MULTIBOOT_AOUT_KLUDGE:
        entry, end = _load_kludge(vm, data, header)
    else:
        if data[:4] != b"\x7fELF":
            raise MultibootError("a Multiboot image without address fields (flags bit 16) must be an ELF file")
        if data[4] != 1:
            raise MultibootError("cannot boot a 64-bit ELF as Multiboot: give a 32-bit one (as QEMU says)")
        loaded = load_elf(vm, data)
        entry, symbols = loaded.entry, dict(loaded.symbols)
        end = max(gpa + size for gpa, size in loaded.segments)
    info = (end + 0xFFF) & ~0xFFF
    line = cmdline.encode("latin-1", "replace") + b"\0"
    mmap = _memory_map(ram_size)
    cmdline_gpa = info + MBI_SIZE + 16
    name_gpa = cmdline_gpa + len(line)
    mmap_gpa = (name_gpa + len(BOOTLOADER_NAME) + 1 + 7) & ~7
    blob = _info(info, cmdline_gpa, name_gpa, mmap_gpa, len(mmap), ram_size) + bytes(16) + line + BOOTLOADER_NAME + b"\0"
    blob += bytes(mmap_gpa - info - len(blob)) + mmap
    try:
        vm.write_guest(info, blob)
    except GuestMemoryError as exc:
        raise MultibootError(f"no guest RAM for the Multiboot information at {info:#x}: {exc}") from None
    return MultibootBoot(entry, info, end, symbols)


def setup_multiboot_vcpu(vcpu: Vcpu, boot: MultibootBoot) -> None:
    """Spec 3.2's machine state: 32-bit flat protected mode, paging off, IF = 0, EAX/EBX."""
    setup_protected_mode(vcpu, boot.entry)
    regs = vcpu.get_regs()
    regs.rax = MULTIBOOT_BOOTLOADER_MAGIC
    regs.rbx = boot.info
    vcpu.set_regs(regs)
