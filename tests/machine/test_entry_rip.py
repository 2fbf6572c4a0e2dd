"""SDM 27.3.1.4 end to end: a 64-bit guest may be entered at a RIP whose bits 63:N are identical
but which is not canonical (N = 48: 0000_8000_0000_0000H); the entry succeeds and the guest's
first instruction fetch raises #GP(0) (SDM 3.3.7.1), as kvm-unit-tests' hypercall test expects."""

from __future__ import annotations

from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import VmxSandbox

GP, HARDWARE_EXCEPTION = 13, 3


def test_27_3_1_4_non_canonical_rip_with_bits_63_48_identical_enters_and_faults_on_fetch() -> None:
    sb = VmxSandbox("long", "hlt\n")
    sb.write(F.EXCEPTION_BITMAP, 1 << GP)
    sb.write(F.GUEST_RIP, 0x0000800000000000)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and not exit.failed_vmentry, exit
    assert exit.intr_info & 0xFF == GP and (exit.intr_info >> 8) & 7 == HARDWARE_EXCEPTION
    assert exit.intr_info & (1 << 11) and exit.intr_error_code == 0
    assert sb.rip == 0x0000800000000000


def test_27_3_1_4_rip_with_bits_63_48_differing_fails_the_entry_exit_33() -> None:
    sb = VmxSandbox("long", "hlt\n")
    sb.write(F.GUEST_RIP, 0x0001000000000000)
    exit = sb.run()
    assert exit.failed_vmentry and exit.exit_reason is ExitReason.INVALID_STATE, exit
