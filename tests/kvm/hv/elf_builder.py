"""A minimal ELF64 writer for loader tests (System V gABI, "ELF Header" and "Program Header"),
so that well-formed and deliberately broken files can be made byte by byte."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ET_EXEC, ET_DYN = 2, 3
EM_X86_64, EM_386, EM_AARCH64 = 62, 3, 183
PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    p_type: int = PT_LOAD
    offset: int | None = None  # override p_offset
    filesz: int | None = None  # override p_filesz


@dataclass
class ElfSpec:
    entry: int
    segments: list[Segment] = field(default_factory=list)
    e_type: int = ET_EXEC
    machine: int = EM_X86_64


def build_elf(spec: ElfSpec) -> bytes:
    phoff = 64
    data_off = phoff + 56 * len(spec.segments)
    blobs = b""
    headers = b""
    for seg in spec.segments:
        offset = data_off + len(blobs) if seg.offset is None else seg.offset
        filesz = len(seg.data) if seg.filesz is None else seg.filesz
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        headers += struct.pack("<IIQQQQQQ", seg.p_type, 5, offset, vaddr, seg.paddr, filesz, memsz, 0x1000)
        blobs += seg.data
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack("<HHIQQQIHHHHHH", spec.e_type, spec.machine, 1, spec.entry, phoff, 0, 0, 64, 56,
                                 len(spec.segments), 64, 0, 0)
    return header + headers + blobs
