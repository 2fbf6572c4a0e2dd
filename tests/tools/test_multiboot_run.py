"""``pyvmx run`` of a Multiboot kernel: EBX's information structure carries the command line
"IMAGE ARGS" (QEMU hw/i386/multiboot.c), and the debug-exit code becomes QEMU's isa-debug-exit
status ``(code << 1) | 1`` (hw/misc/debugexit.c)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmx.tools.run import RunOptions, run

MAGIC = 0x1BADB002
# mov 16(%ebx),%esi; movzbl (%esi),%eax; out %eax,$0xf4  -- exit with the command line's first byte
CODE = bytes.fromhex("8b7310" "0fb606" "e7f4")


def _image(tmp_path: Path) -> Path:
    flags = 1 << 16
    header = struct.pack("<IIIIIIII", MAGIC, flags, (-(MAGIC + flags)) & 0xFFFFFFFF,
                         0x100000, 0x100000, 0, 0x101000, 0x100020)
    path = tmp_path / "k.bin"
    path.write_bytes(header + CODE)
    return path


def test_multiboot_command_line_and_qemu_exit_status(tmp_path: Path) -> None:
    image = _image(tmp_path)
    result = run(RunOptions(image, memory_mib=4, append="x"))
    assert result.ending == "debug-exit"
    assert result.status == ((ord(str(image)[0]) << 1) | 1) & 0xFF


def test_append_without_multiboot_header_is_a_clear_error(tmp_path: Path) -> None:
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\xf4" * 16)
    with pytest.raises(ValueError, match="Multiboot"):  # the CLI prints it as one line, exit 2
        run(RunOptions(flat, memory_mib=4, append="x"))
