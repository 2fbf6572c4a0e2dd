"""Random port I/O and MMIO sequences, in every mode: IN/OUT and REP INS/OUTS of 1, 2 and 4
bytes to the in-kernel devices and to unclaimed ports, loads and stores of 1-8 bytes to RAM,
to nothing, across page and RAM/MMIO boundaries and beyond MAXPHYADDR.

On the hypervisor each access is an in-kernel device access, an IoExit/MmioExit the VMM
completes (SDM 26.1.3 I/O exiting, 29.3.3 EPT misconfigurations for MMIO; Linux
complete_fast_pio_in(), complete_emulated_mmio()), an emulation failure KVM also reports, or a
fault the guest takes -- never a Python exception. On the bare machine they are I/O exits by the
bitmaps (SDM 25.6.4), EPT violations (SDM 29.3.3.2) or guest faults.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from tests.fuzz.ledger import Stopwatch, examples
from tests.fuzz.strategies import ALL_MODES, GuestMode, hv_intercepts, io_programs, machine_controls, encode_program
from tests.fuzz.targets import is_failure, run_hv_input, run_machine_input

MACHINE_MODES = [GuestMode.REAL, GuestMode.PROTECTED32, GuestMode.LONG]


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(30), deadline=None)
@given(ops=io_programs, intercepts=hv_intercepts)
def test_random_port_and_mmio_accesses_on_the_hypervisor(mode: GuestMode, ops, intercepts) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()
    code = encode_program(ops, mode.bits)
    result = run_hv_input(mode, code, intercepts)
    clock.record("hv: port I/O + MMIO", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {ops} {intercepts}: {result}"


@pytest.mark.parametrize("mode", MACHINE_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(20), deadline=None)
@given(ops=io_programs, controls=machine_controls)
def test_random_port_and_memory_accesses_on_the_bare_machine(mode: GuestMode, ops, controls) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()
    result = run_machine_input(mode, encode_program(ops, mode.bits), controls)
    clock.record("machine: port I/O + memory", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {ops} {controls}: {result}"
