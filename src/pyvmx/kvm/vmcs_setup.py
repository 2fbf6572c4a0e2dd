"""VMCS set-up as KVM does it (arch/x86/kvm/vmx/vmx.c): the controls computed once per host
against the capability MSRs (``setup_vmcs_config()``), the per-vCPU VMCS initialised from them
(``init_vmcs()``, ``vmx_set_constant_host_state()``), the exception bitmap
(``vmx_update_exception_bitmap()``) and the CR0/CR4 guest/host masks (``vmx_set_cr0/4``,
``set_cr4_guest_host_mask()``).

The policy parts are pure functions of their inputs so tests can table them without a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.controls import VmEntryControls as E
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, ExceptionVector, PageFaultErrorCode
from pyvmx.vmx.caps import UnsupportedControlsError, adjust_vmx_controls

# --- setup_vmcs_config(): required and optional controls (vmx.h KVM_REQUIRED/OPTIONAL_VMX_*) -------
KVM_REQUIRED_VMX_PIN_BASED_VM_EXEC_CONTROL = int(P.EXT_INTR_MASK | P.NMI_EXITING)
KVM_OPTIONAL_VMX_PIN_BASED_VM_EXEC_CONTROL = int(P.VIRTUAL_NMIS | P.POSTED_INTR | P.VMX_PREEMPTION_TIMER)

KVM_REQUIRED_VMX_CPU_BASED_VM_EXEC_CONTROL = int(
    C.HLT_EXITING | C.CR3_LOAD_EXITING | C.CR3_STORE_EXITING | C.UNCOND_IO_EXITING
    | C.MOV_DR_EXITING | C.USE_TSC_OFFSETTING | C.MWAIT_EXITING | C.MONITOR_EXITING
    | C.INVLPG_EXITING | C.RDPMC_EXITING | C.INTR_WINDOW_EXITING
    | C.CR8_LOAD_EXITING | C.CR8_STORE_EXITING  # CONFIG_X86_64
)
KVM_OPTIONAL_VMX_CPU_BASED_VM_EXEC_CONTROL = int(
    C.RDTSC_EXITING | C.TPR_SHADOW | C.USE_IO_BITMAPS | C.MONITOR_TRAP_FLAG | C.USE_MSR_BITMAPS
    | C.NMI_WINDOW_EXITING | C.PAUSE_EXITING | C.ACTIVATE_SECONDARY_CONTROLS
)
KVM_REQUIRED_VMX_SECONDARY_VM_EXEC_CONTROL = 0
KVM_OPTIONAL_VMX_SECONDARY_VM_EXEC_CONTROL = int(
    S.VIRTUALIZE_APIC_ACCESSES | S.WBINVD_EXITING | S.ENABLE_VPID | S.ENABLE_EPT
    | S.UNRESTRICTED_GUEST | S.PAUSE_LOOP_EXITING | S.DESC | S.ENABLE_RDTSCP | S.ENABLE_INVPCID
    | S.RDSEED_EXITING | S.RDRAND_EXITING
)
KVM_REQUIRED_VMX_VM_EXIT_CONTROLS = int(X.SAVE_DEBUG_CONTROLS | X.ACK_INTR_ON_EXIT | X.HOST_ADDR_SPACE_SIZE)
KVM_OPTIONAL_VMX_VM_EXIT_CONTROLS = int(
    X.SAVE_IA32_PAT | X.LOAD_IA32_PAT | X.SAVE_IA32_EFER | X.SAVE_VMX_PREEMPTION_TIMER | X.LOAD_IA32_EFER
)
KVM_REQUIRED_VMX_VM_ENTRY_CONTROLS = int(E.LOAD_DEBUG_CONTROLS | E.IA32E_MODE)
KVM_OPTIONAL_VMX_VM_ENTRY_CONTROLS = int(E.LOAD_IA32_PAT | E.LOAD_IA32_EFER)

# --- CR0/CR4 (arch/x86/kvm/kvm_cache_regs.h, vmx.c) --------------------------------------------
KVM_POSSIBLE_CR0_GUEST_BITS = int(Cr0.TS | Cr0.WP)
KVM_POSSIBLE_CR4_GUEST_BITS = int(
    Cr4.PVI | Cr4.DE | Cr4.PCE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.PGE | Cr4.TSD | Cr4.FSGSBASE
)
KVM_VM_CR0_ALWAYS_OFF = int(Cr0.NW | Cr0.CD)
KVM_VM_CR0_ALWAYS_ON_UNRESTRICTED_GUEST = int(Cr0.NE)
KVM_VM_CR4_ALWAYS_ON_UNRESTRICTED_GUEST = int(Cr4.VMXE)
X86_CR4_TLBFLUSH_BITS = int(Cr4.PGE | Cr4.PCIDE | Cr4.PAE | Cr4.SMEP)
X86_CR4_PDPTR_BITS = int(Cr4.PGE | Cr4.PSE | Cr4.PAE | Cr4.SMEP)
_U64 = (1 << 64) - 1
_PIN_PREEMPTION_TIMER = int(P.VMX_PREEMPTION_TIMER)  # a plain int: tested on every VM entry

# --- exception bitmap (vmx_update_exception_bitmap()) ------------------------------------------
PFERR_PRESENT_MASK = int(PageFaultErrorCode.PRESENT)
ALWAYS_INTERCEPTED_EXCEPTIONS = (
    (1 << ExceptionVector.PF) | (1 << ExceptionVector.UD) | (1 << ExceptionVector.MC)
    | (1 << ExceptionVector.DB) | (1 << ExceptionVector.AC)
)

# KVM_SET_GUEST_DEBUG control bits (uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000


class VmxSetupError(RuntimeError):
    """The processor lacks a VMX feature this hypervisor cannot do without (setup_vmcs_config()
    fails with -EIO; hardware_setup() then refuses to load kvm_intel)."""


@dataclass(frozen=True)
class VmcsConfig:
    """``struct vmcs_config``: the controls this host can use, computed once."""

    pin_based: int
    cpu_based: int
    secondary: int
    vmexit: int
    vmentry: int
    revision_id: int
    preemption_timer_rate: int
    maxphyaddr: int

    @property
    def has_preemption_timer(self) -> bool:
        return bool(self.pin_based & _PIN_PREEMPTION_TIMER)

    @property
    def has_vpid(self) -> bool:
        return bool(self.secondary & S.ENABLE_VPID)

    @property
    def has_msr_bitmap(self) -> bool:
        return bool(self.cpu_based & C.USE_MSR_BITMAPS)

    @property
    def has_io_bitmap(self) -> bool:
        return bool(self.cpu_based & C.USE_IO_BITMAPS)

    @property
    def has_virtual_nmis(self) -> bool:
        return bool(self.pin_based & P.VIRTUAL_NMIS)


def setup_vmcs_config(rdmsr: Callable[[int], int], *, maxphyaddr: int = 46) -> VmcsConfig:
    """``setup_vmcs_config()``: adjust each control field against the (TRUE) capability MSRs,
    then drop what KVM turns off itself: CR3 load/store and INVLPG exiting with EPT, CR8 exiting
    with a TPR shadow. Raises :class:`VmxSetupError` if EPT or unrestricted guest is missing --
    this hypervisor has no shadow paging and no real-mode emulator."""
    basic = rdmsr(Msr.IA32_VMX_BASIC)
    true = bool(basic >> 55 & 1)

    def adjust(minimum: int, optional: int, true_msr: Msr, msr: Msr) -> int:
        index = true_msr if true else msr
        try:
            return adjust_vmx_controls(minimum, optional, rdmsr(index), index)
        except UnsupportedControlsError as exc:
            raise VmxSetupError(f"setup_vmcs_config: {exc}") from exc

    pin = adjust(KVM_REQUIRED_VMX_PIN_BASED_VM_EXEC_CONTROL, KVM_OPTIONAL_VMX_PIN_BASED_VM_EXEC_CONTROL,
                 Msr.IA32_VMX_TRUE_PINBASED_CTLS, Msr.IA32_VMX_PINBASED_CTLS)
    cpu = adjust(KVM_REQUIRED_VMX_CPU_BASED_VM_EXEC_CONTROL, KVM_OPTIONAL_VMX_CPU_BASED_VM_EXEC_CONTROL,
                 Msr.IA32_VMX_TRUE_PROCBASED_CTLS, Msr.IA32_VMX_PROCBASED_CTLS)
    secondary = 0
    if cpu & C.ACTIVATE_SECONDARY_CONTROLS:
        try:
            secondary = adjust_vmx_controls(
                KVM_REQUIRED_VMX_SECONDARY_VM_EXEC_CONTROL, KVM_OPTIONAL_VMX_SECONDARY_VM_EXEC_CONTROL,
                rdmsr(Msr.IA32_VMX_PROCBASED_CTLS2), Msr.IA32_VMX_PROCBASED_CTLS2,
            )
        except UnsupportedControlsError as exc:
            raise VmxSetupError(f"setup_vmcs_config: {exc}") from exc
    if not secondary & S.ENABLE_EPT or not secondary & S.UNRESTRICTED_GUEST:
        raise VmxSetupError("this hypervisor needs EPT and unrestricted guest (no shadow paging, no real-mode emulation)")
    # With EPT, KVM does not intercept CR3 accesses or INVLPG (setup_vmcs_config()).
    cpu &= ~int(C.CR3_LOAD_EXITING | C.CR3_STORE_EXITING | C.INVLPG_EXITING)
    if cpu & C.TPR_SHADOW:
        cpu &= ~int(C.CR8_LOAD_EXITING | C.CR8_STORE_EXITING)
    vmexit = adjust(KVM_REQUIRED_VMX_VM_EXIT_CONTROLS, KVM_OPTIONAL_VMX_VM_EXIT_CONTROLS,
                    Msr.IA32_VMX_TRUE_EXIT_CTLS, Msr.IA32_VMX_EXIT_CTLS)
    vmentry = adjust(KVM_REQUIRED_VMX_VM_ENTRY_CONTROLS, KVM_OPTIONAL_VMX_VM_ENTRY_CONTROLS,
                     Msr.IA32_VMX_TRUE_ENTRY_CTLS, Msr.IA32_VMX_ENTRY_CTLS)
    misc = rdmsr(Msr.IA32_VMX_MISC)
    return VmcsConfig(
        pin_based=pin,
        cpu_based=cpu,
        secondary=secondary,
        vmexit=vmexit,
        vmentry=vmentry,
        revision_id=basic & 0x7FFFFFFF,
        preemption_timer_rate=misc & 0x1F,
        maxphyaddr=maxphyaddr,
    )


# --- the per-vCPU values init_vmcs() writes -----------------------------------------------------
def vmx_pin_based_exec_ctrl(config: VmcsConfig) -> int:
    """``vmx_pin_based_exec_ctrl()``: posted interrupts off (no APICv here); the preemption
    timer is armed per entry when a deadline exists (``vmx_update_hv_timer()``)."""
    return config.pin_based & ~int(P.POSTED_INTR | P.VMX_PREEMPTION_TIMER)


def vmx_exec_control(config: VmcsConfig) -> int:
    """``vmx_exec_control()``: the optional exits KVM turns on only on demand are off."""
    ctl = config.cpu_based
    ctl &= ~int(C.RDTSC_EXITING | C.USE_IO_BITMAPS | C.MONITOR_TRAP_FLAG | C.PAUSE_EXITING)
    ctl &= ~int(C.INTR_WINDOW_EXITING | C.NMI_WINDOW_EXITING)
    return ctl


def vmx_secondary_exec_control(config: VmcsConfig, *, vpid: int) -> int:
    """``vmx_secondary_exec_control()``: no VPID without one, no APIC virtualization, no
    descriptor-table exiting (only for UMIP emulation), no RDRAND/RDSEED exiting (the guest's
    CPUID may advertise them), no pause-loop exiting unless asked (ple_gap = 0)."""
    ctl = config.secondary
    if not vpid:
        ctl &= ~int(S.ENABLE_VPID)
    ctl &= ~int(S.VIRTUALIZE_APIC_ACCESSES | S.DESC | S.RDRAND_EXITING | S.RDSEED_EXITING | S.PAUSE_LOOP_EXITING)
    return ctl


def vmx_vmexit_ctrl(config: VmcsConfig) -> int:
    """``vmx_vmexit_ctrl()``. KVM clears "save IA32_PAT/EFER" because it intercepts every
    write to them; this hypervisor lets a user pass EFER/PAT writes through (seed 002), so it
    keeps saving them and the VMCS stays the one place that holds them. The preemption-timer
    value is recomputed before every entry, not saved."""
    return config.vmexit & ~int(X.SAVE_VMX_PREEMPTION_TIMER)


def vmx_vmentry_ctrl(config: VmcsConfig) -> int:
    """``vmx_vmentry_ctrl()``: "IA-32e mode guest" follows EFER.LMA (vmx_set_efer())."""
    return config.vmentry & ~int(E.IA32E_MODE)


# --- exception bitmap ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExceptionBitmapPolicy:
    """The inputs of ``vmx_update_exception_bitmap()``."""

    enable_ept: bool = True
    guest_maxphyaddr: int = 46
    host_maxphyaddr: int = 46
    allow_smaller_maxphyaddr: bool = True
    guest_debug: int = 0
    extra: int = 0  # exceptions the user asked to intercept (seed 002: #PF)


def vmx_need_pf_intercept(policy: ExceptionBitmapPolicy) -> bool:
    """``vmx_need_pf_intercept()``: always without EPT; with EPT only if the guest's MAXPHYADDR
    is smaller than the host's (KVM must then fault on guest PTEs that set bits the guest
    thinks are reserved)."""
    if not policy.enable_ept:
        return True
    return policy.allow_smaller_maxphyaddr and policy.guest_maxphyaddr < policy.host_maxphyaddr


def exception_bitmap(policy: ExceptionBitmapPolicy) -> tuple[int, int, int]:
    """(EXCEPTION_BITMAP, PAGE_FAULT_ERROR_CODE_MASK, PAGE_FAULT_ERROR_CODE_MATCH), as
    ``vmx_update_exception_bitmap()`` computes them (seed 000; SDM 26.2 for the mask/match test):

    * #PF, #UD, #MC, #DB, #AC always; #BP when guest debugging uses software breakpoints;
    * #PF dropped unless :func:`vmx_need_pf_intercept` -- then, with EPT, only *present* #PFs
      exit: mask = match = PFERR_PRESENT_MASK (Linux 5.x; newer kernels also mask RSVD);
    * exceptions the user asked for (``extra``) added; an explicit #PF intercept traps every #PF
      (mask = match = 0)."""
    eb = ALWAYS_INTERCEPTED_EXCEPTIONS
    debug = policy.guest_debug
    if debug & (KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP) == (KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP):
        eb |= 1 << ExceptionVector.BP
    if not vmx_need_pf_intercept(policy):
        eb &= ~(1 << ExceptionVector.PF)
    selective_pf_trap = policy.enable_ept and bool(eb & (1 << ExceptionVector.PF))
    mask = PFERR_PRESENT_MASK if selective_pf_trap else 0
    if policy.extra & (1 << ExceptionVector.PF):
        mask = 0  # the user wants every #PF
    eb |= policy.extra
    return eb, mask, mask


# --- CR0 / CR4 -----------------------------------------------------------------------------------
def cr0_guest_owned_bits(*, enable_ept: bool = True) -> int:
    """``vmx_l1_guest_owned_cr0_bits()``: TS and (with EPT) WP."""
    bits = KVM_POSSIBLE_CR0_GUEST_BITS
    if not enable_ept:
        bits &= ~int(Cr0.WP)
    return bits


def cr4_guest_owned_bits(*, enable_ept: bool = True, cr4_guest_rsvd_bits: int = 0) -> int:
    """``set_cr4_guest_host_mask()``'s guest-owned bits."""
    bits = KVM_POSSIBLE_CR4_GUEST_BITS & ~cr4_guest_rsvd_bits
    if not enable_ept:
        bits &= ~(X86_CR4_TLBFLUSH_BITS | X86_CR4_PDPTR_BITS)
    return bits


