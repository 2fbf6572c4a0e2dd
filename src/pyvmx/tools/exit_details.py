"""What one VM exit needs to be debugged, beyond its reason and qualification: the VM-exit
information fields (SDM 25.9) and the guest registers the exiting instruction used.

Read *after* the exit handler ran, the registers hold what a person wants to see: the value an
OUT wrote or an IN read (RAX), the value a WRMSR wrote or an RDMSR returned (EDX:EAX), the value
a MOV to CR wrote or a MOV from CR read (its general-purpose register).

* EPT violation / misconfiguration: guest-physical address, guest-linear address (when the
  qualification says it is valid, SDM 28.2.1 bit 7); the access and permission bits are in the
  decoded qualification;
* RDMSR / WRMSR: the MSR index (ECX), its name (:mod:`pyvmx.arch.msr`), the value;
* exception or NMI: vector, type, error code (SDM 25.9.2);
* I/O: the value (RAX masked to the access size; port, size, direction are in the qualification);
* CR access: the value of the register moved (MOV to/from CR).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmx.arch import qualifications as q
from pyvmx.arch.controls import INTR_INFO_DELIVER_CODE_MASK, INTR_INFO_VALID_MASK
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.vmx.outcomes import VmExitInfo

Details = dict[str, int | str]
RAX, RCX, RDX = 0, 1, 2
_MSR_NAMES = {int(m): m.name for m in Msr}


def msr_name(index: int) -> str:
    return _MSR_NAMES.get(index, f"{index:#x}")


def exit_details(exit: VmExitInfo, gpr: Callable[[int], int]) -> Details:
    """The details of ``exit`` (see the module docstring); ``gpr(n)`` reads guest GPR n."""
    basic = exit.basic_reason
    qual = exit.qualification
    if basic in (ExitReason.EPT_VIOLATION, ExitReason.EPT_MISCONFIG):
        details: Details = {"gpa": exit.guest_physical_address}
        if basic == ExitReason.EPT_MISCONFIG or qual & q.EPT_VIOLATION_GVA_IS_VALID:
            details["gla"] = exit.guest_linear_address
        return details
    if basic in (ExitReason.MSR_READ, ExitReason.MSR_WRITE):
        index = gpr(RCX) & 0xFFFFFFFF
        value = (gpr(RDX) & 0xFFFFFFFF) << 32 | gpr(RAX) & 0xFFFFFFFF
        return {"msr": index, "msr_name": msr_name(index), "value": value}
    if basic == ExitReason.EXCEPTION_NMI and exit.intr_info & INTR_INFO_VALID_MASK:
        details = {"vector": exit.intr_info & 0xFF, "type": (exit.intr_info >> 8) & 7}
        if exit.intr_info & INTR_INFO_DELIVER_CODE_MASK:
            details["error_code"] = exit.intr_error_code
        return details
    if basic == ExitReason.IO_INSTRUCTION and not qual & q.IO_QUAL_STRING:
        size = (qual & q.IO_QUAL_SIZE_MASK) + 1
        return {"value": gpr(RAX) & ((1 << (8 * size)) - 1)}
    if basic == ExitReason.CR_ACCESS:
        access = (qual & q.CR_ACCESS_TYPE_MASK) >> q.CR_ACCESS_TYPE_SHIFT
        if access in (q.CR_ACCESS_TYPE_MOV_TO_CR, q.CR_ACCESS_TYPE_MOV_FROM_CR):
            return {"value": gpr((qual & q.CR_ACCESS_REG_MASK) >> q.CR_ACCESS_REG_SHIFT)}
    return {}


def format_details(details: Details) -> str:
    """``gpa=0x1000 gla=0x1000``, ``msr=IA32_EFER(0xc0000080) value=0xd01``: numbers in hex."""
    parts = []
    for key, value in details.items():
        if key == "msr_name":
            continue
        if key == "msr" and "msr_name" in details:
            parts.append(f"msr={details['msr_name']}({int(value):#x})" if isinstance(value, int) else f"msr={value}")
        else:
            parts.append(f"{key}={value:#x}" if isinstance(value, int) and not isinstance(value, bool) else f"{key}={value}")
    return " ".join(parts)
