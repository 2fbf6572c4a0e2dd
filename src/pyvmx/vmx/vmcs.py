"""The VMCS region in simulated physical memory (SDM 25.2 "Format of the VMCS Region").

Bytes 0-3 hold the VMCS revision identifier (bit 31: shadow-VMCS indicator) and bytes 4-7 the
VMX-abort indicator, as the SDM fixes them.  The rest is "VMCS data", whose format the SDM
leaves to the implementation: here, the launch state, the VMXON session that launched it, and one
8-byte slot per VMCS component, laid out in encoding order.  Fields are stored truncated to their
width and read masked to it, so a read always returns what the processor would -- even after
software wrote the region's memory directly.
"""

from __future__ import annotations

import struct

from pyvmx.arch.vmcs_fields import (
    VmcsAccessType,
    VmcsField,
    VmcsFieldType,
    VmcsWidth,
    encoding_access_type,
)
from pyvmx.vmx.memory import PhysicalMemory

VMCS_REVISION_OFFSET = 0
VMCS_ABORT_OFFSET = 4
VMCS_LAUNCH_STATE_OFFSET = 8  # implementation-specific: 0 = clear, 1 = launched
VMCS_SESSION_OFFSET = 12  # implementation-specific: the VMXON session of the VMLAUNCH
VMCS_DATA_OFFSET = 16
VMCS_SHADOW_INDICATOR = 1 << 31

LAUNCH_STATE_CLEAR = 0
LAUNCH_STATE_LAUNCHED = 1

_WIDTH_MASK = {
    VmcsWidth.BITS16: 0xFFFF,
    VmcsWidth.BITS32: 0xFFFFFFFF,
    VmcsWidth.BITS64: 0xFFFFFFFFFFFFFFFF,
    VmcsWidth.NATURAL: 0xFFFFFFFFFFFFFFFF,  # a 64-bit processor
}

# encoding -> (offset in region, value mask); the HIGH access encodings of 64-bit fields map to
# the upper 4 bytes of the same slot.  Slots are grouped by field type (controls, VM-exit
# information, guest state, host state) so that each area is one contiguous byte range
# (AREA_RANGES): the processor compares areas between entries to skip re-checking them.
FIELD_SLOTS: dict[int, tuple[int, int]] = {}
AREA_RANGES: dict[VmcsFieldType, tuple[int, int]] = {}
_ordered = sorted(VmcsField, key=lambda f: (int(f.type), int(f)))
for _i, _field in enumerate(_ordered):
    _offset = VMCS_DATA_OFFSET + 8 * _i
    FIELD_SLOTS[int(_field)] = (_offset, _WIDTH_MASK[_field.width])
    if _field.width is VmcsWidth.BITS64:
        FIELD_SLOTS[int(_field) | 1] = (_offset + 4, 0xFFFFFFFF)
    start, _ = AREA_RANGES.get(_field.type, (_offset, 0))
    AREA_RANGES[_field.type] = (start, _offset + 8)
assert VMCS_DATA_OFFSET + 8 * len(VmcsField) <= 4096, "VMCS data must fit in the 4 KiB region"
# Every field slot, in slot order: the field whose value slot i holds is SLOT_FIELDS[i].
SLOT_FIELDS: tuple[VmcsField, ...] = tuple(_ordered)
VMCS_DATA_END = VMCS_DATA_OFFSET + 8 * len(SLOT_FIELDS)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def is_supported_encoding(encoding: int) -> bool:
    """Whether ``encoding`` names a VMCS component of this processor (else VM-instruction error 12)."""
    return encoding in FIELD_SLOTS


class VmcsRegion:
    """A VMCS region at ``address``; the processor's VMREAD/VMWRITE land here.

    Software outside the processor should not use this class directly (SDM 25.11.1: the VMCS
    data format is implementation-specific); it exists for the processor and for VMCS dumps.
    """

    __slots__ = ("memory", "address", "_buf")

    def __init__(self, memory: PhysicalMemory, address: int) -> None:
        memory.view(address, 4096)  # bounds check
        self.memory = memory
        self.address = address
        self._buf = memory._buf

    # --- header ---------------------------------------------------------------------------
    @property
    def revision_word(self) -> int:
        return self.memory.read32(self.address + VMCS_REVISION_OFFSET)

    @property
    def abort_indicator(self) -> int:
        return self.memory.read32(self.address + VMCS_ABORT_OFFSET)

    @abort_indicator.setter
    def abort_indicator(self, value: int) -> None:
        self.memory.write32(self.address + VMCS_ABORT_OFFSET, value)

    @property
    def launch_state(self) -> int:
        return self.memory.read32(self.address + VMCS_LAUNCH_STATE_OFFSET)

    @launch_state.setter
    def launch_state(self, value: int) -> None:
        self.memory.write32(self.address + VMCS_LAUNCH_STATE_OFFSET, value)

    @property
    def session(self) -> int:
        return self.memory.read32(self.address + VMCS_SESSION_OFFSET)

    @session.setter
    def session(self, value: int) -> None:
        self.memory.write32(self.address + VMCS_SESSION_OFFSET, value)

    def area_bytes(self, area: VmcsFieldType) -> bytes:
        """The raw bytes of one VMCS area (for change detection between VM entries)."""
        start, end = AREA_RANGES[area]
        return bytes(self._buf[self.address + start : self.address + end])

    def data_bytes(self) -> bytes:
        """The raw bytes of every field slot (for change detection between VM entries)."""
        return bytes(self._buf[self.address + VMCS_DATA_OFFSET : self.address + VMCS_DATA_END])

    def initialize_data(self) -> None:
        """VMCLEAR's "initialize implementation-specific data in VMCS region"."""
        self.launch_state = LAUNCH_STATE_CLEAR

    # --- fields ---------------------------------------------------------------------------
    def read(self, field: VmcsField) -> int:
        """The value of ``field``, zero-extended and masked to its width (no access checks: the
        processor made them).  The slot may hold more: memory written behind the processor's
        back, not by VMWRITE (SDM 25.11.1 leaves that undefined); a field reads as the width the
        processor holds, whatever the bytes beyond it."""
        offset, mask = FIELD_SLOTS[field]
        return int(_U64.unpack_from(self._buf, self.address + offset)[0]) & mask

    def write(self, field: VmcsField, value: int) -> None:
        """Store ``value`` truncated to the width of ``field``."""
        offset, mask = FIELD_SLOTS[field]
        _U64.pack_into(self._buf, self.address + offset, value & mask)

    def read_encoding(self, encoding: int) -> int:
        """VMREAD semantics for any supported encoding, including HIGH access of 64-bit fields."""
        offset, mask = FIELD_SLOTS[encoding]
        if encoding_access_type(encoding) is VmcsAccessType.HIGH:
            return int(_U32.unpack_from(self._buf, self.address + offset)[0])
        return int(_U64.unpack_from(self._buf, self.address + offset)[0]) & mask

    def write_encoding(self, encoding: int, value: int) -> None:
        """VMWRITE semantics: truncate to the field width; HIGH access writes bits 63:32 only."""
        offset, mask = FIELD_SLOTS[encoding]
        if encoding_access_type(encoding) is VmcsAccessType.HIGH:
            _U32.pack_into(self._buf, self.address + offset, value & mask)
        else:
            _U64.pack_into(self._buf, self.address + offset, value & mask)
