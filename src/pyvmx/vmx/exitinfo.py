"""Exit information for people: exit reasons by name, exit qualifications split into named fields
(SDM Vol. 3 28.2.1, the layouts of :mod:`pyvmx.arch.qualifications`), interruption information
(SDM 25.9.2) and control words as the names of their set bits.

Shared by the VMCS dump, the tracer, the statistics table and scenario checks, so that a field
is called the same everywhere (``port``, ``size``, ``direction`` ... for I/O exits).
"""

from __future__ import annotations

from enum import IntFlag

from pyvmx.arch import qualifications as q
from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_INTR_TYPE_MASK,
    INTR_INFO_INTR_TYPE_SHIFT,
    INTR_INFO_UNBLOCK_NMI,
    INTR_INFO_VALID_MASK,
    INTR_INFO_VECTOR_MASK,
    InterruptionType,
)
from pyvmx.arch.exit_reasons import (
    VMX_EXIT_REASON_BASIC_MASK,
    VMX_EXIT_REASONS_FAILED_VMENTRY,
    ExitReason,
)
from pyvmx.arch.msr import UnknownNameError
from pyvmx.arch.x86 import ExceptionVector

FieldValue = int | bool | str
Fields = dict[str, FieldValue]

# General-purpose registers by their number in exit qualifications and instruction information
# (SDM 28.2.1 Table 28-3: 0 = RAX, 1 = RCX, ... 15 = R15).
GPR_BY_NUMBER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_CR_ACCESS_TYPES = {
    q.CR_ACCESS_TYPE_MOV_TO_CR: "mov-to-cr",
    q.CR_ACCESS_TYPE_MOV_FROM_CR: "mov-from-cr",
    q.CR_ACCESS_TYPE_CLTS: "clts",
    q.CR_ACCESS_TYPE_LMSW: "lmsw",
}
_TASK_SWITCH_SOURCES = {q.TASK_SWITCH_CALL: "call", q.TASK_SWITCH_IRET: "iret", q.TASK_SWITCH_JMP: "jmp", q.TASK_SWITCH_GATE: "task-gate"}
_APIC_ACCESS_TYPES = {
    q.TYPE_LINEAR_APIC_INST_READ >> 12: "linear-read",
    q.TYPE_LINEAR_APIC_INST_WRITE >> 12: "linear-write",
    q.TYPE_LINEAR_APIC_INST_FETCH >> 12: "linear-fetch",
    q.TYPE_LINEAR_APIC_EVENT >> 12: "linear-event-delivery",
    q.TYPE_PHYSICAL_APIC_EVENT >> 12: "physical-event-delivery",
    q.TYPE_PHYSICAL_APIC_INST >> 12: "physical-instruction",
}
# Exits whose qualification is the displacement of a memory operand, or a linear address
# (SDM 28.2.1, list after Table 28-1).
_DISPLACEMENT_REASONS = frozenset({
    ExitReason.INVEPT, ExitReason.INVPCID, ExitReason.INVVPID, ExitReason.GDTR_IDTR, ExitReason.LDTR_TR,
    ExitReason.VMCLEAR, ExitReason.VMPTRLD, ExitReason.VMPTRST, ExitReason.VMREAD, ExitReason.VMWRITE,
    ExitReason.VMON, ExitReason.XRSTORS, ExitReason.XSAVES, ExitReason.ENCLV, ExitReason.LOADIWKEY,
})


# --- exit reasons ------------------------------------------------------------------------------
def reason_name(reason: int) -> str:
    """The name of a basic exit reason (or of the full exit-reason field): ``"HLT"``,
    ``"INVALID_STATE (VM-entry failure)"``, ``"UNKNOWN_99"`` for numbers the SDM does not assign."""
    basic = reason & VMX_EXIT_REASON_BASIC_MASK
    try:
        name = ExitReason(basic).name
    except ValueError:
        name = f"UNKNOWN_{basic}"
    if reason & VMX_EXIT_REASONS_FAILED_VMENTRY:
        name += " (VM-entry failure)"
    return name


