"""Strings a guest reads with CPUID, in the register order the SDM gives (SDM Vol. 2A CPUID:
"Basic CPUID Information" -- the vendor string is EBX, EDX, ECX; "Processor Brand String" --
leaves 80000002H-80000004H in EAX, EBX, ECX, EDX order) and the hypervisor signature the way
Linux reads it (arch/x86/include/asm/kvm_para.h ``kvm_cpuid_base()`` ->
``hypervisor_cpuid_base()``: EBX, ECX, EDX)."""

from __future__ import annotations

import pytest

from pyvmx.kvm.cpuid import BRAND_STRING, CpuidEntry, brand_entries, default_cpuid, vendor_registers

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image
from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm

pytestmark = pytest.mark.machine

CPUID_STRINGS = r"""
    xor %eax, %eax
    cpuid
    mov %ebx, vendor(%rip)            # the SDM's order: EBX, EDX, ECX
    mov %edx, vendor+4(%rip)
    mov %ecx, vendor+8(%rip)
    mov $0x40000000, %eax
    cpuid
    mov %ebx, kvm_sig(%rip)           # hypervisor_cpuid_base(): EBX, ECX, EDX
    mov %ecx, kvm_sig+4(%rip)
    mov %edx, kvm_sig+8(%rip)
    lea brand(%rip), %rdi
    mov $0x80000002, %esi
1:  mov %esi, %eax
    cpuid
    mov %eax, (%rdi)
    mov %ebx, 4(%rdi)
    mov %ecx, 8(%rdi)
    mov %edx, 12(%rdi)
    add $16, %rdi
    inc %esi
    cmp $0x80000005, %esi
    jne 1b
    EXIT_WITH $1
    hlt
    .align 16
vendor:  .fill 12, 1, 0
kvm_sig: .fill 12, 1, 0
brand:   .fill 48, 1, 0
"""


def _read_strings() -> tuple[bytes, bytes, bytes]:
    vm = Kvm().create_vm(memory_size=8 << 20)
    img = source_image(CPUID_STRINGS)
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    return (
        vm.read_guest(img.symbol("vendor"), 12),
        vm.read_guest(img.symbol("kvm_sig"), 12),
        vm.read_guest(img.symbol("brand"), 48),
    )


def test_guest_reads_vendor_signature_and_brand() -> None:
    """A guest storing CPUID.0 EBX, EDX, ECX reads "GenuineIntel" (it read "GenuntelineI"
    before: ECX and EDX were swapped); the KVM leaf spells "KVMKVMKVM\\0\\0\\0" in EBX, ECX,
    EDX; the brand string is NUL-terminated within its 48 bytes."""
    vendor, kvm_sig, brand = _read_strings()
    assert vendor == b"GenuineIntel"
    assert kvm_sig == b"KVMKVMKVM\0\0\0"
    assert brand == BRAND_STRING.encode().ljust(48, b"\0")
    assert brand[47] == 0


def test_vendor_registers_follow_the_sdm_order() -> None:
    """SDM Vol. 2A CPUID leaf 0: EBX = "Genu", EDX = "ineI", ECX = "ntel"."""
    ebx, ecx, edx = vendor_registers("GenuineIntel")
    assert (ebx, edx, ecx) == (0x756E6547, 0x49656E69, 0x6C65746E)
    basic = default_cpuid().find(0)
    assert basic is not None and (basic.ebx, basic.ecx, basic.edx) == (ebx, ecx, edx)


def test_amd_vendor_disables_out_of_range_fallback() -> None:
    """kvm_cpuid(): only Intel guests get the highest basic leaf for an out-of-range leaf
    (get_out_of_range_cpuid_entry()); the AMD test must recognise "AuthenticAMD" in the
    vendor-string order, or every AMD table would be treated as Intel."""
    amd = default_cpuid(vendor="AuthenticAMD")
    assert amd.lookup(0x20, 0) == ((0, 0, 0, 0), False)
    intel = default_cpuid()
    top = intel.find(0)
    assert top is not None
    assert intel.lookup(0x20, 0)[0] == intel.lookup(top.eax, 0)[0]


def test_brand_string_too_long_is_refused() -> None:
    with pytest.raises(ValueError):
        brand_entries("x" * 48)
    assert brand_entries("")[0] == CpuidEntry(0x80000002)
