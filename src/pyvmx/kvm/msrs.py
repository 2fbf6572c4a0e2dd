"""The guest's MSRs as the hypervisor keeps them: ``kvm_get_msr_common()`` /
``kvm_set_msr_common()`` (arch/x86/kvm/x86.c), ``vmx_get_msr()`` / ``vmx_set_msr()`` (vmx.c).

Three homes, as in KVM:

* the VMCS guest-state area -- EFER, PAT, FS/GS base, SYSENTER_CS/ESP/EIP, DEBUGCTL (SDM 25.4);
* the processor's register file -- STAR, LSTAR, CSTAR, SYSCALL_MASK, KERNEL_GS_BASE, TSC_AUX:
  the instructions that use them (SYSCALL, SWAPGS, RDTSCP) read them from the CPU, so a value
  the hypervisor writes is loaded into the CPU by the VM-entry MSR-load area at the next entry
  (SDM 27.4; KVM's "user return" and autoload MSRs play this part);
* the hypervisor alone -- the TSC (an offset, SDM 25.6.5), APIC_BASE, the MTRRs, MISC_ENABLE,
  the KVM paravirtual MSRs (async page faults, kvmclock, PV EOI, poll control).

An MSR this store does not know, a reserved bit, a read-only MSR written, a non-canonical
address: the access faults, and the caller injects #GP(0) (``kvm_msr_ignored_check()`` with
ignore_msrs off). Accesses are values, never Python exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pyvmx.arch.msr import (
    KVM_ASYNC_PF_DELIVERY_AS_INT,
    KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT,
    KVM_ASYNC_PF_ENABLED,
    KVM_ASYNC_PF_VEC_MASK,
    Msr,
)
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Efer
from pyvmx.vmx.caps import canonical
from pyvmx.kvm.cpuid import (
    CPUID_80000001_EDX_LM,
    CPUID_80000001_EDX_NX,
    CPUID_80000001_EDX_RDTSCP,
    CPUID_80000001_EDX_SYSCALL,
    KVM_CPUID_FEATURES,
    KVM_FEATURE_ASYNC_PF_INT,
    KVM_FEATURE_ASYNC_PF_VMEXIT,
    CpuidTable,
)

_U64 = (1 << 64) - 1

MSR_MTRR_PHYSBASE0 = 0x200
MSR_MTRR_FIX_64K_00000 = 0x250
MSR_MTRR_FIX_16K_80000 = 0x258
MSR_MTRR_FIX_16K_A0000 = 0x259
MSR_MTRR_FIX_4K_C0000 = 0x268
MSR_MTRR_FIX_4K_F8000 = 0x26F
KVM_NR_VAR_MTRR = 8
MTRR_CAP_VALUE = KVM_NR_VAR_MTRR | (1 << 8) | (1 << 10)  # VCNT=8, FIX, WC (kvm_mtrr_get_msr)
MTRR_VALID_TYPES = frozenset({0, 1, 4, 5, 6})  # UC, WC, WT, WP, WB
MSR_IA32_APICBASE_BSP = 1 << 8
MSR_IA32_APICBASE_ENABLE = 1 << 11
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL = 1 << 12
MSR_IA32_MISC_ENABLE_BTS_UNAVAIL = 1 << 11
MISC_ENABLE_DEFAULT = MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL | MSR_IA32_MISC_ENABLE_BTS_UNAVAIL | MSR_IA32_MISC_ENABLE_FAST_STRING
MSR_IA32_UCODE_REV_DEFAULT = 0x100000000  # kvm_get_msr_feature(): microcode revision 1
FEAT_CTL_LOCKED = 1 << 0
KVM_STEAL_RESERVED_MASK = 0x3E  # bits 5:1 (uapi kvm_para.h KVM_STEAL_VALID_BITS ~ 0x3f & ~1)
KVM_MSR_ENABLED = 1

# Where each VMCS-backed MSR lives.
VMCS_MSRS: dict[int, F] = {
    Msr.EFER: F.GUEST_IA32_EFER,
    Msr.IA32_CR_PAT: F.GUEST_IA32_PAT,
    Msr.FS_BASE: F.GUEST_FS_BASE,
    Msr.GS_BASE: F.GUEST_GS_BASE,
    Msr.IA32_SYSENTER_CS: F.GUEST_SYSENTER_CS,
    Msr.IA32_SYSENTER_ESP: F.GUEST_SYSENTER_ESP,
    Msr.IA32_SYSENTER_EIP: F.GUEST_SYSENTER_EIP,
    Msr.IA32_DEBUGCTLMSR: F.GUEST_IA32_DEBUGCTL,
}
# MSRs the CPU reads itself (SYSCALL/SYSRET, SWAPGS, RDTSCP): kept in the register file.
CORE_MSRS = frozenset({Msr.STAR, Msr.LSTAR, Msr.CSTAR, Msr.SYSCALL_MASK, Msr.KERNEL_GS_BASE, Msr.TSC_AUX})
_CANONICAL_MSRS = frozenset({
    Msr.LSTAR, Msr.CSTAR, Msr.KERNEL_GS_BASE, Msr.FS_BASE, Msr.GS_BASE,
    Msr.IA32_SYSENTER_ESP, Msr.IA32_SYSENTER_EIP,
})


def is_canonical(address: int, vaddr_bits: int = 48) -> bool:
    """SDM 3.3.7.1: bits 63 down to the highest implemented bit are all equal."""
    return canonical(address, vaddr_bits)


def pat_valid(value: int) -> bool:
    """``kvm_pat_valid()``: each byte a PAT type 0, 1, 4, 5, 6 or 7."""
    return all((value >> (8 * i)) & 0xFF in (0, 1, 4, 5, 6, 7) for i in range(8))


class MsrHost(Protocol):
    """What the store needs from its vCPU."""

    cpuid: CpuidTable

    def vmcs_read(self, field: F) -> int: ...

    def vmcs_write(self, field: F, value: int) -> None: ...

    def guest_tsc(self) -> int: ...

    def write_guest_tsc(self, value: int) -> None: ...

    def set_efer(self, efer: int) -> None: ...

    def is_paging(self) -> bool: ...

    def load_core_msr(self, index: int, value: int) -> None: ...

    def read_core_msr(self, index: int) -> int | None: ...


class AsyncPfMsrs(Protocol):
    """MSR_KVM_ASYNC_PF_EN/INT/ACK as the async-PF state machine handles them
    (:class:`pyvmx.kvm.mmu.async_pf.AsyncPf`)."""

    def set_msr(self, index: int, value: int) -> bool: ...

    def get_msr(self, index: int) -> int: ...


@dataclass
class AsyncPfState:
    """``vcpu->arch.apf``: the guest's async-PF set-up (MSR_KVM_ASYNC_PF_EN/INT/ACK)."""

    msr_en_val: int = 0
    vec: int = 0
    pageready_pending: bool = False
    acks: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.msr_en_val & KVM_ASYNC_PF_ENABLED)

    @property
    def area_gpa(self) -> int:
        return self.msr_en_val & ~0x3F

    @property
    def send_always(self) -> bool:
        return bool(self.msr_en_val & 2)

    @property
    def delivery_as_pf_vmexit(self) -> bool:
        return bool(self.msr_en_val & KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT)

    @property
    def delivery_as_int(self) -> bool:
        return bool(self.msr_en_val & KVM_ASYNC_PF_DELIVERY_AS_INT)


