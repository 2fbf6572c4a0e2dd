"""The modelled CPU's VMX capabilities: the IA32_VMX_* MSRs (SDM Appendix A).

A :class:`CpuProfile` says which VMX controls and features the processor supports; it produces
the capability MSR values a hypervisor reads with RDMSR, and the processor enforces the same
values in its VM-entry checks.  The default profile is modelled on a recent Intel server core,
restricted to what this model implements, so anything it advertises really works.  Features can
be turned off (``profile.without(...)``) to test a hypervisor against a weaker CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag

from pyvmx.arch.controls import (
    CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR,
    VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR,
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    VmEntryControls,
    VmExitControls,
)
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.arch.x86 import Cr0, Cr4

_CR0_FIXED0 = int(Cr0.PE | Cr0.NE | Cr0.PG)  # a plain int: every VM exit reads it
P = PinBasedControls
C = ProcBasedControls
S = SecondaryProcBasedControls
X = VmExitControls
E = VmEntryControls

# EPT/VPID capability bits (SDM A.10).
EPT_CAP_EXECUTE_ONLY = 1 << 0
EPT_CAP_PAGE_WALK_4 = 1 << 6
EPT_CAP_PAGE_WALK_5 = 1 << 7
EPT_CAP_MEMTYPE_UC = 1 << 8
EPT_CAP_MEMTYPE_WB = 1 << 14
EPT_CAP_2MB_PAGE = 1 << 16
EPT_CAP_1GB_PAGE = 1 << 17
EPT_CAP_INVEPT = 1 << 20
EPT_CAP_AD_BITS = 1 << 21
EPT_CAP_INVEPT_SINGLE_CONTEXT = 1 << 25
EPT_CAP_INVEPT_ALL_CONTEXT = 1 << 26
VPID_CAP_INVVPID = 1 << 32
VPID_CAP_INVVPID_INDIVIDUAL_ADDR = 1 << 40
VPID_CAP_INVVPID_SINGLE_CONTEXT = 1 << 41
VPID_CAP_INVVPID_ALL_CONTEXT = 1 << 42
VPID_CAP_INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43

# INVEPT/INVVPID type -> the capability bit that says the type is supported (SDM 31.3).
INVEPT_TYPE_CAPS = {1: EPT_CAP_INVEPT_SINGLE_CONTEXT, 2: EPT_CAP_INVEPT_ALL_CONTEXT}
INVVPID_TYPE_CAPS = {
    0: VPID_CAP_INVVPID_INDIVIDUAL_ADDR,
    1: VPID_CAP_INVVPID_SINGLE_CONTEXT,
    2: VPID_CAP_INVVPID_ALL_CONTEXT,
    3: VPID_CAP_INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS,
}

# IA32_VMX_BASIC (SDM A.1).
VMX_BASIC_VMCS_SIZE_SHIFT = 32
VMX_BASIC_32BIT_PHYS_ADDR_ONLY = 1 << 48
VMX_BASIC_MEM_TYPE_SHIFT = 50
VMX_BASIC_MEM_TYPE_WB = 6
VMX_BASIC_INOUT = 1 << 54
VMX_BASIC_TRUE_CTLS = 1 << 55

# IA32_VMX_MISC (SDM A.6).
VMX_MISC_PREEMPTION_TIMER_RATE_MASK = 0x1F
VMX_MISC_SAVE_EFER_LMA = 1 << 5
VMX_MISC_ACTIVITY_HLT = 1 << 6
VMX_MISC_ACTIVITY_SHUTDOWN = 1 << 7
VMX_MISC_ACTIVITY_WAIT_SIPI = 1 << 8
VMX_MISC_CR3_TARGET_COUNT_SHIFT = 16
VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT = 25
VMX_MISC_VMWRITE_SHADOW_RO_FIELDS = 1 << 29
VMX_MISC_ZERO_LEN_INS = 1 << 30

ControlFlag = PinBasedControls | ProcBasedControls | SecondaryProcBasedControls | VmExitControls | VmEntryControls


class UnsupportedControlsError(ValueError):
    """adjust_vmx_controls: a required control is not allowed by the capability MSR."""

    def __init__(self, msr: int, missing: int) -> None:
        super().__init__(f"required VMX controls {missing:#x} are not supported (MSR {msr:#x})")
        self.msr = msr
        self.missing = missing


@dataclass(frozen=True)
class ControlCapability:
    """One VMX controls MSR: allowed 0-settings in bits 31:0 (a 1 means the control must be 1)
    and allowed 1-settings in bits 63:32 (a 0 means the control must be 0) -- SDM A.3-A.5."""

    must_be_one: int
    may_be_one: int

    @property
    def msr_value(self) -> int:
        return self.must_be_one | self.may_be_one << 32

    def violations(self, value: int) -> int:
        """The bits of ``value`` that break this capability (0 if it is allowed)."""
        return (self.must_be_one & ~value) | (value & ~self.may_be_one & 0xFFFFFFFF)


def _sum(flags: list[IntFlag]) -> int:
    total = 0
    for flag in flags:
        total |= int(flag)
    return total


# What this model implements, per control class (default1 bits are added on top).
_PIN = _sum([P.EXT_INTR_MASK, P.NMI_EXITING, P.VIRTUAL_NMIS, P.VMX_PREEMPTION_TIMER])
_PROC = _sum([
    C.INTR_WINDOW_EXITING, C.USE_TSC_OFFSETTING, C.HLT_EXITING, C.INVLPG_EXITING,
    C.MWAIT_EXITING, C.RDPMC_EXITING, C.RDTSC_EXITING, C.CR3_LOAD_EXITING, C.CR3_STORE_EXITING,
    C.CR8_LOAD_EXITING, C.CR8_STORE_EXITING, C.NMI_WINDOW_EXITING, C.MOV_DR_EXITING,
    C.UNCOND_IO_EXITING, C.USE_IO_BITMAPS, C.MONITOR_TRAP_FLAG, C.USE_MSR_BITMAPS,
    C.MONITOR_EXITING, C.PAUSE_EXITING, C.ACTIVATE_SECONDARY_CONTROLS,
])
_PROC2 = _sum([
    S.ENABLE_EPT, S.DESC, S.ENABLE_RDTSCP, S.ENABLE_VPID, S.WBINVD_EXITING,
    S.UNRESTRICTED_GUEST, S.PAUSE_LOOP_EXITING, S.RDRAND_EXITING, S.ENABLE_INVPCID,
    S.RDSEED_EXITING,
])
_EXIT = _sum([
    X.SAVE_DEBUG_CONTROLS, X.HOST_ADDR_SPACE_SIZE, X.ACK_INTR_ON_EXIT, X.SAVE_IA32_PAT,
    X.LOAD_IA32_PAT, X.SAVE_IA32_EFER, X.LOAD_IA32_EFER, X.SAVE_VMX_PREEMPTION_TIMER,
])
_ENTRY = _sum([E.LOAD_DEBUG_CONTROLS, E.IA32E_MODE, E.LOAD_IA32_PAT, E.LOAD_IA32_EFER])

# The "true" MSRs let these default1 controls be 0 (SDM A.2).
_TRUE_PROC_CLEARABLE = int(C.CR3_LOAD_EXITING | C.CR3_STORE_EXITING)
_TRUE_EXIT_CLEARABLE = int(X.SAVE_DEBUG_CONTROLS)
_TRUE_ENTRY_CLEARABLE = int(E.LOAD_DEBUG_CONTROLS)

_CR4_SUPPORTED = _sum([
    Cr4.VME, Cr4.PVI, Cr4.TSD, Cr4.DE, Cr4.PSE, Cr4.PAE, Cr4.MCE, Cr4.PGE, Cr4.PCE,
    Cr4.OSFXSR, Cr4.OSXMMEXCPT, Cr4.VMXE, Cr4.FSGSBASE, Cr4.PCIDE, Cr4.OSXSAVE, Cr4.SMEP,
    Cr4.SMAP,
])

_EPT_VPID = (
    EPT_CAP_EXECUTE_ONLY | EPT_CAP_PAGE_WALK_4 | EPT_CAP_MEMTYPE_UC | EPT_CAP_MEMTYPE_WB
    | EPT_CAP_2MB_PAGE | EPT_CAP_1GB_PAGE | EPT_CAP_INVEPT | EPT_CAP_AD_BITS
    | EPT_CAP_INVEPT_SINGLE_CONTEXT | EPT_CAP_INVEPT_ALL_CONTEXT | VPID_CAP_INVVPID
    | VPID_CAP_INVVPID_INDIVIDUAL_ADDR | VPID_CAP_INVVPID_SINGLE_CONTEXT
    | VPID_CAP_INVVPID_ALL_CONTEXT | VPID_CAP_INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS
)


def canonical(address: int, width: int = 48) -> bool:
    """SDM 3.3.7.1: bits 63 down to ``width`` - 1 of a 64-bit address are all equal."""
    top = (address & 0xFFFFFFFFFFFFFFFF) >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


def _highest_vmcs_index() -> int:
    return max(field.index for field in VmcsField)


@dataclass(frozen=True)
class CpuProfile:
    """The VMX capabilities of the modelled processor (everything RDMSR of 0x480-0x491 returns),
    and the model-specific figures of its clock: the TSC rate and what one VM exit with the VM
    entry back costs in TSC ticks (``vmexit_tsc_cost``, charged at every exit)."""

    name: str = "pyvmx-default (Intel server core, features this model implements)"
    revision_id: int = 0x12
    pin_based: int = _PIN
    proc_based: int = _PROC
    secondary: int = _PROC2
    exit_controls: int = _EXIT
    entry_controls: int = _ENTRY
    true_controls: bool = True
    preemption_timer_rate: int = 5
    cr3_target_count: int = 4
    vmwrite_any_field: bool = True
    zero_length_injection: bool = True
    activity_states: int = VMX_MISC_ACTIVITY_HLT | VMX_MISC_ACTIVITY_SHUTDOWN | VMX_MISC_ACTIVITY_WAIT_SIPI
    cr4_supported: int = _CR4_SUPPORTED
    ept_vpid_cap: int = _EPT_VPID
    physical_address_width: int = 46
    # CPUID.80000008H:EAX[15:8]: a linear address is canonical when bits 63 down to this width
    # minus 1 are all equal (SDM 3.3.7.1); 48 without 5-level paging.
    linear_address_width: int = 48
    # The TSC's nominal rate, guest TSC ticks per guest second: what CPUID 15H/16H report, so a
    # guest need not calibrate (guest time is retired instructions times tsc_per_instruction).
    tsc_hz: int = 1_000_000_000
    # TSC ticks one VM exit and the VM entry back take together -- the world switch alone, not
    # the hypervisor's handling (the processor saves and loads the guest and host state, SDM
    # 28.3-28.5, 27.3).  Guest time is retired instructions, so without it a chain of exits
    # would hold the clock still.  Model-specific, not a capability MSR.  Measured: about 2,000
    # cycles of direct cost per exit on a Xeon X5570 (Nehalem) with KVM (Landau, Ben-Yehuda,
    # Gordon, "SplitX", WIOV 2011, Table 1), less on later cores (Agesen et al., "Software
    # Techniques for Avoiding Hardware Virtualization Exits", USENIX ATC 2012, Fig. 1); 1,200
    # sits in the range current Intel server cores show.
    vmexit_tsc_cost: int = 1_200

    def canonical(self, address: int) -> bool:
        """Whether ``address`` is canonical for this processor's linear-address width."""
        return canonical(address, self.linear_address_width)

    @classmethod
    def default(cls) -> CpuProfile:
        return cls()

    def without(self, *controls: ControlFlag) -> CpuProfile:
        """A weaker CPU: the same profile with these controls not supported.

        Turning off the preemption timer also removes "save VMX-preemption timer value", and
        turning off EPT also removes unrestricted guest, as no real CPU has one without the other.
        """
        changes: dict[str, int] = {}
        for control in controls:
            attr = _ATTR_FOR_CLASS[type(control)]
            if int(control) & _DEFAULT1[attr]:
                raise ValueError(f"{control!r} is a default1 control and cannot be unsupported")
            changes[attr] = changes.get(attr, getattr(self, attr)) & ~int(control)
            if control is P.VMX_PREEMPTION_TIMER:
                changes["exit_controls"] = changes.get("exit_controls", self.exit_controls) & ~int(
                    X.SAVE_VMX_PREEMPTION_TIMER
                )
            if control is S.ENABLE_EPT:
                changes["secondary"] = changes.get("secondary", self.secondary) & ~int(
                    S.UNRESTRICTED_GUEST
                )
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # --- the capability MSRs ---------------------------------------------------------------
    def _capability(self, attr: str, true_msr: bool) -> ControlCapability:
        default1 = _DEFAULT1[attr]
        if true_msr:
            default1 &= ~_TRUE_CLEARABLE[attr]
        return ControlCapability(default1, default1 | getattr(self, attr))

    def controls(self, attr: str) -> ControlCapability:
        """The capability the processor enforces at VM entry for one control field (the TRUE
        MSR when IA32_VMX_BASIC[55] is set, SDM 27.2.1.1)."""
        return self._capability(attr, self.true_controls)

    @property
    def vmx_basic(self) -> int:
        value = self.revision_id & 0x7FFFFFFF
        value |= 4096 << VMX_BASIC_VMCS_SIZE_SHIFT
        value |= VMX_BASIC_MEM_TYPE_WB << VMX_BASIC_MEM_TYPE_SHIFT
        value |= VMX_BASIC_INOUT
        if self.true_controls:
            value |= VMX_BASIC_TRUE_CTLS
        return value

    @property
    def vmx_misc(self) -> int:
        value = self.preemption_timer_rate & VMX_MISC_PREEMPTION_TIMER_RATE_MASK
        value |= VMX_MISC_SAVE_EFER_LMA | self.activity_states
        value |= (self.cr3_target_count & 0x1FF) << VMX_MISC_CR3_TARGET_COUNT_SHIFT
        if self.vmwrite_any_field:
            value |= VMX_MISC_VMWRITE_SHADOW_RO_FIELDS
        if self.zero_length_injection:
            value |= VMX_MISC_ZERO_LEN_INS
        return value

    @property
    def cr0_fixed0(self) -> int:
        """CR0 bits that must be 1 in VMX operation (PE, NE, PG; SDM A.7)."""
        return _CR0_FIXED0

    @property
    def cr0_fixed1(self) -> int:
        return 0xFFFFFFFF

    @property
    def cr4_fixed0(self) -> int:
        return int(Cr4.VMXE)

    @property
    def cr4_fixed1(self) -> int:
        return self.cr4_supported | int(Cr4.VMXE)

    @property
    def vmcs_enum(self) -> int:
        """IA32_VMX_VMCS_ENUM: the highest index value used in any VMCS encoding (bits 9:1)."""
        return _highest_vmcs_index() << 1

    def rdmsr(self, index: int) -> int | None:
        """The value of a VMX capability MSR, or None if ``index`` is not one (or not present)."""
        reader = _MSR_READERS.get(index)
        return None if reader is None else reader(self)

    def supports(self, control: ControlFlag) -> bool:
        return bool(self.controls(_ATTR_FOR_CLASS[type(control)]).may_be_one & int(control))