def guest_host_mask(guest_owned: int) -> int:
    """The CR0/CR4 guest/host mask: 1 = host-owned (reads see the shadow, writes that change
    it exit; SDM 25.6.6)."""
    return ~guest_owned & _U64


def hw_cr0(cr0: int) -> int:
    """The CR0 the processor runs the guest with (``vmx_set_cr0()``, unrestricted guest):
    NW/CD cleared (KVM_VM_CR0_ALWAYS_OFF), NE forced on."""
    return (cr0 & ~KVM_VM_CR0_ALWAYS_OFF) | KVM_VM_CR0_ALWAYS_ON_UNRESTRICTED_GUEST


def hw_cr4(cr4: int, *, paging: bool) -> int:
    """The CR4 the processor runs the guest with (``vmx_set_cr4()``, unrestricted guest): VMXE
    forced on; SMEP/SMAP/PKE cleared while guest paging is off (they would apply to EPT's
    identity-mapped accesses)."""
    value = cr4 | KVM_VM_CR4_ALWAYS_ON_UNRESTRICTED_GUEST
    if not paging:
        value &= ~int(Cr4.SMEP | Cr4.SMAP | Cr4.PKE)
    return value


HOST_CS_SELECTOR = 0x10  # __KERNEL_CS
HOST_SS_SELECTOR = 0x18  # __KERNEL_DS
HOST_TR_SELECTOR = 0x40  # GDT_ENTRY_TSS * 8
HOST_RIP_VMX_VMEXIT = 0xFFFFFFFF81A00000  # &vmx_vmexit in a kernel image
HOST_IDT_BASE = 0xFFFFFE0000000000  # the CPU entry area's IDT


