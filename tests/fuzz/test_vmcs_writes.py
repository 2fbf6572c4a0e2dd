"""Random VMCS writes, then VMLAUNCH and VMRESUME: any field, any value (or one bit of the
current value flipped), before the launch and again between entries.

VMWRITE itself succeeds or fails with its VM-instruction error (SDM 31.3 VMWRITE; 31.4 error
numbers); the entry that follows ends in VMfailValid for bad controls or host state (SDM 27.2,
27.3 errors 7 and 8), in a VM exit with bit 31 set for bad guest state (SDM 27.3.1, 27.8), or runs
the guest to a VM exit -- never a Python exception.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmx.guest.sandbox import VmxSandbox
from tests.fuzz.ledger import Stopwatch, examples
from tests.fuzz.strategies import GuestMode, VmcsWrite, guest_bytes, machine_controls, vmcs_writes
from tests.fuzz.targets import is_failure, run_machine_input

MACHINE_MODES = [GuestMode.REAL, GuestMode.PROTECTED32, GuestMode.LONG]


def vmwrite_all(sb: VmxSandbox, writes: list[VmcsWrite]) -> None:
    """Each write through the VMWRITE instruction (a failing one is a VMfail, and the next goes on)."""
    cpu = sb.cpu
    for w in writes:
        value = w.value
        if w.flip is not None:
            current = cpu.vmread(int(w.field))
            value = (current.value or 0) ^ (1 << w.flip)
        cpu.vmwrite(int(w.field), value)


@pytest.mark.parametrize("mode", MACHINE_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(40), deadline=None)
@given(code=guest_bytes, controls=machine_controls, before=vmcs_writes, between=st.none() | vmcs_writes)
def test_random_vmcs_writes_then_vmlaunch_and_vmresume(mode: GuestMode, code: bytes, controls, before, between) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()

    def resume_writes(sb: VmxSandbox, entry: int) -> None:
        if entry == 2 and between is not None:
            vmwrite_all(sb, between)

    result = run_machine_input(mode, code, controls, prepare=lambda sb: vmwrite_all(sb, before), between=resume_writes)
    clock.record("machine: VMCS writes", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {code.hex()} {before} {between}: {result}"
