"""Every CPUID feature flag the model advertises is backed: a guest executes one instruction (or
uses the control bit / MSR) of each and the result is the architectural one (SDM Vol. 1/2 for
each instruction; the flags from SDM Vol. 2A CPUID Tables 3-10, 3-11 and leaf 07H).

The model is KVM's: kvm_set_cpu_caps() (arch/x86/kvm/cpuid.c) advertises what the host
executes, masked to what KVM supports (pyvmx.kvm.cpu_features). Before this, CPUID advertised
SMAP while CLAC/STAC raised #UD in the engine (Unicorn's default model has no SMAP).

One guest runs all the probes (an exception is recorded as 0xE00000vv and the guest goes on
with the next one); flags whose test needs its own guest (paging modes, privilege changes)
name that test in COVERED_ELSEWHERE.
"""

from __future__ import annotations

import importlib
import pytest

from pyvmx.kvm.cpu_features import ADVERTISED, DYNAMIC, feature
from pyvmx.kvm.cpuid import default_cpuid
from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, source_image, u32

pytestmark = pytest.mark.machine


def _crc32c_byte(crc: int, byte: int) -> int:
    """CRC32 instruction (SDM Vol. 2A CRC32: polynomial 11EDC6F41H, bit-reflected), one byte,
    no initial or final inversion."""
    crc ^= byte
    for _ in range(8):
        crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


UD = 0xE0000006

