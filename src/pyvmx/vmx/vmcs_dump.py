"""A VMCS as text, area by area, as Linux's ``dump_vmcs()`` prints it (arch/x86/kvm/vmx/vmx.c:
"*** Guest State ***", "*** Host State ***", "*** Control State ***"), with what Linux leaves to
the reader decoded: the names of the set control bits, the exception bitmap's vectors, the exit
reason by name and its qualification split into fields.  The hypervisor shows it on an unexpected
exit; ``pyvmx vmcs dump`` prints it.
"""

from __future__ import annotations

from enum import IntFlag
from typing import Protocol

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
from pyvmx.vmx.exitinfo import (
    decode_intr_info,
    decode_qualification,
    exception_bitmap_names,
    flag_names,
    format_fields,
    reason_name,
)


class VmcsReader(Protocol):
    """What the dump needs: width-correct reads by field (Linux's vmcs_read16/32/64/l)."""

    def read(self, field: F) -> int: ...


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
