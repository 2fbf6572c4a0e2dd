"""Random MSR and control-register writes (and reads), in every mode, under random intercepts.

WRMSR/RDMSR of architectural, VMX-capability, KVM paravirtual and unknown MSRs with any value
end in a #GP the guest takes, an MSR exit the hypervisor emulates (SDM 26.1.3, 25.6.9 MSR
bitmaps; Linux kvm_emulate_wrmsr()), or a pass-through; MOV to CR0/CR3/CR4/CR8 with any value
in a #GP, a CR-access exit (SDM 26.1.3, 25.6.6 guest/host masks; Linux handle_cr()) or a mode
change -- including into states VM entry then refuses (SDM 27.3.1.1), which is a FailEntry,
never an exception.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from tests.fuzz.ledger import Stopwatch, examples
from tests.fuzz.strategies import ALL_MODES, GuestMode, encode_program, hv_intercepts, machine_controls, msr_cr_programs
from tests.fuzz.targets import is_failure, run_hv_input, run_machine_input

MACHINE_MODES = [GuestMode.REAL, GuestMode.PROTECTED32, GuestMode.LONG]


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(30), deadline=None)
@given(ops=msr_cr_programs, intercepts=hv_intercepts)
def test_random_msr_and_cr_writes_on_the_hypervisor(mode: GuestMode, ops, intercepts) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()
    result = run_hv_input(mode, encode_program(ops, mode.bits), intercepts)
    clock.record("hv: MSR + CR writes", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {ops} {intercepts}: {result}"


@pytest.mark.parametrize("mode", MACHINE_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(20), deadline=None)
@given(ops=msr_cr_programs, controls=machine_controls)
def test_random_msr_and_cr_writes_on_the_bare_machine(mode: GuestMode, ops, controls) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()
    result = run_machine_input(mode, encode_program(ops, mode.bits), controls)
    clock.record("machine: MSR + CR writes", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {ops} {controls}: {result}"