@dataclass
class MsrStore:
    """One vCPU's MSRs (see the module docstring). ``get`` returns None and ``set`` False when
    the access must #GP."""

    host: MsrHost
    bsp: bool = True
    values: dict[int, int] = field(default_factory=dict)
    mtrr: dict[int, int] = field(default_factory=dict)
    apf: AsyncPfState = field(default_factory=AsyncPfState)
    on_async_pf_ack: object | None = None  # callable() when the guest acks a "page ready"
    async_pf: AsyncPfMsrs | None = None  # the MMU's async-PF state machine, when the vCPU has one

    def __post_init__(self) -> None:
        self.values.setdefault(Msr.IA32_APICBASE, APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE | (MSR_IA32_APICBASE_BSP if self.bsp else 0))
        self.values.setdefault(Msr.IA32_MISC_ENABLE, MISC_ENABLE_DEFAULT)
        self.values.setdefault(Msr.MTRRdefType, 0)
        for core in CORE_MSRS:
            self.values.setdefault(core, 0)

    # --- helpers -----------------------------------------------------------------------------
    def _efer_reserved_bits(self) -> int:
        """``efer_reserved_bits`` narrowed by the guest's CPUID (kvm_valid_efer())."""
        allowed = 0
        cpuid = self.host.cpuid
        if cpuid.has(0x80000001, 0, "edx", CPUID_80000001_EDX_SYSCALL):
            allowed |= Efer.SCE
        if cpuid.has(0x80000001, 0, "edx", CPUID_80000001_EDX_LM):
            allowed |= Efer.LME | Efer.LMA
        if cpuid.has(0x80000001, 0, "edx", CPUID_80000001_EDX_NX):
            allowed |= Efer.NX
        return _U64 & ~int(allowed)

    def _vaddr_bits(self) -> int:
        """The guest's linear-address width, CPUID 80000008H:EAX[15:8] (48 without the leaf):
        what is_noncanonical_address() checks against."""
        ext8 = self.host.cpuid.find(0x80000008)
        bits = (ext8.eax >> 8) & 0xFF if ext8 is not None else 0
        return bits or 48

    @staticmethod
    def _mtrr_index(index: int) -> bool:
        return (
            index == Msr.MTRRdefType
            or MSR_MTRR_PHYSBASE0 <= index < MSR_MTRR_PHYSBASE0 + 2 * KVM_NR_VAR_MTRR
            or index in (MSR_MTRR_FIX_64K_00000, MSR_MTRR_FIX_16K_80000, MSR_MTRR_FIX_16K_A0000)
            or MSR_MTRR_FIX_4K_C0000 <= index <= MSR_MTRR_FIX_4K_F8000
        )

    def _mtrr_valid(self, index: int, value: int) -> bool:
        """``kvm_mtrr_valid()``: memory types valid, reserved bits clear."""
        if index == Msr.MTRRdefType:
            return not value & ~0xCFF and value & 0xFF in MTRR_VALID_TYPES
        if index >= MSR_MTRR_PHYSBASE0 and index < MSR_MTRR_PHYSBASE0 + 2 * KVM_NR_VAR_MTRR:
            maxphy = self.host.cpuid.guest_maxphyaddr
            reserved = _U64 & ~((1 << maxphy) - 1)
            if (index - MSR_MTRR_PHYSBASE0) % 2 == 0:  # PHYSBASE: type in 7:0, 11:8 reserved
                return not value & (reserved | 0xF00) and value & 0xFF in MTRR_VALID_TYPES
            return not value & (reserved | 0x7FF)  # PHYSMASK: 10:0 reserved, bit 11 valid
        return all((value >> (8 * i)) & 0xFF in MTRR_VALID_TYPES for i in range(8))

    # --- reads ---------------------------------------------------------------------------------
    def get(self, index: int, *, host_initiated: bool = False) -> int | None:
        """RDMSR (or KVM_GET_MSRS when ``host_initiated``): the value, or None for #GP."""
        index &= 0xFFFFFFFF
        h = self.host
        field_ = VMCS_MSRS.get(index)
        if field_ is not None:
            return h.vmcs_read(field_)
        if index in CORE_MSRS:
            if index == Msr.TSC_AUX and not h.cpuid.has(0x80000001, 0, "edx", CPUID_80000001_EDX_RDTSCP) and not host_initiated:
                return None
            core = h.read_core_msr(index)
            return self.values[index] if core is None else core
        if index == Msr.IA32_TSC:
            return h.guest_tsc() & _U64
        if index == Msr.MTRRcap:
            return MTRR_CAP_VALUE
        if self._mtrr_index(index):
            return self.values[index] if index == Msr.MTRRdefType else self.mtrr.get(index, 0)
        if index in (Msr.IA32_APICBASE, Msr.IA32_MISC_ENABLE):
            return self.values[index]
        if index == Msr.IA32_PLATFORM_ID:
            return 0
        if index == Msr.IA32_UCODE_REV:
            return MSR_IA32_UCODE_REV_DEFAULT
        if index == Msr.IA32_FEAT_CTL:
            return FEAT_CTL_LOCKED  # locked, VMX off: no nested virtualization
        if index in (Msr.IA32_MCG_CAP, Msr.IA32_MCG_STATUS):
            return self.values.get(index, 0)
        if index in (Msr.KVM_ASYNC_PF_EN, Msr.KVM_ASYNC_PF_INT, Msr.KVM_ASYNC_PF_ACK) and self.async_pf is not None:
            return self.async_pf.get_msr(index)
        if index == Msr.KVM_ASYNC_PF_EN:
            return self.apf.msr_en_val
        if index == Msr.KVM_ASYNC_PF_INT:
            return self.apf.vec
        if index == Msr.KVM_ASYNC_PF_ACK:
            return 0
        if index in (Msr.KVM_WALL_CLOCK, Msr.KVM_WALL_CLOCK_NEW, Msr.KVM_SYSTEM_TIME, Msr.KVM_SYSTEM_TIME_NEW,
                     Msr.KVM_STEAL_TIME, Msr.KVM_PV_EOI_EN):
            return self.values.get(index, 0)
        if index == Msr.KVM_POLL_CONTROL:
            return self.values.get(index, 1)
        return None

    # --- writes --------------------------------------------------------------------------------
    def set(self, index: int, value: int, *, host_initiated: bool = False) -> bool:
        """WRMSR (or KVM_SET_MSRS): True if accepted, False for #GP."""
        index &= 0xFFFFFFFF
        value &= _U64
        h = self.host
        if index in _CANONICAL_MSRS and not is_canonical(value, self._vaddr_bits()):
            return False
        if index == Msr.EFER:
            return self._set_efer(value, host_initiated)
        if index == Msr.IA32_CR_PAT:
            if not pat_valid(value):
                return False
            h.vmcs_write(F.GUEST_IA32_PAT, value)
            return True
        if index == Msr.IA32_SYSENTER_CS:
            h.vmcs_write(F.GUEST_SYSENTER_CS, value & 0xFFFFFFFF)
            return True
        if index == Msr.IA32_DEBUGCTLMSR:
            # vmx_set_msr(): only BTF/LBR-style bits KVM supports; here none but 0 is accepted.
            if value:
                return False
            h.vmcs_write(F.GUEST_IA32_DEBUGCTL, 0)
            return True
        field_ = VMCS_MSRS.get(index)
        if field_ is not None:
            h.vmcs_write(field_, value)
            return True
        if index in CORE_MSRS:
            if index == Msr.TSC_AUX:
                if not host_initiated and not h.cpuid.has(0x80000001, 0, "edx", CPUID_80000001_EDX_RDTSCP):
                    return False
                if value >> 32:
                    return False
            self.values[index] = value
            h.load_core_msr(index, value)
            return True
        if index == Msr.IA32_TSC:
            h.write_guest_tsc(value)
            return True
        if index == Msr.MTRRcap:
            return host_initiated and value == MTRR_CAP_VALUE
        if self._mtrr_index(index):
            if not self._mtrr_valid(index, value):
                return False
            if index == Msr.MTRRdefType:
                self.values[index] = value
            else:
                self.mtrr[index] = value
            return True
        if index == Msr.IA32_APICBASE:
            # kvm_set_apic_base(): reserved bits (0-7, 9, 10, above MAXPHYADDR) must be clear;
            # the BSP flag is read-only for the guest.
            reserved = 0x6FF | (_U64 & ~((1 << h.cpuid.guest_maxphyaddr) - 1))
            if value & reserved:
                return False
            if not host_initiated and (value ^ self.values[index]) & MSR_IA32_APICBASE_BSP:
                return False
            self.values[index] = value
            return True
        if index == Msr.IA32_MISC_ENABLE:
            self.values[index] = value
            return True
        if index in (Msr.IA32_PLATFORM_ID, Msr.IA32_UCODE_REV):
            return True  # writes ignored (kvm_set_msr_common: "ignored" MSRs)
        if index == Msr.IA32_FEAT_CTL:
            return host_initiated
        if index == Msr.IA32_MCG_STATUS:
            self.values[index] = value
            return True
        if index == Msr.IA32_MCG_CAP:
            return host_initiated
        if index == Msr.KVM_ASYNC_PF_EN:
            if not self._set_async_pf_en(value):
                return False
            return self.async_pf.set_msr(index, value) if self.async_pf is not None else True
        if index in (Msr.KVM_ASYNC_PF_INT, Msr.KVM_ASYNC_PF_ACK) and self.async_pf is not None:
            if index == Msr.KVM_ASYNC_PF_ACK and value & 1 and callable(self.on_async_pf_ack):
                self.on_async_pf_ack()
            return self.async_pf.set_msr(index, value)
        if index == Msr.KVM_ASYNC_PF_INT:
            if value & ~KVM_ASYNC_PF_VEC_MASK:
                return False
            self.apf.vec = value & KVM_ASYNC_PF_VEC_MASK
            return True
        if index == Msr.KVM_ASYNC_PF_ACK:
            if value & 1:
                self.apf.pageready_pending = False
                self.apf.acks += 1
                if callable(self.on_async_pf_ack):
                    self.on_async_pf_ack()
            return True
        if index in (Msr.KVM_WALL_CLOCK, Msr.KVM_WALL_CLOCK_NEW, Msr.KVM_SYSTEM_TIME, Msr.KVM_SYSTEM_TIME_NEW):
            self.values[index] = value
            return True
        if index == Msr.KVM_STEAL_TIME:
            if value & KVM_STEAL_RESERVED_MASK:
                return False
            self.values[index] = value
            return True
        if index == Msr.KVM_PV_EOI_EN:
            if value & 0x6:  # bits 2:1 reserved (KVM_MSR_ENABLED is bit 0, 4-byte aligned)
                return False
            self.values[index] = value
            return True
        if index == Msr.KVM_POLL_CONTROL:
            if value & ~1:
                return False
            self.values[index] = value
            return True
        return False

    def _set_efer(self, efer: int, host_initiated: bool) -> bool:
        """``set_efer()``: reserved bits by CPUID; LME cannot change while paging is on; LMA is
        not writable by the guest (it follows CR0.PG with LME, vmx_set_cr0())."""
        h = self.host
        if efer & self._efer_reserved_bits():
            return False
        old = h.vmcs_read(F.GUEST_IA32_EFER)
        if not host_initiated:
            if h.is_paging() and (old ^ efer) & Efer.LME:
                return False
            efer = (efer & ~int(Efer.LMA)) | (old & Efer.LMA)
        h.set_efer(efer)
        return True

    def _set_async_pf_en(self, data: int) -> bool:
        """``kvm_pv_enable_async_pf()``."""
        if data & 0x30:
            return False
        cpuid = self.host.cpuid
        features = cpuid.find(KVM_CPUID_FEATURES)
        bits = features.eax if features is not None else 0
        if data & KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT and not bits >> KVM_FEATURE_ASYNC_PF_VMEXIT & 1:
            return False
        if data & KVM_ASYNC_PF_DELIVERY_AS_INT and not bits >> KVM_FEATURE_ASYNC_PF_INT & 1:
            return False
        self.apf.msr_en_val = data
        return True
