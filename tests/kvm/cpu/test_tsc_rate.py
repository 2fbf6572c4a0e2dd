"""The TSC rate a guest reads from CPUID instead of calibrating: SDM Vol. 2A CPUID leaf 15H
(TSC = crystal * EBX / EAX, what Linux's native_calibrate_tsc() uses), 16H (MHz) and the
40000010H timing leaf QEMU gives KVM guests (EAX = TSC kHz). The rate is the profile's
``tsc_hz`` (or Kvm(tsc_hz=)), and it is the rate at which guest time runs for the devices: a
guest counting TSC ticks across PIT periods measures exactly the rate CPUID reported."""

from __future__ import annotations

import pytest

from pyvmx.kvm.cpuid import tsc_entries
from pyvmx.kvm.exits import DebugExit
from pyvmx.kvm.kvm import Kvm
from pyvmx.vmx.caps import CpuProfile

from tests.kvm.hv.guests import DEFAULT_LIMIT, boot, image, source_image, u32

pytestmark = pytest.mark.machine

TSC_LEAVES = r"""
    mov $0x15, %eax
    cpuid
    mov %eax, out(%rip)
    mov %ebx, out+4(%rip)
    mov %ecx, out+8(%rip)
    mov $0x16, %eax
    cpuid
    mov %eax, out+12(%rip)
    mov $0x40000000, %eax
    cpuid
    mov %eax, out+16(%rip)
    mov $0x40000010, %eax
    cpuid
    mov %eax, out+20(%rip)
    xor %eax, %eax
    cpuid
    mov %eax, out+24(%rip)
    EXIT_WITH $1
    hlt
    .align 8
out: .fill 28, 1, 0
"""


@pytest.mark.parametrize("tsc_hz", [1_000_000_000, 2_100_000_000])
def test_guest_reads_the_tsc_rate(tsc_hz: int) -> None:
    """CPUID.0 reaches 16H; 15H gives crystal * EBX / EAX = the TSC rate; 16H the MHz; the KVM
    signature leaf reaches 40000010H, whose EAX is the rate in kHz."""
    vm = Kvm(tsc_hz=tsc_hz).create_vm(memory_size=8 << 20)
    img = source_image(TSC_LEAVES)
    vcpu = boot(vm, img)
    assert vcpu.run(time_limit=DEFAULT_LIMIT) == DebugExit(1)
    out = [u32(vm, img.symbol("out") + 4 * i) for i in range(7)]
    denominator, numerator, crystal, mhz, kvm_max, kvm_khz, basic_max = out
    assert basic_max >= 0x16 and kvm_max >= 0x40000010
    assert denominator and crystal * numerator // denominator == tsc_hz
    assert mhz == tsc_hz // 1_000_000
    assert kvm_khz == tsc_hz // 1000


def test_profile_rate_is_the_default() -> None:
    assert Kvm().tsc_hz == CpuProfile().tsc_hz
    with pytest.raises(ValueError):
        tsc_entries(5_000_000_000)  # does not fit CPUID.15H:ECX * EBX / EAX in 32-bit registers


def test_pit_periods_measured_in_tsc_match_cpuid() -> None:
    """Guest time: each retired instruction advances the TSC by ``tsc_per_instruction`` and
    halted time jumps to the next event; the PIT is clocked from the same guest TSC at
    ``tsc_hz`` ticks per second. So 20 periods of a ~1 kHz PIT last 20 * 1193 / 1193182 s =
    that many seconds times the CPUID-reported rate, here 2.5 GHz -- with the guest halted
    nearly all the time: the TSC is invariant (CPUID 80000007H:EDX[8])."""
    tsc_hz = 2_500_000_000
    vm = Kvm(tsc_hz=tsc_hz).create_vm(memory_size=8 << 20)
    img = image("pit_ticks.S")
    vcpu = boot(vm, img)
    vm.write_guest(img.symbol("target"), (20).to_bytes(4, "little"))
    assert vcpu.run(time_limit=4 * DEFAULT_LIMIT) == DebugExit(20)
    reported = tsc_entries(tsc_hz)[0]
    rate = reported.ecx * reported.ebx // reported.eax
    period = rate * 1193 // 1193182
    assert 19 * period <= vcpu.guest_tsc() <= 21 * period
    # Invariant TSC (CPUID 80000007H:EDX[8]): it kept the same rate while the guest was halted,
    # which is nearly all of the time.
    assert vcpu.stats.halted_tsc > 0.99 * vcpu.guest_tsc()
