"""``pyvmx vmcs dump``: a VMCS printed area by area as Linux's ``dump_vmcs()`` prints it
(arch/x86/kvm/vmx/vmx.c: "*** Guest State ***", "*** Host State ***", "*** Control State ***"),
with what Linux leaves to the reader decoded: the names of the set control bits, the exception
bitmap's vectors, the exit reason by name and its qualification split into fields.

The input is anything with ``read(VmcsField) -> int``: the processor's current VMCS
(``cpu.vmcs``), a :class:`~pyvmx.vmx.vmcs.VmcsRegion`, or a :class:`VmcsSnapshot` loaded from a
saved file.  Saved files are JSON::

    {"format": "pyvmx-vmcs", "version": 1,
     "fields": {"GUEST_RIP": "0x10000", "PIN_BASED_VM_EXEC_CONTROL": "0x16", ...}}

Field names are :class:`~pyvmx.arch.vmcs_fields.VmcsField` names (Linux's ``enum vmcs_field``);
values are integers or strings in any base Python's ``int(x, 0)`` reads.  A field a file does not
list reads as 0, as in a VMCS after VMCLEAR.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from pyvmx.arch.controls import ProcBasedControls
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import width_bits
from pyvmx.tools.inputs import MAX_SCENARIO_BYTES, InputError, is_int, read_json
from pyvmx.vmx.vmcs_dump import VmcsReader

FORMAT_NAME = "pyvmx-vmcs"
FORMAT_VERSION = 1


class VmcsFileError(InputError):
    """A saved VMCS file that cannot be read: the message names the file and the problem."""


class VmcsSnapshot:
    """A VMCS as plain values (from a saved file, or copied from a live VMCS)."""

    def __init__(self, values: Mapping[F, int] | None = None) -> None:
        self.values: dict[F, int] = dict(values or {})

    def read(self, field: F) -> int:
        return self.values.get(field, 0)

    def write(self, field: F, value: int) -> None:
        bits = width_bits(field.width) or 64
        if not 0 <= value < (1 << bits):
            raise ValueError(f"{field.name} is a {bits}-bit field: {value:#x} does not fit")
        self.values[field] = value

    @classmethod
    def copy_of(cls, reader: VmcsReader) -> VmcsSnapshot:
        """Every field of ``reader`` (fields it refuses to read are left out)."""
        snap = cls()
        for field in F:
            try:
                snap.values[field] = reader.read(field)
            except Exception:  # a field this processor does not support: VMREAD would fail
                continue
        return snap


# --- saving and loading ------------------------------------------------------------------------
def vmcs_to_json(reader: VmcsReader) -> dict[str, object]:
    snap = VmcsSnapshot.copy_of(reader)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fields": {field.name: f"{value:#x}" for field, value in snap.values.items()},
    }


def save_vmcs(reader: VmcsReader, path: str | Path) -> None:
    """Write every field of ``reader`` to ``path`` in the JSON format above."""
    Path(path).write_text(json.dumps(vmcs_to_json(reader), indent=1) + "\n")


def vmcs_from_json(data: object, source: str = "VMCS file") -> VmcsSnapshot:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise VmcsFileError(f"{source}: not a saved VMCS (expected an object with \"format\": \"{FORMAT_NAME}\")")
    if data.get("version") != FORMAT_VERSION:
        raise VmcsFileError(f"{source}: unsupported version {data.get('version')!r} (this pyvmx reads version {FORMAT_VERSION})")
    fields = data.get("fields")
    if not isinstance(fields, dict):
        raise VmcsFileError(f"{source}: \"fields\" must be an object of field name -> value")
    snap = VmcsSnapshot()
    for name, raw in fields.items():
        field = F.__members__.get(str(name).upper())
        if field is None:
            raise VmcsFileError(f"{source}: unknown VMCS field {name!r}")
        try:
            if not (is_int(raw) or isinstance(raw, str)) or (isinstance(raw, str) and len(raw) > 64):
                raise ValueError(f"{str(raw)[:40]!r} is not an integer")
            value = raw if isinstance(raw, int) else int(raw, 0)
            snap.write(field, value)
        except ValueError as exc:
            raise VmcsFileError(f"{source}: field {name}: {exc}") from None
    return snap


def load_vmcs(path: str | Path) -> VmcsSnapshot:
    """A VMCS saved by :func:`save_vmcs`; :class:`VmcsFileError` says what is wrong."""
    try:
        data = read_json(path, what="saved VMCS (JSON)", limit=MAX_SCENARIO_BYTES)
    except InputError as exc:
        raise VmcsFileError(str(exc)) from None
    return vmcs_from_json(data, str(path))


EXAMPLE_GUESTS = {
    "long": "mov $0x3f8, %dx\nmov $0x41, %al\nport: out %al, %dx\nhlt\n",
    "protected": "mov $0x3f8, %dx\nmov $0x41, %al\nport: out %al, %dx\nhlt\n",
    "real": "mov $0x3f8, %dx\nmov $0x41, %al\nport: out %al, %dx\nhlt\n",
}


def example_vmcs(mode: str, run: bool = True) -> VmcsSnapshot:
    """A VMCS set up by the sandbox for a guest in ``mode`` ("long", "protected", "real") with
    port 0x3F8 intercepted through I/O bitmap A and HLT exiting; with ``run`` the guest runs to
    its first VM exit (the OUT to 0x3F8), so the exit-information fields are filled in."""
    from pyvmx.guest.sandbox import Mode, VmxSandbox

    if mode not in EXAMPLE_GUESTS:
        raise KeyError(f"no example for mode {mode!r} (choose from {', '.join(EXAMPLE_GUESTS)})")
    sb = VmxSandbox(cast("Mode", mode), EXAMPLE_GUESTS[mode])
    sb.use_io_bitmaps(intercept=[0x3F8])
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, ProcBasedControls.HLT_EXITING)
    if run:
        sb.run()
    return VmcsSnapshot.copy_of(sb.cpu.vmcs)