def parse_exit_reason(text: str | int) -> ExitReason:
    """An exit reason from what people write: ``"HLT"``, ``"hlt"``, ``"EXIT_REASON_HLT"``,
    ``"io-instruction"``, ``12``, ``"0xc"``.  Raises :class:`UnknownNameError` (a ``KeyError``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        try:
            return ExitReason(text)
        except ValueError:
            raise UnknownNameError(f"no exit reason has number {text}") from None
    key = str(text).strip().upper().replace("-", "_").removeprefix("EXIT_REASON_")
    try:
        return ExitReason(int(key, 0))
    except ValueError:
        pass
    if key in ExitReason.__members__:
        return ExitReason.__members__[key]
    if f"{key}_INSTRUCTION" in ExitReason.__members__:  # "pause", "io", "mwait", "monitor"
        return ExitReason.__members__[f"{key}_INSTRUCTION"]
    if key in _REASON_ALIASES:
        return _REASON_ALIASES[key]
    raise UnknownNameError(f"unknown exit reason {text!r} (e.g. HLT, IO_INSTRUCTION, MSR_WRITE, CR_ACCESS, EPT_VIOLATION)")


_REASON_ALIASES = {
    "EXCEPTION": ExitReason.EXCEPTION_NMI, "NMI": ExitReason.EXCEPTION_NMI, "INTERRUPT": ExitReason.EXTERNAL_INTERRUPT,
    "TIMER": ExitReason.PREEMPTION_TIMER, "VMX_PREEMPTION_TIMER": ExitReason.PREEMPTION_TIMER,
    "MTF": ExitReason.MONITOR_TRAP_FLAG, "RDMSR": ExitReason.MSR_READ, "WRMSR": ExitReason.MSR_WRITE,
    "CR": ExitReason.CR_ACCESS, "MOV_CR": ExitReason.CR_ACCESS, "MOV_DR": ExitReason.DR_ACCESS,
}


# --- interruption information (SDM 25.9.2, Table 25-17) ----------------------------------------
def vector_name(vector: int) -> str:
    """``"PF"`` for 14, ``"0x31"`` for vectors that are not exceptions."""
    try:
        return ExceptionVector(vector).name
    except ValueError:
        return f"{vector:#x}"


def decode_intr_info(info: int) -> Fields:
    """VM-exit interruption information (or IDT-vectoring information, same layout)."""
    if not info & INTR_INFO_VALID_MASK:
        return {"valid": False}
    kind = (info & INTR_INFO_INTR_TYPE_MASK) >> INTR_INFO_INTR_TYPE_SHIFT
    vector = info & INTR_INFO_VECTOR_MASK
    fields: Fields = {
        "valid": True,
        "vector": vector,
        "type": InterruptionType(kind).name,
        "error_code_valid": bool(info & INTR_INFO_DELIVER_CODE_MASK),
    }
    if kind in (InterruptionType.HARD_EXCEPTION, InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION):
        fields["exception"] = vector_name(vector)
    if info & INTR_INFO_UNBLOCK_NMI:
        fields["nmi_unblocking"] = True
    return fields


# --- exit qualifications (SDM 28.2.1) ----------------------------------------------------------
def decode_qualification(reason: int, qualification: int, intr_info: int = 0) -> Fields:
    """The exit qualification of an exit with ``reason`` as named fields, or ``{}`` where the SDM
    defines no layout (the raw value is then the whole story).  ``intr_info`` selects the layout
    of exception exits: #PF gives the faulting linear address, #DB the debug conditions."""
    basic = reason & VMX_EXIT_REASON_BASIC_MASK
    qual = qualification
    if basic == ExitReason.EXCEPTION_NMI:
        vector = intr_info & INTR_INFO_VECTOR_MASK if intr_info & INTR_INFO_VALID_MASK else None
        if vector == ExceptionVector.PF:
            return {"linear_address": qual}
        if vector == ExceptionVector.DB:
            return {
                "b0_b3": qual & q.DEBUG_QUAL_B0_B3_MASK,
                "bd": bool(qual & q.DEBUG_QUAL_BD),
                "bs": bool(qual & q.DEBUG_QUAL_BS),
                "bld": bool(qual & q.DEBUG_QUAL_BLD),
                "rtm": bool(qual & q.DEBUG_QUAL_RTM),
            }
        return {}
    if basic == ExitReason.CR_ACCESS:
        access = (qual & q.CR_ACCESS_TYPE_MASK) >> q.CR_ACCESS_TYPE_SHIFT
        fields: Fields = {"cr": qual & q.CR_ACCESS_NUM_MASK, "access": _CR_ACCESS_TYPES[access]}
        if access in (q.CR_ACCESS_TYPE_MOV_TO_CR, q.CR_ACCESS_TYPE_MOV_FROM_CR):
            fields["gpr"] = GPR_BY_NUMBER[(qual & q.CR_ACCESS_REG_MASK) >> q.CR_ACCESS_REG_SHIFT]
        if access == q.CR_ACCESS_TYPE_LMSW:
            fields["lmsw_operand"] = "memory" if qual & q.CR_ACCESS_LMSW_MEMORY else "register"
            fields["lmsw_source"] = (qual & q.LMSW_SOURCE_DATA) >> q.LMSW_SOURCE_DATA_SHIFT
        return fields
    if basic == ExitReason.DR_ACCESS:
        return {
            "dr": qual & q.DR_ACCESS_NUM_MASK,
            "direction": "mov-from-dr" if qual & q.DR_ACCESS_FROM_DR else "mov-to-dr",
            "gpr": GPR_BY_NUMBER[(qual & q.DR_ACCESS_REG_MASK) >> q.DR_ACCESS_REG_SHIFT],
        }
    if basic == ExitReason.IO_INSTRUCTION:
        return {
            "port": (qual & q.IO_QUAL_PORT_MASK) >> q.IO_QUAL_PORT_SHIFT,
            "size": (qual & q.IO_QUAL_SIZE_MASK) + 1,
            "direction": "in" if qual & q.IO_QUAL_IN else "out",
            "string": bool(qual & q.IO_QUAL_STRING),
            "rep": bool(qual & q.IO_QUAL_REP),
            "operand": "imm" if qual & q.IO_QUAL_IMMEDIATE else "dx",
        }
    if basic == ExitReason.EPT_VIOLATION:
        return {
            "read": bool(qual & q.EPT_VIOLATION_ACC_READ),
            "write": bool(qual & q.EPT_VIOLATION_ACC_WRITE),
            "fetch": bool(qual & q.EPT_VIOLATION_ACC_INSTR),
            "readable": bool(qual & q.EPT_VIOLATION_PROT_READ),
            "writable": bool(qual & q.EPT_VIOLATION_PROT_WRITE),
            "executable": bool(qual & q.EPT_VIOLATION_PROT_EXEC),
            "gla_valid": bool(qual & q.EPT_VIOLATION_GVA_IS_VALID),
            "translated": bool(qual & q.EPT_VIOLATION_GVA_TRANSLATED),
            "nmi_unblocking": bool(qual & q.EPT_VIOLATION_NMI_UNBLOCKING),
        }
    if basic == ExitReason.TASK_SWITCH:
        return {
            "selector": qual & q.TASK_SWITCH_SELECTOR_MASK,
            "source": _TASK_SWITCH_SOURCES[(qual & q.TASK_SWITCH_SOURCE_MASK) >> q.TASK_SWITCH_SOURCE_SHIFT],
        }
    if basic == ExitReason.APIC_ACCESS:
        kind = (qual & q.APIC_ACCESS_TYPE) >> 12
        return {"offset": qual & q.APIC_ACCESS_OFFSET, "type": _APIC_ACCESS_TYPES.get(kind, str(kind))}
    if basic == ExitReason.INVLPG:
        return {"linear_address": qual}
    if basic in _DISPLACEMENT_REASONS:
        return {"displacement": qual}
    if basic == ExitReason.SIPI_SIGNAL:
        return {"vector": qual & q.SIPI_VECTOR_MASK}
    if basic == ExitReason.MWAIT_INSTRUCTION:
        return {"monitor_armed": bool(qual & 1)}
    if basic == ExitReason.NOTIFY:
        return {"context_invalid": bool(qual & q.NOTIFY_VM_CONTEXT_INVALID)}
    return {}


def format_fields(fields: Fields) -> str:
    """``port=0x3f8 size=1 direction=out`` (ints >= 10 in hex, booleans only when set)."""
    parts = []
    for name, value in fields.items():
        if isinstance(value, bool):
            if value:
                parts.append(name)
        elif isinstance(value, int):
            parts.append(f"{name}={value:#x}" if value >= 10 else f"{name}={value}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


# --- control words -------------------------------------------------------------------------------
def flag_names(cls: type[IntFlag], value: int, *, width: int = 32) -> list[str]:
    """Names of the set bits of ``value`` in bit order; bits the class does not name appear as
    ``bit<N>`` (e.g. the default1 bits of the processor-based controls, SDM A.3.2)."""
    names = []
    for bit in range(width):
        mask = 1 << bit
        if not value & mask:
            continue
        try:
            member = cls(mask)
        except ValueError:
            member = None
        names.append(member.name if member is not None and member.name else f"bit{bit}")
    return names


def exception_bitmap_names(bitmap: int) -> list[str]:
    """The vectors set in an exception bitmap (SDM 25.6.3), by name: ``["DB", "BP", "PF"]``."""
    return [vector_name(v) for v in range(32) if bitmap & (1 << v)]
