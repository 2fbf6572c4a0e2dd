"""A plain-text dump of the current VMCS by area, for InternalError / FailEntry exits (Linux's
dump_vmcs(), arch/x86/kvm/vmx/vmx.c). Every field of :class:`VmcsField`, grouped by the type bits
of its encoding (SDM 25.11.2): controls, VM-exit information, guest state, host state.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmx.arch.vmcs_fields import VmcsField, VmcsFieldType, VmcsWidth

_AREA_TITLES = {
    VmcsFieldType.GUEST_STATE: "*** Guest State ***",
    VmcsFieldType.HOST_STATE: "*** Host State ***",
    VmcsFieldType.CONTROL: "*** Control State ***",
    VmcsFieldType.VM_EXIT_INFORMATION: "*** Exit Info ***",
}
_DIGITS = {VmcsWidth.BITS16: 4, VmcsWidth.BITS32: 8, VmcsWidth.BITS64: 16, VmcsWidth.NATURAL: 16}


def dump_vmcs(read: Callable[[VmcsField], int | None], *, title: str = "VMCS") -> str:
    """The dump, one ``NAME = value`` line per field, areas in dump_vmcs()'s order. ``read``
    returns None for a field it cannot read (it is then shown as ``-``)."""
    lines = [f"{title}:"]
    for area in (VmcsFieldType.GUEST_STATE, VmcsFieldType.HOST_STATE, VmcsFieldType.CONTROL, VmcsFieldType.VM_EXIT_INFORMATION):
        lines.append(_AREA_TITLES[area])
        for field in sorted((f for f in VmcsField if f.type is area), key=int):
            value = read(field)
            shown = "-" if value is None else f"{value:#0{_DIGITS[field.width] + 2}x}"
            lines.append(f"  {field.name:<40} = {shown}")
    return "\n".join(lines)