_ATTR_FOR_CLASS: dict[type, str] = {
    PinBasedControls: "pin_based",
    ProcBasedControls: "proc_based",
    SecondaryProcBasedControls: "secondary",
    VmExitControls: "exit_controls",
    VmEntryControls: "entry_controls",
}
_DEFAULT1 = {
    "pin_based": PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    "proc_based": CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    "secondary": 0,
    "exit_controls": VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR,
    "entry_controls": VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR,
}
_TRUE_CLEARABLE = {
    "pin_based": 0,
    "proc_based": _TRUE_PROC_CLEARABLE,
    "secondary": 0,
    "exit_controls": _TRUE_EXIT_CLEARABLE,
    "entry_controls": _TRUE_ENTRY_CLEARABLE,
}


def _secondary_msr(p: CpuProfile) -> int:
    return p._capability("secondary", False).msr_value


def _true(attr: str):  # type: ignore[no-untyped-def]
    def read(p: CpuProfile) -> int | None:
        return p._capability(attr, True).msr_value if p.true_controls else None

    return read


_MSR_READERS: dict[int, Callable[[CpuProfile], int]] = {
    Msr.IA32_VMX_BASIC: lambda p: p.vmx_basic,
    Msr.IA32_VMX_PINBASED_CTLS: lambda p: p._capability("pin_based", False).msr_value,
    Msr.IA32_VMX_PROCBASED_CTLS: lambda p: p._capability("proc_based", False).msr_value,
    Msr.IA32_VMX_EXIT_CTLS: lambda p: p._capability("exit_controls", False).msr_value,
    Msr.IA32_VMX_ENTRY_CTLS: lambda p: p._capability("entry_controls", False).msr_value,
    Msr.IA32_VMX_MISC: lambda p: p.vmx_misc,
    Msr.IA32_VMX_CR0_FIXED0: lambda p: p.cr0_fixed0,
    Msr.IA32_VMX_CR0_FIXED1: lambda p: p.cr0_fixed1,
    Msr.IA32_VMX_CR4_FIXED0: lambda p: p.cr4_fixed0,
    Msr.IA32_VMX_CR4_FIXED1: lambda p: p.cr4_fixed1,
    Msr.IA32_VMX_VMCS_ENUM: lambda p: p.vmcs_enum,
    Msr.IA32_VMX_PROCBASED_CTLS2: _secondary_msr,
    Msr.IA32_VMX_EPT_VPID_CAP: lambda p: p.ept_vpid_cap,
    Msr.IA32_VMX_TRUE_PINBASED_CTLS: _true("pin_based"),
    Msr.IA32_VMX_TRUE_PROCBASED_CTLS: _true("proc_based"),
    Msr.IA32_VMX_TRUE_EXIT_CTLS: _true("exit_controls"),
    Msr.IA32_VMX_TRUE_ENTRY_CTLS: _true("entry_controls"),
}


def adjust_vmx_controls(ctl_min: int, ctl_opt: int, msr_value: int, msr: int = 0) -> int:
    """KVM's adjust_vmx_controls (arch/x86/kvm/vmx/vmx.c): the optional controls the CPU allows,
    plus every control it requires; raises UnsupportedControlsError if a required one is missing."""
    low, high = msr_value & 0xFFFFFFFF, msr_value >> 32
    ctl = (ctl_min | ctl_opt) & high
    ctl |= low
    missing = ctl_min & ~ctl
    if missing:
        raise UnsupportedControlsError(msr, missing)
    return ctl
