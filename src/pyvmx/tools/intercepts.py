"""Intercepts as people say them -- ``io:0x3f8``, ``msr-write:IA32_EFER``, ``cr0:PG``,
``exception:PF``, ``hlt``, ``preemption-timer:100`` -- parsed into :class:`Intercept` records and
gathered into an :class:`InterceptPlan`: the VM-execution, VM-exit controls, bitmaps, masks and
exception bitmap that make exactly those guest actions exit (SDM 25.6, 26.1-26.2).

Grammar: ``KIND`` or ``KIND:TARGET``; names are case-insensitive, ``-`` and ``_`` are the same;
numbers are accepted wherever a name is (``0x3f8``, ``0xc0000080``, ``14``).

=============================  ==================================================================
``io`` ``io:all``              unconditional I/O exiting (every IN/OUT/INS/OUTS)
``io:PORT`` ``io:LO-HI``       I/O bitmaps A/B with those ports set (SDM 25.6.4): only those
                               ports exit (``pyvmx run`` keeps the debug-exit port 0xF4)
``msr`` ``msr-read``           MSR bitmap with every read and/or write set (SDM 25.6.9);
``msr-write`` (``:all`` too)   ``msr:all`` is ``msr``
``msr:NAME`` ``msr-read:NAME``  MSR bitmap with one MSR set; NAME as in Linux msr-index.h or the
``msr-write:NAME``             SDM (``IA32_EFER``, ``EFER``, ``LSTAR``), or the MSR number
``cr0:BITS`` ``cr4:BITS``      CR0/CR4 guest/host mask bits (``PG``, ``PG+TS``, or bit numbers);
                               without BITS, the whole register (SDM 25.6.6)
``exception:VEC``              exception-bitmap bit (``PF``, ``#GP``, ``page-fault``, ``14``);
                               without VEC, every exception (SDM 25.6.3)
``hlt`` ``pause`` ``invlpg``   primary processor-based controls (SDM 25.6.2)
``rdtsc`` ``rdpmc`` ``mwait``
``monitor`` ``mov-dr``
``cr3-load`` ``cr3-store``
``cr8-load`` ``cr8-store``
``interrupt-window``
``nmi-window`` ``mtf``
``wbinvd`` ``rdrand``          secondary processor-based controls
``rdseed`` ``desc``
``external-interrupt[:noack]`` pin-based external-interrupt exiting, with "acknowledge interrupt
                               on exit" unless ``noack`` (as KVM sets it)
``nmi``                        pin-based NMI exiting
``preemption-timer:VALUE``     activate the VMX-preemption timer with VALUE, saved on exit; VALUE
                               is the VMCS field's, in timer ticks (TSC >> IA32_VMX_MISC[4:0],
                               SDM 25.5.1), the same in ``run`` and ``check``
``control:NAME``               any VM-execution/exit/entry control by its Linux name
``cpuid`` ``invd`` ``xsetbv``  always exit (SDM 26.1.2): accepted, nothing to set
``getsec`` ``vmcall`` ...
=============================  ==================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from pyvmx.arch.controls import (
    PinBasedControls as P,
    ProcBasedControls as C,
    SecondaryProcBasedControls as S,
    VmEntryControls as E,
    VmExitControls as X,
)
from pyvmx.arch.msr import Msr, UnknownNameError, msr_by_name
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, ExceptionVector


class InterceptError(ValueError):
    """An intercept that cannot be parsed or applied; the message names the bad token."""


@dataclass(frozen=True, slots=True)
class Intercept:
    """One parsed intercept.  ``target`` is the port, MSR index, CR mask, vector, timer value
    or control bit (None: the whole class); ``end`` the last port of a range."""

    kind: str
    target: int | None = None
    end: int | None = None
    option: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.kind


# kind -> (control class, bits) for the intercepts that are one control bit.
_CONTROL_KINDS: dict[str, tuple[type[IntFlag], int]] = {
    "hlt": (C, C.HLT_EXITING),
    "pause": (C, C.PAUSE_EXITING),
    "invlpg": (C, C.INVLPG_EXITING),
    "rdtsc": (C, C.RDTSC_EXITING),
    "rdpmc": (C, C.RDPMC_EXITING),
    "mwait": (C, C.MWAIT_EXITING),
    "monitor": (C, C.MONITOR_EXITING),
    "mov-dr": (C, C.MOV_DR_EXITING),
    "dr": (C, C.MOV_DR_EXITING),
    "cr3-load": (C, C.CR3_LOAD_EXITING),
    "cr3-store": (C, C.CR3_STORE_EXITING),
    "cr8-load": (C, C.CR8_LOAD_EXITING),
    "cr8-store": (C, C.CR8_STORE_EXITING),
    "interrupt-window": (C, C.INTR_WINDOW_EXITING),
    "nmi-window": (C, C.NMI_WINDOW_EXITING),
    "mtf": (C, C.MONITOR_TRAP_FLAG),
    "monitor-trap-flag": (C, C.MONITOR_TRAP_FLAG),
    "wbinvd": (S, S.WBINVD_EXITING),
    "rdrand": (S, S.RDRAND_EXITING),
    "rdseed": (S, S.RDSEED_EXITING),
    "desc": (S, S.DESC),
    "descriptor-table": (S, S.DESC),
    "nmi": (P, P.NMI_EXITING),
}
# Instructions and events that exit whatever the controls say (SDM 26.1.2, 26.2).
_ALWAYS_EXIT = frozenset({"cpuid", "invd", "xsetbv", "getsec", "vmcall", "triple-fault", "init", "sipi", "task-switch",
                          "vmlaunch", "vmresume", "vmclear", "vmptrld", "vmptrst", "vmread", "vmwrite", "vmxoff", "vmxon",
                          "invept", "invvpid"})
_WITH_TARGET = frozenset({"io", "msr", "msr-read", "msr-write", "cr0", "cr4", "exception", "external-interrupt",
                          "preemption-timer", "control"})
KNOWN_KINDS = sorted(_WITH_TARGET | set(_CONTROL_KINDS) | _ALWAYS_EXIT)

_EXCEPTION_ALIASES = {
    "DIVIDE-ERROR": ExceptionVector.DE, "DEBUG": ExceptionVector.DB, "BREAKPOINT": ExceptionVector.BP,
    "OVERFLOW": ExceptionVector.OF, "INVALID-OPCODE": ExceptionVector.UD, "DOUBLE-FAULT": ExceptionVector.DF,
    "GENERAL-PROTECTION": ExceptionVector.GP, "PAGE-FAULT": ExceptionVector.PF, "PAGEFAULT": ExceptionVector.PF,
    "MACHINE-CHECK": ExceptionVector.MC, "ALIGNMENT-CHECK": ExceptionVector.AC,
}
_CONTROL_CLASSES: tuple[type[IntFlag], ...] = (P, C, S, X, E)


def _norm(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def _number(token: str) -> int | None:
    try:
        return int(token, 0)
    except ValueError:
        return None


def _cr_mask(cls: type[IntFlag], token: str, spec: str) -> int:
    mask = 0
    for part in re.split(r"[+,|]", token):
        part = part.strip()
        if not part:
            continue
        n = _number(part)
        if n is not None:
            if not 0 <= n < 64:
                raise InterceptError(f"bit number {part!r} in {spec!r} is outside 0..63")
            mask |= 1 << n
            continue
        key = part.upper().removeprefix(f"{cls.__name__.upper()}.").removeprefix("X86_CR0_").removeprefix("X86_CR4_")
        if key not in cls.__members__:
            raise InterceptError(f"unknown {cls.__name__.upper()} bit {part!r} in {spec!r} (e.g. {', '.join(list(cls.__members__)[:4])})")
        mask |= int(cls.__members__[key])
    return mask


def parse_vector(token: str, spec: str | None = None, limit: int = 32) -> int:
    """An exception vector from "PF", "#PF", "page-fault", "14" or "0xe" (numbers below
    ``limit``: 32 for the exception bitmap, 256 for any interrupt vector)."""
    n = _number(token)
    if n is not None:
        if not 0 <= n < limit:
            raise InterceptError(f"vector {token!r}{f' in {spec!r}' if spec else ''} is outside 0..{limit - 1}")
        return n
    key = token.strip().upper().lstrip("#").replace("_", "-")
    if key in ExceptionVector.__members__:
        return int(ExceptionVector.__members__[key])
    if key in _EXCEPTION_ALIASES:
        return int(_EXCEPTION_ALIASES[key])
    raise InterceptError(f"unknown exception {token!r}{f' in {spec!r}' if spec else ''} (e.g. PF, GP, UD, DB, BP or a vector number)")


def parse_msr(token: str, spec: str | None = None) -> int:
    n = _number(token)
    if n is not None:
        if not 0 <= n <= 0xFFFFFFFF:
            raise InterceptError(f"MSR number {token!r} in {spec!r} is outside 0..0xffffffff")
        return n
    try:
        return int(msr_by_name(token))
    except UnknownNameError:
        raise InterceptError(f"unknown MSR {token!r}{f' in {spec!r}' if spec else ''} (e.g. IA32_EFER, LSTAR, IA32_SYSENTER_CS, or a number)") from None


def find_control(name: str) -> tuple[type[IntFlag], int]:
    """A VM-execution, VM-exit or VM-entry control by its Linux name ("HLT_EXITING",
    "CPU_BASED_HLT_EXITING", "unrestricted-guest")."""
    key = name.strip().upper().replace("-", "_")
    for prefix in ("PIN_BASED_", "CPU_BASED_", "SECONDARY_EXEC_", "VM_EXIT_", "VM_ENTRY_"):
        key = key.removeprefix(prefix)
    for cls in _CONTROL_CLASSES:
        if key in cls.__members__:
            return cls, int(cls.__members__[key])
    raise KeyError(name)


def parse_intercept(spec: str) -> Intercept:
    """One intercept from its text; :class:`InterceptError` names the bad token."""
    text = spec.strip()
    if not text:
        raise InterceptError("empty intercept")
    kind_text, sep, target_text = text.partition(":")
    kind = _norm(kind_text)
    target_text = target_text.strip()
    if sep and not target_text:
        raise InterceptError(f"missing target after ':' in {spec!r}")
    if kind in _ALWAYS_EXIT or kind in _CONTROL_KINDS:
        if sep:
            raise InterceptError(f"intercept {kind_text!r} takes no target (in {spec!r})")
        return Intercept(kind, text=text)
    if kind not in _WITH_TARGET:
        raise InterceptError(f"unknown intercept {kind_text!r} in {spec!r} (known: {', '.join(KNOWN_KINDS)})")
    if kind in ("io", "msr", "msr-read", "msr-write") and _norm(target_text) == "all":
        return Intercept(kind, text=text)  # the whole class, as without a target
    if kind == "io":
        if not sep:
            return Intercept(kind, text=text)
        lo_text, dash, hi_text = target_text.partition("-")
        lo, hi = _number(lo_text), _number(hi_text) if dash else _number(lo_text)
        if lo is None or hi is None:
            bad = lo_text if lo is None else hi_text
            raise InterceptError(f"bad I/O port {bad!r} in {spec!r} (a number such as 0x3f8, or a range 0x3f8-0x3ff)")
        if not 0 <= lo <= hi <= 0xFFFF:
            raise InterceptError(f"I/O port range {target_text!r} in {spec!r} is outside 0..0xffff or reversed")
        return Intercept(kind, lo, hi, text=text)
    if kind in ("msr", "msr-read", "msr-write"):
        return Intercept(kind, parse_msr(target_text, spec) if sep else None, text=text)
    if kind in ("cr0", "cr4"):
        cls = Cr0 if kind == "cr0" else Cr4
        mask = _cr_mask(cls, target_text, spec) if sep else (1 << 64) - 1
        return Intercept(kind, mask, text=text)
    if kind == "exception":
        return Intercept(kind, parse_vector(target_text, spec) if sep else None, text=text)
    if kind == "external-interrupt":
        if sep and _norm(target_text) not in ("ack", "noack"):
            raise InterceptError(f"unknown option {target_text!r} in {spec!r} (ack or noack)")
        return Intercept(kind, option=_norm(target_text) if sep else "ack", text=text)
    if kind == "preemption-timer":
        value = _number(target_text) if sep else None
        if value is None or not 0 <= value <= 0xFFFFFFFF:
            raise InterceptError(f"preemption-timer needs a 32-bit value, e.g. preemption-timer:100 (got {spec!r})")
        return Intercept(kind, value, text=text)
    # control:NAME
    if not sep:
        raise InterceptError(f"'control' needs a control name, e.g. control:HLT_EXITING (got {spec!r})")
    try:
        _, bit = find_control(target_text)
    except KeyError:
        raise InterceptError(f"unknown VMX control {target_text!r} in {spec!r} (e.g. HLT_EXITING, UNCOND_IO_EXITING)") from None
    return Intercept(kind, bit, option=target_text.upper().replace("-", "_"), text=text)


@dataclass
class InterceptPlan:
    """The VMCS settings for a set of intercepts, independent of who applies them."""

    pin: int = 0
    proc: int = 0
    proc2: int = 0
    exit_controls: int = 0
    entry_controls: int = 0
    io_all: bool = False
    io_ports: set[int] = field(default_factory=set)
    msr_read_all: bool = False
    msr_write_all: bool = False
    msr_read: set[int] = field(default_factory=set)
    msr_write: set[int] = field(default_factory=set)
    cr0_mask: int = 0
    cr4_mask: int = 0
    exception_bitmap: int = 0
    preemption_timer: int | None = None
    notes: list[str] = field(default_factory=list)
    intercepts: list[Intercept] = field(default_factory=list)

    @property
    def uses_io_bitmaps(self) -> bool:
        return bool(self.io_ports) and not self.io_all

    @property
    def uses_msr_bitmap(self) -> bool:
        return bool(self.msr_read or self.msr_write or self.msr_read_all or self.msr_write_all)

    def add(self, i: Intercept) -> None:
        self.intercepts.append(i)
        k = i.kind
        if k in _CONTROL_KINDS:
            cls, bit = _CONTROL_KINDS[k]
            self._set(cls, bit)
            if k == "nmi-window":  # needs virtual NMIs, which need NMI exiting (SDM 27.2.1.1)
                self.pin |= P.NMI_EXITING | P.VIRTUAL_NMIS
        elif k in _ALWAYS_EXIT:
            self.notes.append(f"{k}: always exits (SDM 26.1.2), nothing to set")
        elif k == "io":
            if i.target is None:
                self.io_all = True
            else:
                self.io_ports.update(range(i.target, (i.end if i.end is not None else i.target) + 1))
        elif k in ("msr", "msr-read", "msr-write"):
            reads, writes = k in ("msr", "msr-read"), k in ("msr", "msr-write")
            if i.target is None:
                self.msr_read_all |= reads
                self.msr_write_all |= writes
            else:
                if not _msr_in_bitmap(i.target):
                    self.notes.append(f"{i}: MSR {i.target:#x} is outside the MSR bitmap's ranges, so its accesses always exit (SDM 26.1.3)")
                if reads:
                    self.msr_read.add(i.target)
                if writes:
                    self.msr_write.add(i.target)
        elif k == "cr0":
            self.cr0_mask |= int(i.target or 0)
        elif k == "cr4":
            self.cr4_mask |= int(i.target or 0)
        elif k == "exception":
            self.exception_bitmap |= 0xFFFFFFFF if i.target is None else 1 << i.target
        elif k == "external-interrupt":
            self.pin |= P.EXT_INTR_MASK
            if i.option != "noack":
                self.exit_controls |= X.ACK_INTR_ON_EXIT
        elif k == "preemption-timer":
            self.pin |= P.VMX_PREEMPTION_TIMER
            self.exit_controls |= X.SAVE_VMX_PREEMPTION_TIMER
            self.preemption_timer = i.target
        elif k == "control":
            cls, bit = find_control(i.option or "")
            self._set(cls, bit)

    def _set(self, cls: type[IntFlag], bit: int) -> None:
        if cls is P:
            self.pin |= bit
        elif cls is C:
            self.proc |= bit
        elif cls is S:
            self.proc2 |= bit
        elif cls is X:
            self.exit_controls |= bit
        else:
            self.entry_controls |= bit


def _msr_in_bitmap(msr: int) -> bool:
    # SDM 25.6.9: the bitmap covers 0x0-0x1FFF and 0xC0000000-0xC0001FFF.
    return msr <= 0x1FFF or 0xC0000000 <= msr <= 0xC0001FFF


def plan_intercepts(specs: Iterable[str | Intercept]) -> InterceptPlan:
    """Parse and gather intercepts; the first bad one raises :class:`InterceptError`."""
    plan = InterceptPlan()
    for spec in specs:
        plan.add(spec if isinstance(spec, Intercept) else parse_intercept(spec))
    return plan


# --- applying a plan to the sandbox -----------------------------------------------------------
_CAPABILITY = {
    F.PIN_BASED_VM_EXEC_CONTROL: (Msr.IA32_VMX_TRUE_PINBASED_CTLS, P),
    F.CPU_BASED_VM_EXEC_CONTROL: (Msr.IA32_VMX_TRUE_PROCBASED_CTLS, C),
    F.SECONDARY_VM_EXEC_CONTROL: (Msr.IA32_VMX_PROCBASED_CTLS2, S),
    F.VM_EXIT_CONTROLS: (Msr.IA32_VMX_TRUE_EXIT_CTLS, X),
    F.VM_ENTRY_CONTROLS: (Msr.IA32_VMX_TRUE_ENTRY_CTLS, E),
}


_PLAN_ATTR = {
    F.PIN_BASED_VM_EXEC_CONTROL: "pin",
    F.CPU_BASED_VM_EXEC_CONTROL: "proc",
    F.SECONDARY_VM_EXEC_CONTROL: "proc2",
    F.VM_EXIT_CONTROLS: "exit_controls",
    F.VM_ENTRY_CONTROLS: "entry_controls",
}


def _set_controls(sb: Any, field_: F, bits: int, plan: InterceptPlan) -> None:
    if not bits:
        return
    msr, cls = _CAPABILITY[field_]
    allowed1 = sb.cpu.rdmsr(msr) >> 32
    missing = bits & ~allowed1
    if missing:
        names = [m.name for m in cls if int(m) & missing and m.name] or [f"{missing:#x}"]
        attr = _PLAN_ATTR[field_]
        who = next((str(i) for i in plan.intercepts if getattr(plan_intercepts([i]), attr) & missing), "")
        raise InterceptError(f"this CPU does not support the control {', '.join(names)}{f' (needed by {who!r})' if who else ''}")
    sb.set_bits(field_, bits)


def apply_to_sandbox(plan: InterceptPlan, sb: Any) -> None:
    """Program ``sb`` (a :class:`~pyvmx.guest.sandbox.VmxSandbox`) with ``plan``."""
    from pyvmx.guest.sandbox import MSR_BITMAP
    from pyvmx.vmx.memory import PAGE_SIZE

    if plan.proc2:
        _set_controls(sb, F.CPU_BASED_VM_EXEC_CONTROL, C.ACTIVATE_SECONDARY_CONTROLS, plan)
    _set_controls(sb, F.PIN_BASED_VM_EXEC_CONTROL, plan.pin, plan)
    _set_controls(sb, F.CPU_BASED_VM_EXEC_CONTROL, plan.proc, plan)
    _set_controls(sb, F.SECONDARY_VM_EXEC_CONTROL, plan.proc2, plan)
    _set_controls(sb, F.VM_EXIT_CONTROLS, plan.exit_controls, plan)
    _set_controls(sb, F.VM_ENTRY_CONTROLS, plan.entry_controls, plan)
    if plan.io_all:
        sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.UNCOND_IO_EXITING)
        sb.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.USE_IO_BITMAPS)
    elif plan.io_ports:
        sb.use_io_bitmaps(intercept=sorted(plan.io_ports))
    if plan.uses_msr_bitmap:
        sb.use_msr_bitmap()  # an all-clear bitmap, then the halves and bits below
        if plan.msr_read_all:
            sb.memory.fill(MSR_BITMAP, PAGE_SIZE // 2, 0xFF)
        if plan.msr_write_all:
            sb.memory.fill(MSR_BITMAP + PAGE_SIZE // 2, PAGE_SIZE // 2, 0xFF)
        for msrs, offset in ((plan.msr_read, 0x000), (plan.msr_write, 0x800)):
            for msr in msrs:
                if _msr_in_bitmap(msr):
                    base = MSR_BITMAP + offset + (0x400 if msr >= 0xC0000000 else 0)
                    sb.memory.set_bit(base, msr & 0x1FFF)
    if plan.cr0_mask:
        _own_cr_bits(sb, F.CR0_GUEST_HOST_MASK, F.CR0_READ_SHADOW, F.GUEST_CR0, plan.cr0_mask)
    if plan.cr4_mask:
        _own_cr_bits(sb, F.CR4_GUEST_HOST_MASK, F.CR4_READ_SHADOW, F.GUEST_CR4, plan.cr4_mask)
    if plan.exception_bitmap:
        sb.set_bits(F.EXCEPTION_BITMAP, plan.exception_bitmap)
    if plan.preemption_timer is not None:
        sb.write(F.VMX_PREEMPTION_TIMER_VALUE, plan.preemption_timer)


def _own_cr_bits(sb: Any, mask_field: F, shadow_field: F, guest_field: F, bits: int) -> None:
    """Make ``bits`` host-owned (SDM 25.6.6): a guest write that changes one of them from the
    read shadow exits.  The shadow of newly owned bits is the guest's current value, so only a
    change exits; bits owned before keep their shadow."""
    old_mask = sb.read(mask_field)
    bits &= (1 << 64) - 1
    shadow = (sb.read(shadow_field) & old_mask) | (sb.read(guest_field) & bits & ~old_mask)
    sb.write(mask_field, old_mask | bits)
    sb.write(shadow_field, shadow)