# feature -> (instructions leaving the result in EAX, the result SDM semantics give)
PROBES: dict[str, tuple[str, int]] = {
    "FPU": ("fninit; fld1; fld1; faddp; fistpl scratch(%rip); mov scratch(%rip), %eax", 2),
    "DE": ("mov %cr4, %rax; or $8, %rax; mov %rax, %cr4; mov %dr4, %rax; xor %eax, %eax", UD),
    "TSC": ("rdtsc; mov %eax, %ecx; rdtsc; sub %ecx, %eax; cmp $0, %eax; setg %al; movzbl %al, %eax", 1),
    "MSR": ("mov $0x1b, %ecx; rdmsr; and $0xFFFFF000, %eax", 0xFEE00000),
    "PAE": ("mov %cr4, %rax; and $0x20, %eax", 0x20),
    "MCE": ("mov $0x179, %ecx; rdmsr; mov %cr4, %rax; or $0x40, %rax; mov %rax, %cr4; mov %cr4, %rax;"
            " and $0x40, %eax", 0x40),
    "CX8": ("movl $5, scratch(%rip); movl $0, scratch+4(%rip); mov $5, %eax; xor %edx, %edx; mov $9, %ebx;"
            " xor %ecx, %ecx; cmpxchg8b scratch(%rip); setz %al; movzbl %al, %eax; add scratch(%rip), %eax", 10),
    "MTRR": ("mov $0xfe, %ecx; rdmsr; and $0xff, %eax", 8),
    "PGE": ("mov %cr4, %rax; or $0x80, %rax; mov %rax, %cr4; mov %cr4, %rax; and $0x80, %eax", 0x80),
    "CMOV": ("xor %eax, %eax; mov $5, %ecx; cmp %ecx, %ecx; cmove %ecx, %eax", 5),
    "PAT": ("mov $0x277, %ecx; mov $0x70406, %eax; mov $0x70406, %edx; wrmsr; xor %eax, %eax; rdmsr", 0x70406),
    "CLFLUSH": ("movl $0x77, scratch(%rip); clflush scratch(%rip); mov scratch(%rip), %eax", 0x77),
    "MMX": ("mov $0x0102030405060708, %rax; movq %rax, %mm0; paddb %mm0, %mm0; movq %mm0, %rax; emms", 0x0A0C0E10),
    "FXSR": ("fninit; fxsave fxarea(%rip); movzwl fxarea(%rip), %eax", 0x37F),
    "XMM": ("mov $1, %eax; cvtsi2ss %eax, %xmm0; addss %xmm0, %xmm0; cvttss2si %xmm0, %eax", 2),
    "XMM2": ("mov $21, %eax; cvtsi2sd %eax, %xmm0; addsd %xmm0, %xmm0; cvttsd2si %xmm0, %eax", 42),
    "XMM3": ("movaps vec1234(%rip), %xmm0; haddps %xmm0, %xmm0; cvttss2si %xmm0, %eax", 3),
    "PCLMULQDQ": ("mov $3, %eax; movq %rax, %xmm0; movq %rax, %xmm1; pclmulqdq $0, %xmm1, %xmm0; movq %xmm0, %rax", 5),
    "SSSE3": ("mov $-5, %eax; movd %eax, %xmm0; pabsd %xmm0, %xmm0; movd %xmm0, %eax", 5),
    "CX16": ("lea cx16area(%rip), %rdi; movq $1, (%rdi); movq $2, 8(%rdi); mov $1, %eax; mov $2, %edx;"
             " mov $7, %ebx; mov $8, %ecx; cmpxchg16b (%rdi); mov (%rdi), %eax; add 8(%rdi), %eax", 15),
    "XMM4_1": ("mov $7, %eax; pinsrd $1, %eax, %xmm0; pextrd $1, %xmm0, %eax", 7),
    "XMM4_2": ("xor %eax, %eax; mov $0x61, %ecx; crc32b %cl, %eax", _crc32c_byte(0, 0x61)),
    "MOVBE": ("movl $0x11223344, scratch(%rip); movbe scratch(%rip), %eax", 0x44332211),
    "POPCNT": ("mov $0xF0F0, %ecx; popcnt %ecx, %eax", 8),
    "AES": ("pxor %xmm0, %xmm0; pxor %xmm1, %xmm1; aesenc %xmm1, %xmm0; movd %xmm0, %eax", 0x63636363),
    "XSAVE": ("fninit; mov $1, %eax; xor %edx, %edx; xsave xsarea(%rip); movzwl xsarea(%rip), %eax", 0x37F),
    "OSXSAVE": ("mov $1, %eax; cpuid; shr $27, %ecx; and $1, %ecx; mov %ecx, %eax", 1),
    "RDRAND": ("rdrand %eax; setc %al; movzbl %al, %eax", 1),
    "HYPERVISOR": ("mov $0x40000000, %eax; cpuid; mov %ebx, %eax", int.from_bytes(b"KVMK", "little")),
    "FSGSBASE": ("lea fsdata(%rip), %rax; sub $0x10, %rax; wrfsbase %rax; mov %fs:0x10, %ebx; rdfsbase %rcx;"
                 " lea fsdata(%rip), %rdx; sub %rcx, %rdx; xor %ecx, %ecx; wrfsbase %rcx; lea (%rbx,%rdx), %eax", 0x5EED + 0x10),
    "BMI1": ("mov $0xF0, %ecx; mov $0xFF, %edx; andn %edx, %ecx, %eax", 0x0F),
    "BMI2": ("mov $3, %ecx; mov $1, %edx; shlx %ecx, %edx, %eax", 8),
    "ERMS": ("lea fsdata(%rip), %rsi; lea scratch(%rip), %rdi; mov $4, %ecx; rep movsb; mov scratch(%rip), %eax", 0x5EED),
    "RDSEED": ("rdseed %eax; setc %al; movzbl %al, %eax", 1),
    "ADX": ("stc; mov $1, %eax; mov $1, %ecx; adcx %ecx, %eax", 3),
    "SMAP": ("stac; pushfq; pop %rax; clac; pushfq; pop %rcx; xor %rcx, %rax; shr $18, %eax", 1),
    "CLFLUSHOPT": ("movl $0x78, scratch(%rip); clflushopt scratch(%rip); mov scratch(%rip), %eax", 0x78),
    "CLWB": ("movl $0x79, scratch(%rip); clwb scratch(%rip); mov scratch(%rip), %eax", 0x79),
    "LAHF_LM": ("xor %eax, %eax; stc; lahf; shr $8, %eax; and $1, %eax", 1),
    "ABM": ("mov $1, %ecx; lzcnt %ecx, %eax", 31),
    "3DNOWPREFETCH": ("prefetchw scratch(%rip); mov $1, %eax", 1),
    "RDTSCP": ("mov $0xC0000103, %ecx; mov $0x77, %eax; xor %edx, %edx; wrmsr; rdtscp; mov %ecx, %eax", 0x77),
    "NX": ("mov $0xC0000080, %ecx; rdmsr; and $0x800, %eax", 0x800),
    "LM": ("mov $0xC0000080, %ecx; rdmsr; and $0x400, %eax", 0x400),
}

# Flags whose backing needs a guest of its own: "module::test".
COVERED_ELSEWHERE: dict[str, str] = {
    "SEP": "tests.kvm.cpu.test_syscall::test_ring3_round_trip_with_sysexit_and_sysenter",
    "SYSCALL": "tests.kvm.cpu.test_syscall::test_ring3_round_trip_with_syscall_and_sysret",
    "PSE": "tests.kvm.cpu.test_paging_features::test_pse_and_pse36_4mb_pages",
    "PSE36": "tests.kvm.cpu.test_paging_features::test_pse_and_pse36_4mb_pages",
    "SMEP": "tests.kvm.cpu.test_paging_features::test_smep_smap_and_nx",
    "SMAP": "tests.kvm.cpu.test_paging_features::test_smep_smap_and_nx",
    "NX": "tests.kvm.cpu.test_paging_features::test_smep_smap_and_nx",
    "PDPE1GB": "tests.kvm.cpu.test_paging_features::test_1gb_page",
    "CONSTANT_TSC": "tests.kvm.cpu.test_tsc_rate::test_pit_periods_measured_in_tsc_match_cpuid",
}

_EXCEPTION_STUBS = "".join(
    f"exc{v}:\n" + ("    add $8, %rsp\n" if v in (13, 14) else "") + f"    mov $0x{0xE0000000 | v:x}, %eax\n    jmp fault_common\n"
    for v in (6, 7, 13, 14)
)