def constant_host_state() -> dict[F, int]:
    """``vmx_set_constant_host_state()``'s selectors, IDT base and RIP; the CRs, PAT and EFER
    come from the processor (the caller adds them)."""
    return {
        F.HOST_CS_SELECTOR: HOST_CS_SELECTOR,
        F.HOST_DS_SELECTOR: 0,
        F.HOST_ES_SELECTOR: 0,
        F.HOST_SS_SELECTOR: HOST_SS_SELECTOR,
        F.HOST_FS_SELECTOR: 0,
        F.HOST_GS_SELECTOR: 0,
        F.HOST_TR_SELECTOR: HOST_TR_SELECTOR,
        F.HOST_IDTR_BASE: HOST_IDT_BASE,
        F.HOST_RIP: HOST_RIP_VMX_VMEXIT,
        F.HOST_IA32_SYSENTER_CS: 0,
        F.HOST_IA32_SYSENTER_EIP: 0,
        F.HOST_FS_BASE: 0,
        F.HOST_GS_BASE: 0,
    }


def per_cpu_host_state(cpu_id: int) -> dict[F, int]:
    """What ``vmx_vcpu_load_vmcs()`` writes when a VMCS moves to a CPU: that CPU's TSS and GDT
    (in the CPU entry area) and its SYSENTER stack; and the per-CPU kernel stack for HOST_RSP
    (vmx_update_host_rsp())."""
    area = 0xFFFFFE0000001000 + cpu_id * 0x3B000
    return {
        F.HOST_TR_BASE: area + 0x3000,
        F.HOST_GDTR_BASE: area,
        F.HOST_IA32_SYSENTER_ESP: area + 0x3000 + 0x200,
        F.HOST_RSP: 0xFFFFC90000010000 + cpu_id * 0x10000 - 0x100,
    }
