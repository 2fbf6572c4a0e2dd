"""Guest images into guest memory, as a VMM or firmware loads them: a flat binary at a
guest-physical address, or an ELF executable whose PT_LOAD segments go to their physical
addresses (``p_paddr``), the bytes past ``p_filesz`` zeroed up to ``p_memsz`` (ELF gABI
"Program Loading"; what QEMU's load_elf() and Linux's kexec do). The ELF is read with pyelftools.

A file that is not a loadable x86 ELF executable -- bad magic, truncated headers, a segment
outside the file or outside guest RAM, an entry point outside every segment -- raises
:class:`ElfLoadError` (a ValueError) naming the problem; nothing reaches guest memory then.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile

from pyvmx.kvm.mmu.guest_memory import GuestMemoryError

if TYPE_CHECKING:
    from pyvmx.kvm.vm import Vm

EM_386 = "EM_386"
EM_X86_64 = "EM_X86_64"


class ImageLoadError(ValueError):
    """A guest image that cannot be loaded."""


class ElfLoadError(ImageLoadError):
    """A malformed or unsuitable ELF file; the message says what is wrong with it."""


@dataclass(frozen=True)
class LoadedImage:
    """What was loaded: the entry point, the guest-physical ranges written, the symbols."""

    entry: int
    segments: tuple[tuple[int, int], ...]
    symbols: dict[str, int] = field(default_factory=dict)
    elf_class: int = 64

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"no symbol {name!r} in the image") from None


def load_flat(vm: Vm, data: bytes, gpa: int, *, entry: int | None = None, symbols: dict[str, int] | None = None) -> LoadedImage:
    """Copy a flat binary to ``gpa``; the entry point is ``gpa`` unless given."""
    try:
        vm.write_guest(gpa, data)
    except GuestMemoryError as exc:
        raise ImageLoadError(f"flat image of {len(data)} bytes at {gpa:#x} does not fit in guest RAM: {exc}") from exc
    return LoadedImage(gpa if entry is None else entry, ((gpa, len(data)),), dict(symbols or {}))


def _read_elf(source: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ElfLoadError(f"cannot read {os.fspath(source)}: {exc.strerror}") from None


def load_elf(vm: Vm, source: bytes | str | os.PathLike[str]) -> LoadedImage:
    """Load an x86 ELF executable (ET_EXEC, EM_386 or EM_X86_64) by its program headers."""
    data = _read_elf(source)
    if data[:4] != b"\x7fELF":
        raise ElfLoadError(f"not an ELF file (magic {data[:4]!r}, expected b'\\x7fELF')")
    try:
        elf = ELFFile(io.BytesIO(data))
        header = elf.header
        machine = header["e_machine"]
        kind = header["e_type"]
        entry = int(header["e_entry"])
        segments = [elf.get_segment(i) for i in range(elf.num_segments())]
    except (ELFError, ELFParseError, ValueError, KeyError, OSError, AssertionError) as exc:
        raise ElfLoadError(f"malformed ELF file: {exc}") from None
    except Exception as exc:  # pyelftools reports truncation with assorted construct errors
        raise ElfLoadError(f"malformed ELF file ({type(exc).__name__}): {exc}") from None
    if machine not in (EM_386, EM_X86_64):
        raise ElfLoadError(f"ELF machine {machine} is not x86 (EM_386 or EM_X86_64)")
    if kind != "ET_EXEC":
        raise ElfLoadError(f"ELF type {kind} is not an executable (ET_EXEC)")
    loads = [s for s in segments if s["p_type"] == "PT_LOAD"]
    if not loads:
        raise ElfLoadError("the ELF file has no PT_LOAD segment")
    plan: list[tuple[int, bytes, int]] = []
    for i, seg in enumerate(loads):
        offset, filesz, memsz, paddr = (int(seg[k]) for k in ("p_offset", "p_filesz", "p_memsz", "p_paddr"))
        if filesz > memsz:
            raise ElfLoadError(f"PT_LOAD segment {i}: p_filesz {filesz:#x} is larger than p_memsz {memsz:#x}")
        if offset + filesz > len(data):
            raise ElfLoadError(
                f"PT_LOAD segment {i}: file bytes {offset:#x}..{offset + filesz:#x} run past the end of the file ({len(data):#x} bytes)"
            )
        for gpa in (paddr, paddr + max(memsz, 1) - 1):
            if not vm.memory.is_ram(gpa, True):
                raise ElfLoadError(f"PT_LOAD segment {i}: guest-physical {paddr:#x}..{paddr + memsz:#x} is not guest RAM")
        plan.append((paddr, data[offset : offset + filesz], memsz))
    # The entry point is a virtual address; accept it if a segment maps it (by p_vaddr).
    if not any(int(s["p_vaddr"]) <= entry < int(s["p_vaddr"]) + int(s["p_memsz"]) for s in loads):
        raise ElfLoadError(f"entry point {entry:#x} is outside every PT_LOAD segment")
    for paddr, content, memsz in plan:
        try:
            vm.write_guest(paddr, content + bytes(memsz - len(content)))
        except GuestMemoryError as exc:
            raise ElfLoadError(f"PT_LOAD segment at {paddr:#x}: {exc}") from None
    symbols: dict[str, int] = {}
    try:
        symtab = elf.get_section_by_name(".symtab")
        if symtab is not None and hasattr(symtab, "iter_symbols"):
            for sym in symtab.iter_symbols():
                if sym.name:
                    symbols[sym.name] = int(sym["st_value"])
    except Exception:  # a broken symbol table does not stop the load
        symbols = {}
    return LoadedImage(entry, tuple((p, m) for p, _, m in plan), symbols, 64 if elf.elfclass == 64 else 32)