def _guest() -> str:
    body = []
    for i, (name, (code, _)) in enumerate(PROBES.items()):
        body.append(
            f"    # {name}\n    movl ${i}, cur(%rip)\n    lea resume_{i}(%rip), %rax\n    mov %rax, resume(%rip)\n"
            f"    {code.replace('; ', chr(10) + '    ')}\n    mov %eax, results+{4 * i}(%rip)\nresume_{i}:\n"
        )
    return rf"""
    SET_GATE 6, exc6
    SET_GATE 7, exc7
    SET_GATE 13, exc13
    SET_GATE 14, exc14
    LOAD_IDT
    mov %cr4, %rax
    or $((1 << 9) | (1 << 10) | (1 << 16) | (1 << 18)), %rax   # OSFXSR, OSXMMEXCPT, FSGSBASE, OSXSAVE
    mov %rax, %cr4
{''.join(body)}
    EXIT_WITH $0x33
    hlt
{_EXCEPTION_STUBS}
fault_common:
    mov cur(%rip), %ecx
    lea results(%rip), %rdx
    mov %eax, (%rdx,%rcx,4)
    mov resume(%rip), %rax
    mov %rax, (%rsp)
    iretq
    .align 64
xsarea:  .fill 0x240, 1, 0
    .align 16
fxarea:  .fill 512, 1, 0
cx16area: .quad 0, 0
vec1234: .float 1.0, 2.0, 3.0, 4.0
scratch: .quad 0
fsdata:  .long 0x5EED
cur:     .long 0
resume:  .quad 0
results: .fill {len(PROBES)}, 4, 0xDEADBEEF
    IDT_TABLE
"""


@pytest.fixture(scope="module")
def probe_results() -> dict[str, int]:
    vm = Kvm().create_vm(memory_size=8 << 20)
    img = source_image(_guest())
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(0x33)
    base = img.symbol("results")
    return {name: u32(vm, base + 4 * i) for i, name in enumerate(PROBES)}


@pytest.mark.parametrize("name", list(PROBES))
def test_advertised_feature_executes(name: str, probe_results: dict[str, int]) -> None:
    assert probe_results[name] == PROBES[name][1], f"{name}: {probe_results[name]:#x}"


def _advertised_bits() -> set[str]:
    table = default_cpuid()
    names = set()
    for f in ADVERTISED:
        entry = table.find(f.function, f.index)
        assert entry is not None
        if getattr(entry, f.register) & f.mask or f.name in DYNAMIC:
            names.add(f.name)
    return names


def test_every_advertised_flag_is_backed() -> None:
    """kvm_set_cpu_caps()'s rule: nothing is advertised that is not executed. Every set bit of
    leaves 01H, 07H.0 and 80000001H is a known feature, and each has a probe or a test."""
    table = default_cpuid()
    known = {(f.function, f.index, f.register): 0 for f in ADVERTISED}
    for f in ADVERTISED:
        known[(f.function, f.index, f.register)] |= f.mask
    for (function, index, register), mask in known.items():
        entry = table.find(function, index)
        assert entry is not None and getattr(entry, register) & ~mask == 0
    for f, register in ((0x7, "ecx"), (0x7, "edx"), (0x80000001, "eax")):
        entry = table.find(f, 0)
        assert entry is not None and getattr(entry, register) == 0
    for name in _advertised_bits():
        assert name in PROBES or name in COVERED_ELSEWHERE, f"{name} is advertised but nothing executes it"
    for target in COVERED_ELSEWHERE.values():
        module, test = target.split("::")
        assert callable(getattr(importlib.import_module(module), test)), target


def test_unbacked_features_are_not_advertised() -> None:
    """What Unicorn 2.1.4 turns into #UD whatever the CPU model (probed: AVX, F16C, XSAVEC,
    INVPCID, RDPID, PKU) stays out of CPUID, as do x2APIC and the TSC deadline timer (no local
    APIC) and VMX (no nested virtualization)."""
    table = default_cpuid()
    leaf1, leaf7 = table.find(1), table.find(7)
    assert leaf1 is not None and leaf7 is not None
    for bit in (5, 12, 21, 24, 28, 29):  # VMX, FMA, x2APIC, TSC-deadline, AVX, F16C
        assert not leaf1.ecx & (1 << bit)
    for bit in (5, 10, 29):  # AVX2, INVPCID, SHA
        assert not leaf7.ebx & (1 << bit)
    assert not leaf7.ecx & ((1 << 3) | (1 << 22))  # PKU, RDPID
    xsave1 = table.find(0xD, 1)
    assert xsave1 is not None and xsave1.eax == 0  # no XSAVEOPT/XSAVEC/XSAVES advertised


def test_feature_lookup() -> None:
    assert feature("SMAP").function == 7 and feature("SMAP").bit == 20
    with pytest.raises(KeyError):
        feature("AVX")
