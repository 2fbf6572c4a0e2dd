"""Plain ``gdb -ex 'target remote :N'`` with no ``set architecture``: the stub serves a target
description (qXfer:features:read, gdb manual "Target Descriptions"; as QEMU's gdbstub does)
for the vCPU's mode when gdb connects -- i386:x86-64 in IA-32e mode, i386 in 32-bit protected
mode, i8086 in real mode (SDM 3.4.5: the code size from CR0.PE, EFER.LMA, CS.L/CS.D) -- and
the 'g' packet follows its register layout."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyvmx.tools.gdb_tdesc import AMD64, I386, LEGACY, layout_for
from tests.tools.gdb_session import needs_gdb, registers, run_with_gdb

GUEST = "_start:\n mov $0x2a, %al\n out %al, $0xf4\n hlt\n"
ENTRY = {"real": 0x8000, "protected": 0x10000, "long": 0x10000}


def test_descriptions_are_well_formed_and_match_the_packet_layout() -> None:
    for layout in (AMD64, I386, layout_for(16)):
        root = ET.fromstring(layout.xml().split("\n", 2)[2])  # after the XML and DOCTYPE lines
        assert root.findtext("architecture") == layout.architecture
        regs = root.iter("reg")
        assert [r.get("name") for r in regs] == [r.name for r in layout.registers]
    # gdb's amd64 numbering: the first 57 registers are those it assumes with no description.
    assert AMD64.registers[: len(LEGACY.registers)] == LEGACY.registers
    assert sum(r.size for r in LEGACY.registers) == 536
    assert [r.name for r in I386.registers[:9]] == ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip"]
    assert layout_for(16).architecture == "i8086" and layout_for(32).architecture == "i386"


@needs_gdb
@pytest.mark.parametrize(("mode", "architecture", "pc"), [
    ("long", "i386:x86-64", "rip"), ("protected", "i386", "eip"), ("real", "i8086", "eip"),
])
def test_plain_target_remote_learns_the_architecture(tmp_path: Path, mode: str, architecture: str, pc: str) -> None:
    image = tmp_path / "guest.S"
    image.write_text(GUEST)
    session = run_with_gdb(image, ["show architecture", f"info registers {pc}", "x/2i $pc", "p/x $cr0", "si",
                                   f"info registers {pc}", "c"], "--mode", mode)
    out = session.gdb.stdout
    assert f'(currently "{architecture}")' in out, session.gdb_output
    assert registers(out, pc) == [ENTRY[mode], ENTRY[mode] + 2], session.gdb_output
    assert "mov    $0x2a,%al" in out and "out    %al,$0xf4" in out, session.gdb_output
    cr0 = [int(line.split()[-1], 16) for line in out.splitlines() if line.startswith("$1 = ")]
    assert cr0 and bool(cr0[0] & 1) == (mode != "real"), session.gdb_output  # CR0.PE
    for complaint in ("Attempting to continue with the default", "reply is too long", "Truncated register"):
        assert complaint not in session.gdb_output, session.gdb_output
    assert session.status == 42, session.stderr


def test_a_32_bit_register_write_keeps_the_upper_half() -> None:
    """P/G for eax in the i386 layout write the low half of the target's RAX (a 32-bit view)."""
    from pyvmx.tools.gdb_tdesc import merge

    eax = I386.registers[0]
    assert eax.name == "eax" and eax.source == "rax"
    assert merge(eax, 0x1234, {"rax": 0xAAAA_BBBB_0000_0001}) == 0xAAAA_BBBB_0000_1234
    data = (0x55).to_bytes(4, "little") + (0x66).to_bytes(4, "little")  # eax, ecx
    assert I386.decode(data, {"rax": 1 << 40, "rcx": 2 << 40}) == {"rax": (1 << 40) | 0x55, "rcx": (2 << 40) | 0x66}
    rip = AMD64.registers[16]
    assert merge(rip, 0x10, {"rip": 0xFFFF_0000}) == 0x10
