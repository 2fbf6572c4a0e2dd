"""Rendering of capability MSRs and the VMCS field table for the CLI."""

from __future__ import annotations

from enum import IntFlag

from rich.console import Console
from rich.table import Table

from pyvmx.arch.controls import (
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    VmEntryControls,
    VmExitControls,
)
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField, VmcsFieldType, VmcsWidth
from pyvmx.vmx import caps as capsmod
from pyvmx.vmx.caps import CpuProfile

CONTROL_CLASSES: list[tuple[str, type[IntFlag], Msr, str]] = [
    ("Pin-based VM-execution controls", PinBasedControls, Msr.IA32_VMX_TRUE_PINBASED_CTLS, "pin_based"),
    ("Primary processor-based controls", ProcBasedControls, Msr.IA32_VMX_TRUE_PROCBASED_CTLS, "proc_based"),
    ("Secondary processor-based controls", SecondaryProcBasedControls, Msr.IA32_VMX_PROCBASED_CTLS2, "secondary"),
    ("VM-exit controls", VmExitControls, Msr.IA32_VMX_TRUE_EXIT_CTLS, "exit_controls"),
    ("VM-entry controls", VmEntryControls, Msr.IA32_VMX_TRUE_ENTRY_CTLS, "entry_controls"),
]


def profile_without(names: tuple[str, ...]) -> CpuProfile:
    """The default profile minus the named controls; LookupError names an unknown control."""
    profile = CpuProfile.default()
    for name in names:
        key = name.upper().replace("-", "_")
        for _, cls, _, _ in CONTROL_CLASSES:
            if key in cls.__members__:
                try:
                    profile = profile.without(cls.__members__[key])  # type: ignore[arg-type]
                except ValueError as exc:
                    raise LookupError(str(exc)) from None
                break
        else:
            raise LookupError(f"unknown VMX control {name!r} (try e.g. UNRESTRICTED_GUEST, VMX_PREEMPTION_TIMER)")
    return profile


def _bit_names(cls: type[IntFlag], value: int) -> str:
    names = [m.name for m in cls if m.name and int(m) & value]
    return ", ".join(names) if names else "-"


def print_caps(console: Console, profile: CpuProfile, raw: bool = False) -> None:
    if raw:
        for msr in sorted({m for m in Msr if capsmod.CpuProfile.rdmsr(profile, m) is not None}):
            value = profile.rdmsr(msr)
            console.print(f"{Msr(msr).name:32} {int(msr):#x}  {value:#018x}")
        return
    console.print(f"[bold]{profile.name}[/bold]")
    basic = Table(title="IA32_VMX_BASIC / MISC / fixed bits", title_justify="left")
    basic.add_column("capability")
    basic.add_column("value", justify="right")
    basic.add_row("IA32_VMX_BASIC", f"{profile.vmx_basic:#018x}")
    basic.add_row("  VMCS revision identifier", f"{profile.revision_id:#x}")
    basic.add_row("  VMCS region size", "4096")
    basic.add_row("  true controls MSRs", "yes" if profile.true_controls else "no")
    basic.add_row("IA32_VMX_MISC", f"{profile.vmx_misc:#018x}")
    basic.add_row("  preemption timer rate (TSC >> N)", str(profile.preemption_timer_rate))
    basic.add_row("  CR3-target count", str(profile.cr3_target_count))
    basic.add_row("  VMWRITE to VM-exit information fields", "yes" if profile.vmwrite_any_field else "no")
    basic.add_row("IA32_VMX_CR0_FIXED0 / FIXED1", f"{profile.cr0_fixed0:#x} / {profile.cr0_fixed1:#x}")
    basic.add_row("IA32_VMX_CR4_FIXED0 / FIXED1", f"{profile.cr4_fixed0:#x} / {profile.cr4_fixed1:#x}")
    basic.add_row("IA32_VMX_EPT_VPID_CAP", f"{profile.ept_vpid_cap:#018x}")
    basic.add_row("IA32_VMX_VMCS_ENUM", f"{profile.vmcs_enum:#x}")
    console.print(basic)
    for title, cls, msr, attr in CONTROL_CLASSES:
        cap = profile.controls(attr)
        table = Table(title=f"{title}  ({Msr(msr).name} = {cap.msr_value:#018x})", title_justify="left")
        table.add_column("bit", justify="right")
        table.add_column("control")
        table.add_column("setting")
        names = {int(m).bit_length() - 1: m.name for m in cls}
        for bit in range(32):
            if bit not in names and not cap.must_be_one & (1 << bit):
                continue
            if cap.must_be_one & (1 << bit):
                setting = "must be 1"
            elif cap.may_be_one & (1 << bit):
                setting = "0 or 1"
            else:
                setting = "not supported"
            table.add_row(str(bit), names.get(bit) or "(reserved, default1)", setting)
        console.print(table)


_TYPE_NAMES = {
    VmcsFieldType.CONTROL: "control",
    VmcsFieldType.VM_EXIT_INFORMATION: "exit-info",
    VmcsFieldType.GUEST_STATE: "guest",
    VmcsFieldType.HOST_STATE: "host",
}
_WIDTH_NAMES = {VmcsWidth.BITS16: "16", VmcsWidth.BITS32: "32", VmcsWidth.BITS64: "64", VmcsWidth.NATURAL: "natural"}


def print_fields(console: Console, field_type: str | None, width: str | None, pattern: str | None) -> int:
    table = Table(title="VMCS fields (SDM Appendix B)", title_justify="left")
    table.add_column("encoding", justify="right")
    table.add_column("name")
    table.add_column("width", justify="right")
    table.add_column("type")
    shown = 0
    for field in VmcsField:
        if field_type and _TYPE_NAMES[field.type] != field_type:
            continue
        if width and _WIDTH_NAMES[field.width] != width:
            continue
        if pattern and pattern.upper() not in field.name:
            continue
        table.add_row(f"{int(field):#06x}", field.name, _WIDTH_NAMES[field.width], _TYPE_NAMES[field.type])
        shown += 1
    if shown:
        console.print(table)
    return shown
