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
from enum import IntFlag
from pathlib import Path
from typing import Protocol, cast

from pyvmx.arch.controls import (
    GuestActivityState,
    GuestInterruptibility,
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    TertiaryProcBasedControls,
    VmEntryControls,
    VmExitControls,
)
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.vmcs_fields import width_bits
from pyvmx.tools.exitinfo import (
    decode_intr_info,
    decode_qualification,
    exception_bitmap_names,
    flag_names,
    format_fields,
    reason_name,
)

FORMAT_NAME = "pyvmx-vmcs"
FORMAT_VERSION = 1


class VmcsReader(Protocol):
    """What the dump needs: width-correct reads by field (Linux's vmcs_read16/32/64/l)."""

    def read(self, field: F) -> int: ...


class VmcsFileError(ValueError):
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
            value = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(str(raw), 0)
            snap.write(field, value)
        except ValueError as exc:
            raise VmcsFileError(f"{source}: field {name}: {exc}") from None
    return snap


def load_vmcs(path: str | Path) -> VmcsSnapshot:
    """A VMCS saved by :func:`save_vmcs`; :class:`VmcsFileError` says what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise VmcsFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VmcsFileError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return vmcs_from_json(data, str(path))


# --- the dump ----------------------------------------------------------------------------------
def _sel(r: VmcsReader, name: str, seg: str) -> str:
    # vmx_dump_sel(): "%s sel=0x%04x, attr=0x%05x, limit=0x%08x, base=0x%016lx"
    return (
        f"{name} sel=0x{r.read(F[f'GUEST_{seg}_SELECTOR']):04x}, attr=0x{r.read(F[f'GUEST_{seg}_AR_BYTES']):05x}, "
        f"limit=0x{r.read(F[f'GUEST_{seg}_LIMIT']):08x}, base=0x{r.read(F[f'GUEST_{seg}_BASE']):016x}"
    )


def _dtsel(r: VmcsReader, name: str, table: str) -> str:
    # vmx_dump_dtsel(): "%s                           limit=0x%08x, base=0x%016lx"
    return f"{name}                           limit=0x{r.read(F[f'GUEST_{table}_LIMIT']):08x}, base=0x{r.read(F[f'GUEST_{table}_BASE']):016x}"


def _names(names: list[str]) -> str:
    return " ".join(names) if names else "-"


def _controls(cls: type[IntFlag], value: int, width: int = 32) -> str:
    """Named set bits, then the set bits the SDM leaves unnamed (the default1 "reserved" bits of
    SDM A.3-A.5, which a VMCS built against the non-TRUE capability MSRs keeps set)."""
    names = flag_names(cls, value, width=width)
    named = [n for n in names if not n.startswith("bit")]
    unnamed = [n[3:] for n in names if n.startswith("bit")]
    text = _names(named)
    if unnamed:
        text += f" (+ unnamed bits {','.join(unnamed)})"
    return text


def dump_vmcs(r: VmcsReader, title: str | None = None) -> str:
    """The VMCS as text, in the order and format of Linux's dump_vmcs(), plus decoded lines
    (indented by two spaces) after the control words and the exit information."""
    pin = r.read(F.PIN_BASED_VM_EXEC_CONTROL)
    cpu_based = r.read(F.CPU_BASED_VM_EXEC_CONTROL)
    secondary = r.read(F.SECONDARY_VM_EXEC_CONTROL) if cpu_based & ProcBasedControls.ACTIVATE_SECONDARY_CONTROLS else 0
    tertiary = r.read(F.TERTIARY_VM_EXEC_CONTROL) if cpu_based & ProcBasedControls.ACTIVATE_TERTIARY_CONTROLS else 0
    entry = r.read(F.VM_ENTRY_CONTROLS)
    exit_ctl = r.read(F.VM_EXIT_CONTROLS)
    out: list[str] = []
    p = out.append
    if title:
        p(title)

    p("*** Guest State ***")
    p(f"CR0: actual=0x{r.read(F.GUEST_CR0):016x}, shadow=0x{r.read(F.CR0_READ_SHADOW):016x}, gh_mask={r.read(F.CR0_GUEST_HOST_MASK):016x}")
    p(f"CR4: actual=0x{r.read(F.GUEST_CR4):016x}, shadow=0x{r.read(F.CR4_READ_SHADOW):016x}, gh_mask={r.read(F.CR4_GUEST_HOST_MASK):016x}")
    p(f"CR3 = 0x{r.read(F.GUEST_CR3):016x}")
    if secondary & SecondaryProcBasedControls.ENABLE_EPT:
        p(f"PDPTR0 = 0x{r.read(F.GUEST_PDPTR0):016x}  PDPTR1 = 0x{r.read(F.GUEST_PDPTR1):016x}")
        p(f"PDPTR2 = 0x{r.read(F.GUEST_PDPTR2):016x}  PDPTR3 = 0x{r.read(F.GUEST_PDPTR3):016x}")
    p(f"RSP = 0x{r.read(F.GUEST_RSP):016x}  RIP = 0x{r.read(F.GUEST_RIP):016x}")
    p(f"RFLAGS=0x{r.read(F.GUEST_RFLAGS):08x}         DR7 = 0x{r.read(F.GUEST_DR7):016x}")
    p(f"Sysenter RSP={r.read(F.GUEST_SYSENTER_ESP):016x} CS:RIP={r.read(F.GUEST_SYSENTER_CS):04x}:{r.read(F.GUEST_SYSENTER_EIP):016x}")
    for name, seg in (("CS:  ", "CS"), ("DS:  ", "DS"), ("SS:  ", "SS"), ("ES:  ", "ES"), ("FS:  ", "FS"), ("GS:  ", "GS")):
        p(_sel(r, name, seg))
    p(_dtsel(r, "GDTR:", "GDTR"))
    p(_sel(r, "LDTR:", "LDTR"))
    p(_dtsel(r, "IDTR:", "IDTR"))
    p(_sel(r, "TR:  ", "TR"))
    if entry & VmEntryControls.LOAD_IA32_EFER:
        p(f"EFER= 0x{r.read(F.GUEST_IA32_EFER):016x}")
    else:
        lma = " (IA-32e mode guest)" if entry & VmEntryControls.IA32E_MODE else ""
        p(f"EFER= not loaded on entry{lma}")
    if entry & VmEntryControls.LOAD_IA32_PAT:
        p(f"PAT = 0x{r.read(F.GUEST_IA32_PAT):016x}")
    p(f"DebugCtl = 0x{r.read(F.GUEST_IA32_DEBUGCTL):016x}  DebugExceptions = 0x{r.read(F.GUEST_PENDING_DBG_EXCEPTIONS):016x}")
    if entry & VmEntryControls.LOAD_IA32_PERF_GLOBAL_CTRL:
        p(f"PerfGlobCtl = 0x{r.read(F.GUEST_IA32_PERF_GLOBAL_CTRL):016x}")
    if entry & VmEntryControls.LOAD_BNDCFGS:
        p(f"BndCfgS = 0x{r.read(F.GUEST_BNDCFGS):016x}")
    intr = r.read(F.GUEST_INTERRUPTIBILITY_INFO)
    activity = r.read(F.GUEST_ACTIVITY_STATE)
    p(f"Interruptibility = {intr:08x}  ActivityState = {activity:08x}")
    try:
        activity_name = GuestActivityState(activity).name
    except ValueError:
        activity_name = f"reserved ({activity})"
    p(f"  Interruptibility: {_names(flag_names(GuestInterruptibility, intr))}  ActivityState: {activity_name}")
    if secondary & SecondaryProcBasedControls.VIRTUAL_INTR_DELIVERY:
        p(f"InterruptStatus = {r.read(F.GUEST_INTR_STATUS):04x}")
    if pin & PinBasedControls.VMX_PREEMPTION_TIMER:
        p(f"PreemptionTimer = {r.read(F.VMX_PREEMPTION_TIMER_VALUE):08x}")
    p(f"VMCS link pointer = 0x{r.read(F.VMCS_LINK_POINTER):016x}")

    p("*** Host State ***")
    p(f"RIP = 0x{r.read(F.HOST_RIP):016x}  RSP = 0x{r.read(F.HOST_RSP):016x}")
    p(
        "CS={:04x} SS={:04x} DS={:04x} ES={:04x} FS={:04x} GS={:04x} TR={:04x}".format(
            *(r.read(F[f"HOST_{s}_SELECTOR"]) for s in ("CS", "SS", "DS", "ES", "FS", "GS", "TR"))
        )
    )
    p(f"FSBase={r.read(F.HOST_FS_BASE):016x} GSBase={r.read(F.HOST_GS_BASE):016x} TRBase={r.read(F.HOST_TR_BASE):016x}")
    p(f"GDTBase={r.read(F.HOST_GDTR_BASE):016x} IDTBase={r.read(F.HOST_IDTR_BASE):016x}")
    p(f"CR0={r.read(F.HOST_CR0):016x} CR3={r.read(F.HOST_CR3):016x} CR4={r.read(F.HOST_CR4):016x}")
    p(f"Sysenter RSP={r.read(F.HOST_IA32_SYSENTER_ESP):016x} CS:RIP={r.read(F.HOST_IA32_SYSENTER_CS):04x}:{r.read(F.HOST_IA32_SYSENTER_EIP):016x}")
    if exit_ctl & VmExitControls.LOAD_IA32_EFER:
        p(f"EFER= 0x{r.read(F.HOST_IA32_EFER):016x}")
    if exit_ctl & VmExitControls.LOAD_IA32_PAT:
        p(f"PAT = 0x{r.read(F.HOST_IA32_PAT):016x}")
    if exit_ctl & VmExitControls.LOAD_IA32_PERF_GLOBAL_CTRL:
        p(f"PerfGlobCtl = 0x{r.read(F.HOST_IA32_PERF_GLOBAL_CTRL):016x}")

    p("*** Control State ***")
    p(f"CPUBased=0x{cpu_based:08x} SecondaryExec=0x{secondary:08x} TertiaryExec=0x{tertiary:016x}")
    p(f"PinBased=0x{pin:08x} EntryControls={entry:08x} ExitControls={exit_ctl:08x}")
    p(f"  PinBased:      {_controls(PinBasedControls, pin)}")
    p(f"  CPUBased:      {_controls(ProcBasedControls, cpu_based)}")
    p(f"  SecondaryExec: {_controls(SecondaryProcBasedControls, secondary)}")
    if tertiary:
        p(f"  TertiaryExec:  {_controls(TertiaryProcBasedControls, tertiary, width=64)}")
    p(f"  EntryControls: {_controls(VmEntryControls, entry)}")
    p(f"  ExitControls:  {_controls(VmExitControls, exit_ctl)}")
    bitmap = r.read(F.EXCEPTION_BITMAP)
    p(f"ExceptionBitmap={bitmap:08x} PFECmask={r.read(F.PAGE_FAULT_ERROR_CODE_MASK):08x} PFECmatch={r.read(F.PAGE_FAULT_ERROR_CODE_MATCH):08x}")
    p(f"  ExceptionBitmap: {_names(exception_bitmap_names(bitmap))}")
    entry_intr = r.read(F.VM_ENTRY_INTR_INFO_FIELD)
    p(f"VMEntry: intr_info={entry_intr:08x} errcode={r.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE):08x} ilen={r.read(F.VM_ENTRY_INSTRUCTION_LEN):08x}")
    if decode_intr_info(entry_intr).get("valid"):
        p(f"  VMEntry intr_info: {format_fields(decode_intr_info(entry_intr))}")
    exit_intr = r.read(F.VM_EXIT_INTR_INFO)
    p(f"VMExit: intr_info={exit_intr:08x} errcode={r.read(F.VM_EXIT_INTR_ERROR_CODE):08x} ilen={r.read(F.VM_EXIT_INSTRUCTION_LEN):08x}")
    reason = r.read(F.VM_EXIT_REASON)
    qual = r.read(F.EXIT_QUALIFICATION)
    p(f"        reason={reason:08x} qualification={qual:016x}")
    p(f"  Exit reason: {reason_name(reason)} ({reason & 0xFFFF})")
    fields = decode_qualification(reason, qual, exit_intr)
    if fields:
        p(f"  Exit qualification: {format_fields(fields)}")
    if decode_intr_info(exit_intr).get("valid"):
        p(f"  VMExit intr_info: {format_fields(decode_intr_info(exit_intr))}")
    p(f"IDTVectoring: info={r.read(F.IDT_VECTORING_INFO_FIELD):08x} errcode={r.read(F.IDT_VECTORING_ERROR_CODE):08x}")
    p(f"TSC Offset = 0x{r.read(F.TSC_OFFSET):016x}")
    if secondary & SecondaryProcBasedControls.TSC_SCALING:
        p(f"TSC Multiplier = 0x{r.read(F.TSC_MULTIPLIER):016x}")
    if cpu_based & ProcBasedControls.TPR_SHADOW:
        p(f"TPR Threshold = 0x{r.read(F.TPR_THRESHOLD):02x}")
        p(f"virt-APIC addr = 0x{r.read(F.VIRTUAL_APIC_PAGE_ADDR):016x}")
    if pin & PinBasedControls.POSTED_INTR:
        p(f"PostedIntrVec = 0x{r.read(F.POSTED_INTR_NV):02x}")
    if secondary & SecondaryProcBasedControls.ENABLE_EPT:
        p(f"EPT pointer = 0x{r.read(F.EPT_POINTER):08x}")
    if secondary & SecondaryProcBasedControls.PAUSE_LOOP_EXITING:
        p(f"PLE Gap={r.read(F.PLE_GAP):08x} Window={r.read(F.PLE_WINDOW):08x}")
    if secondary & SecondaryProcBasedControls.ENABLE_VPID:
        p(f"Virtual processor ID = 0x{r.read(F.VIRTUAL_PROCESSOR_ID):04x}")
    if cpu_based & ProcBasedControls.USE_IO_BITMAPS:
        p(f"I/O bitmap A = 0x{r.read(F.IO_BITMAP_A):016x}  I/O bitmap B = 0x{r.read(F.IO_BITMAP_B):016x}")
    if cpu_based & ProcBasedControls.USE_MSR_BITMAPS:
        p(f"MSR bitmap = 0x{r.read(F.MSR_BITMAP):016x}")
    error = r.read(F.VM_INSTRUCTION_ERROR)
    if error:
        p(f"VM-instruction error = {error}")
    return "\n".join(out) + "\n"


# --- built-in examples ---------------------------------------------------------------------------
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
