"""The CPUID feature flags this model advertises -- only what it executes.

KVM builds the guest's CPUID from what the host CPU has, masked to what KVM itself supports
(``kvm_set_cpu_caps()`` in arch/x86/kvm/cpuid.c: ``kvm_cpu_cap_mask()`` per feature word). Here
the "host" is the Unicorn core (its Skylake-Server model, :mod:`pyvmx.engine.unicorn_cpu`) plus
what the VT-x machine and the hypervisor implement themselves (paging features in
:mod:`pyvmx.vmx.paging`, the fast system calls in :mod:`pyvmx.engine.syscall`, RDRAND/RDSEED,
RDTSCP, the MSRs in :mod:`pyvmx.kvm.msrs`). Every flag in :data:`ADVERTISED` is backed by a test
that executes it in a guest (tests/kvm/cpu/test_cpuid_features.py); a flag the core cannot
back is left out, as KVM leaves out what it cannot virtualize.

Left out, found by executing them on Unicorn 2.1.4 (#UD whatever the model): AVX and everything
VEX-encoded but BMI1/BMI2 (F16C, FMA, AVX2), XSAVEC/XSAVES, INVPCID, RDPID, SHA, PKU; also
features with nothing behind them here: x2APIC and the TSC deadline timer (no local APIC),
VMX (no nested virtualization), PCID (CR4.PCIDE is not modelled beyond the bit), MONITOR/MWAIT
(no exit-less wake-up).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Feature:
    """One CPUID feature flag: Linux's X86_FEATURE_ name, its leaf, sub-leaf, register, bit."""

    name: str
    function: int
    register: str
    bit: int
    index: int = 0

    @property
    def mask(self) -> int:
        return 1 << self.bit


def _leaf(function: int, register: str, bits: dict[str, int], index: int = 0) -> list[Feature]:
    return [Feature(name, function, register, bit, index) for name, bit in bits.items()]


# SDM Vol. 2A CPUID, Table 3-11 (01H:EDX), Table 3-10 (01H:ECX), 07H.0 EBX, 80000001H, 80000007H.
ADVERTISED: tuple[Feature, ...] = tuple(
    _leaf(0x1, "edx", {
        "FPU": 0, "DE": 2, "PSE": 3, "TSC": 4, "MSR": 5, "PAE": 6, "MCE": 7, "CX8": 8, "SEP": 11,
        "MTRR": 12, "PGE": 13, "CMOV": 15, "PAT": 16, "PSE36": 17, "CLFLUSH": 19, "MMX": 23,
        "FXSR": 24, "XMM": 25, "XMM2": 26,
    })
    + _leaf(0x1, "ecx", {
        "XMM3": 0, "PCLMULQDQ": 1, "SSSE3": 9, "CX16": 13, "XMM4_1": 19, "XMM4_2": 20,
        "MOVBE": 22, "POPCNT": 23, "AES": 25, "XSAVE": 26, "OSXSAVE": 27, "RDRAND": 30,
        "HYPERVISOR": 31,
    })
    + _leaf(0x7, "ebx", {
        "FSGSBASE": 0, "BMI1": 3, "SMEP": 7, "BMI2": 8, "ERMS": 9, "RDSEED": 18, "ADX": 19,
        "SMAP": 20, "CLFLUSHOPT": 23, "CLWB": 24,
    })
    + _leaf(0x80000001, "ecx", {"LAHF_LM": 0, "ABM": 5, "3DNOWPREFETCH": 8})
    + _leaf(0x80000001, "edx", {"SYSCALL": 11, "NX": 20, "PDPE1GB": 26, "RDTSCP": 27, "LM": 29})
    # 80000007H:EDX[8] invariant TSC (Linux sets X86_FEATURE_CONSTANT_TSC and NONSTOP_TSC from
    # it): guest time runs at tsc_hz whatever the guest does, halted included.
    + _leaf(0x80000007, "edx", {"CONSTANT_TSC": 8})
)

# Bits the hypervisor computes at each CPUID exit rather than taking from the table
# (kvm_update_cpuid_runtime(): OSXSAVE mirrors CR4.OSXSAVE).
DYNAMIC = frozenset({"OSXSAVE"})


def feature(name: str) -> Feature:
    for f in ADVERTISED:
        if f.name == name:
            return f
    raise KeyError(name)


def register_value(function: int, register: str, index: int = 0, features: Iterable[Feature] = ADVERTISED) -> int:
    """The advertised bits of one CPUID output register (dynamic bits left 0)."""
    value = 0
    for f in features:
        if (f.function, f.index, f.register) == (function, index, register) and f.name not in DYNAMIC:
            value |= f.mask
    return value
