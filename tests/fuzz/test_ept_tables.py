"""Random EPT paging structures: entries at every level (PML4E ... PTE) that map the guest's
code, stack, descriptor and page tables rewritten with any permissions, memory type, ignore-PAT
and large-page bits, reserved bits and host addresses -- including host memory the guest must
never see (its own VMCS, the EPT tables, past the end of memory) -- and random EPTP attributes.

Each entry ends in an EPT violation or EPT misconfiguration VM exit (SDM 29.3.3.1, 29.3.3.2),
a VM-entry failure for a bad EPTP (SDM 27.2.1.1, error 7), or in the guest running on what the
entries allow -- never a Python exception.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import VmxSandbox
from tests.fuzz.ledger import Stopwatch, examples
from tests.fuzz.strategies import U64, EptEdit, GuestMode, ept_edits, eptp_low_bits, guest_bytes, io_programs, encode_program, machine_controls
from tests.fuzz.targets import is_failure, run_machine_input

MACHINE_MODES = [GuestMode.REAL, GuestMode.PROTECTED32, GuestMode.LONG]
EPT_ADDRESS_MASK = 0x000FFFFFFFFFF000


def apply_ept_edit(sb: VmxSandbox, edit: EptEdit) -> None:
    """Walk the sandbox's EPT from its root towards ``edit.gpa`` and rewrite the entry at
    ``edit.level`` (if the walk gets there: a non-present or large-page entry above ends it)."""
    memory = sb.memory
    table = sb.ept_root
    for level in (4, 3, 2, 1):
        slot = table + ((edit.gpa >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        entry = memory.read64(slot)
        if level == edit.level:
            value = entry ^ (1 << edit.flip) if edit.flip is not None else edit.value
            memory.write64(slot, value & U64)
            return
        if not entry & 7 or entry & 0x80:
            return
        table = entry & EPT_ADDRESS_MASK
        if table + 4096 > memory.size:
            return


@pytest.mark.parametrize("mode", MACHINE_MODES, ids=lambda m: m.name.lower())
@settings(max_examples=examples(40), deadline=None)
@given(code=guest_bytes | io_programs.map(lambda ops: encode_program(ops, 64)), controls=machine_controls,
       edits=ept_edits, eptp=st.none() | eptp_low_bits)
def test_random_ept_tables(mode: GuestMode, code: bytes, controls, edits: list[EptEdit], eptp: int | None) -> None:  # type: ignore[no-untyped-def]
    clock = Stopwatch()

    def prepare(sb: VmxSandbox) -> None:
        for edit in edits:
            apply_ept_edit(sb, edit)
        sb.cpu.invept(2, 0)
        if eptp is not None:
            sb.write(F.EPT_POINTER, sb.ept_root | eptp)

    result = run_machine_input(mode, code, controls, prepare=prepare)
    clock.record("machine: EPT tables", result.kind, guest=result.ran_guest)
    assert not is_failure(result.kind), f"{mode.name} {code.hex()} {edits} eptp={eptp}: {result}"
