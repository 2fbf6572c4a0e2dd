"""Random bytes as guest code, in every processor mode, under random intercepts -- on the
KVM-style hypervisor (``vcpu.run()``) and on the bare VT-x machine (VMLAUNCH/VMRESUME).

Whatever the guest executes, each run ends in a typed value (STYLE.md: bad guest input never
escapes the run loop): on the hypervisor an exit value of pyvmx.kvm.exits (IoExit, MmioExit,
HltExit, ShutdownExit, DebugExit, FailEntry, TimeLimitExit, or an InternalError that is a
documented limitation, see targets.DOCUMENTED_INTERNAL_ERRORS), within the run's guest-time
limit; on the bare machine a VM exit with an SDM exit reason (SDM 26.1-26.2, Appendix C), a
failed VM entry (SDM 27.8) or a reported stall. The VMX-preemption timer (SDM 26.5.1) and the
time limit bound every run; a wall-clock watchdog turns a hang into a failure.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.ledger import Stopwatch, examples
from tests.fuzz.strategies import ALL_MODES, GuestMode, guest_bytes, hv_intercepts, machine_controls
from tests.fuzz.targets import is_failure, run_hv_input, run_machine_input

MACHINE_MODES = [GuestMode.REAL, GuestMode.PROTECTED32, GuestMode.LONG]


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(40), deadline=None)
@given(code=guest_bytes, intercepts=hv_intercepts)
def test_random_guest_bytes_on_the_hypervisor_end_in_an_exit_value(mode: GuestMode, code: bytes, intercepts) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()
    result = run_hv_input(mode, code, intercepts)
    clock.record("hv: guest bytes", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {code.hex()} {intercepts}: {result}"


@pytest.mark.parametrize("mode", MACHINE_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(40), deadline=None)
@given(code=guest_bytes, controls=machine_controls)
def test_random_guest_bytes_on_the_bare_machine_end_in_an_exit(mode: GuestMode, code: bytes, controls) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()
    result = run_machine_input(mode, code, controls)
    clock.record("machine: guest bytes", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {code.hex()} {controls}: {result}"


# 66H-prefixed near branches in 16-bit code: a 32-bit target EIP far beyond the 64-KiB segment.
_BRANCHES_32_IN_16 = [bytes.fromhex(h) for h in ("6671", "66eb", "6670", "66e9f4f4f4f4")]


@settings(max_examples=examples(150), deadline=None)
@given(code=st.sampled_from(_BRANCHES_32_IN_16), mode=st.sampled_from([GuestMode.VIRTUAL8086, GuestMode.REAL, GuestMode.PROTECTED16]),
       intercepts=hv_intercepts)
def test_32_bit_near_branches_in_16_bit_code(code: bytes, mode: GuestMode, intercepts) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzz: after ``66 EB F4`` (JMP rel8, 32-bit operand size) in virtual-8086
    mode EIP = FFFFFFF7H, kept sign-extended in the core's RIP; when the HLT there faulted (#GP
    at CPL 3), the engine looked the instruction up at CS.base + RIP -- beyond 2^64 -- and
    raised OverflowError. Outside 64-bit mode a linear address is 32 bits (SDM 3.4)."""
    result = run_hv_input(mode, code, intercepts)
    assert not is_failure(result.kind), f"{mode.name} {code.hex()} {intercepts}: {result}"
