"""Every VM entry runs every check (SDM 27.2-27.3, the VMLAUNCH/VMRESUME pseudocode): a second
entry after a change fails exactly as a first entry with the same state would, whatever the
change -- a VMCS field of any area, memory a rule reads, the processor's own mode.

The walk: for each baseline (entry_baselines.py) and each input that any rule reads there
(discovered by the rules' own input record), change the input between two entries and compare
the processor's answer with a full run of every rule from scratch.  Then a Hypothesis property
does the same with random changes, and regression tests pin the stale answers the first cache
gave (issue 12.1).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField, VmcsFieldType, VmcsWidth
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Efer
from pyvmx.vmx import entry_checks
from pyvmx.vmx.entry_cache import EntryCacheMismatch, EntryCheckCache, VmcsChecks, changed_fields
from pyvmx.vmx.entry_checks import CheckArea, CheckInputs, EntryCheckFailure, EntryContext, ProcessorInput
from pyvmx.vmx.entry_checks import controls, guest_non_register, guest_registers, host
from pyvmx.vmx.outcomes import VmxStatus

from . import rule_coverage
from .entry_baselines import BASELINES
from .vmcs_builder import ENTRY_MSR_LOAD_AREA, GUEST_PAE_PDPT, OTHER_VMCS, VIRTUAL_APIC_PAGE, EntryHarness

_WIDTH_BITS = {VmcsWidth.BITS16: 16, VmcsWidth.BITS32: 32, VmcsWidth.BITS64: 64, VmcsWidth.NATURAL: 64}
# For 64-bit fields, the bits whose flips cross a rule's boundary (alignment, physical- and
# linear-address widths, 32-bit limits, sign bit) -- all 64 would only repeat these.
_BITS_64 = (*range(16), 31, 32, 45, 46, 47, 48, 56, 57, 63)


# Segment access rights and limits: bits 31:17 of the access rights are all reserved and limit
# bits 31:20 act together (SDM 27.3.1.2), so a few flips stand for them.
_BITS_SEGMENT = (*range(18), 20, 24, 31)


def _bits(field: VmcsField) -> tuple[int, ...]:
    width = _WIDTH_BITS[field.width]
    if width == 64:
        return _BITS_64
    if field.name.endswith(("_AR_BYTES", "_LIMIT")):
        return _BITS_SEGMENT
    return tuple(range(width))


def _launched(name: str) -> EntryHarness:
    h = BASELINES[name]()
    result = h.launch()
    assert result.status is VmxStatus.SUCCEED, (name, result, h.processor.last_entry_failure)
    return h


def _entry(h: EntryHarness) -> EntryCheckFailure | None:
    """VMRESUME: the rule of SDM 27.2-27.3 the processor reports failing, or None.  The host
    state is put back afterwards (a failed entry loads the host-state area, which a mutation may
    have made unusable for the next VMX instruction)."""
    host = h.processor.host
    h.processor.host = dataclasses.replace(host, selectors=dict(host.selectors), bases=dict(host.bases))
    h.processor.vmresume()
    h.processor.host = host
    failure = h.processor.last_entry_failure
    assert failure is None or isinstance(failure, EntryCheckFailure)
    return None if failure is None or failure.area is CheckArea.MSR_LOADING else failure


def _full(h: EntryHarness) -> EntryCheckFailure | None:
    """Every rule from scratch on the same VMCS, memory and processor state."""
    cpu = h.processor
    return entry_checks.check_all(cpu.current_vmcs_region(), h.profile, h.memory, host_ia32e_mode=cpu.host_ia32e_mode)


def _each_failing(h: EntryHarness) -> set[str]:
    """Every rule that fails in this state (not only the first)."""
    cpu = h.processor
    context = EntryContext(cpu.current_vmcs_region(), h.profile, h.memory, host_ia32e_mode=cpu.host_ia32e_mode)
    return {check.name for check in entry_checks.ALL_CHECKS if check(context) is not None}


def _inputs(h: EntryHarness) -> dict[str, CheckInputs]:
    """What each rule reads in this state (its own record, as the cache keeps it)."""
    cpu = h.processor
    context = EntryContext(cpu.current_vmcs_region(), h.profile, h.memory, host_ia32e_mode=cpu.host_ia32e_mode)
    inputs = {}
    for check in entry_checks.ALL_CHECKS:
        check(context)
        inputs[check.name] = context.take_inputs()
    return inputs


def _set_host_ia32e_mode(h: EntryHarness, on: bool) -> None:
    host = h.processor.host
    host.efer = host.efer | int(Efer.LMA | Efer.LME) if on else host.efer & ~int(Efer.LMA | Efer.LME)
    host.cs_l = on  # a 64-bit host runs VMRESUME in 64-bit code, not compatibility mode


def _walk(name: str, failed: set[str], walked: set[str]) -> None:
    """One baseline: every input of every rule, changed and restored between entries."""
    h = _launched(name)
    vmcs = h.processor.current_vmcs_region()
    inputs = _inputs(h)
    fields = sorted({f for record in inputs.values() for f in record.fields}, key=int)
    memory = sorted({read for record in inputs.values() for read, _ in record.memory})
    processor = {what for record in inputs.values() for what, _ in record.processor}

    def compare(what: str) -> None:
        cached, full = _entry(h), _full(h)
        assert cached == full, f"{name}: after changing {what}: cached {cached}, full run {full}"
        if full is not None:
            failed.update(_each_failing(h))

    for field in fields:
        original = vmcs.read(field)
        for value in (0, (1 << _WIDTH_BITS[field.width]) - 1, *(original ^ (1 << bit) for bit in _bits(field))):
            vmcs.write(field, value)
            compare(f"{field.name} = {value:#x}")
            vmcs.write(field, original)
            assert _entry(h) is None, f"{name}: {field.name} restored"
    for address, size in memory:
        original_bytes = h.memory.read(address, size)
        original = int.from_bytes(original_bytes, "little")
        for bit in range(8 * size):
            h.memory.write(address, (original ^ (1 << bit)).to_bytes(size, "little"))
            compare(f"{size} bytes at {address:#x}, bit {bit} flipped")
            h.memory.write(address, original_bytes)
            assert _entry(h) is None, f"{name}: memory at {address:#x} restored"
    if ProcessorInput.HOST_IA32E_MODE in processor:
        mode = h.processor.host_ia32e_mode
        _set_host_ia32e_mode(h, not mode)
        compare("the processor's IA32_EFER.LMA")
        _set_host_ia32e_mode(h, mode)
        assert _entry(h) is None
    walked.update(check for check, record in inputs.items() if record.fields or record.memory or record.processor)


def test_every_rule_reevaluated_after_a_change_to_each_of_its_inputs() -> None:
    """SDM 27.2-27.3 under re-entry: for every baseline, every input every rule reads (VMCS
    fields of each area, memory, the processor's mode) is changed between two entries; the
    answer must be that of a full run.  Every registered rule reads inputs somewhere, and every
    rule's own outcome is flipped by some change (so the walk shows each one re-evaluated)."""
    failed: set[str] = set()
    walked: set[str] = set()
    for name in BASELINES:
        _walk(name, failed, walked)
    names = {check.name for check in entry_checks.ALL_CHECKS}
    assert names - walked == set()
    assert names - failed == set(), sorted(names - failed)


# --- Hypothesis: random changes between entries --------------------------------------------
_AREA_FIELDS = [f for f in VmcsField if f.type in (VmcsFieldType.CONTROL, VmcsFieldType.GUEST_STATE, VmcsFieldType.HOST_STATE)]


@st.composite
def _changes(draw: st.DrawFn) -> list[tuple[VmcsField, int, bool]]:
    """A batch of field writes: (field, value, whether the value is a bit flip of the current one)."""
    count = draw(st.integers(1, 4))
    batch = []
    for _ in range(count):
        field = draw(st.sampled_from(_AREA_FIELDS))
        bits = _WIDTH_BITS[field.width]
        if draw(st.booleans()):
            batch.append((field, 1 << draw(st.integers(0, bits - 1)), True))
        else:
            batch.append((field, draw(st.integers(0, (1 << bits) - 1)), False))
    return batch


@given(
    baseline=st.sampled_from(sorted(BASELINES)),
    rounds=st.lists(
        st.tuples(_changes(), st.booleans(), st.integers(0, 0xFF), st.booleans()), min_size=1, max_size=4
    ),
)
def test_random_changes_between_entries_cached_answer_equals_full_run(
    baseline: str, rounds: list[tuple[list[tuple[VmcsField, int, bool]], bool, int, bool]]
) -> None:
    """SDM 27.2-27.3: after any sequence of VMCS writes, memory writes (VTPR, the link pointer's
    target, the PAE PDPT) and host-mode changes between entries, the cached answer equals a full
    run of every rule."""
    h = _launched(baseline)
    vmcs = h.processor.current_vmcs_region()
    for changes, poke_memory, byte, toggle_mode in rounds:
        for field, value, flip in changes:
            vmcs.write(field, vmcs.read(field) ^ value if flip else value)
        if poke_memory:
            for address in (VIRTUAL_APIC_PAGE + 0x80, OTHER_VMCS, GUEST_PAE_PDPT + 8 * (byte & 3)):  # VTPR, link, PDPTE
                h.memory.write8(address + (byte >> 6), byte)
        if toggle_mode:
            _set_host_ia32e_mode(h, not h.processor.host_ia32e_mode)
        assert _entry(h) == _full(h)


# --- the stale answers of the first cache, one per input kind ------------------------------
def _guest_fail(h: EntryHarness, check: str, qualification: int) -> None:
    result = h.resume()
    assert result.exit is not None and result.exit.reason == 0x80000021, result
    assert result.exit.qualification == qualification
    failure = h.processor.last_entry_failure
    assert isinstance(failure, EntryCheckFailure) and failure.check == check, failure
    rule_coverage.record(failure)


def _vmfail(h: EntryHarness, error: int, check: str) -> None:
    result = h.resume()
    assert result.status is VmxStatus.FAIL_VALID and result.error == error, result
    failure = h.processor.last_entry_failure
    assert isinstance(failure, EntryCheckFailure) and failure.check == check, failure
    rule_coverage.record(failure)


def test_27_3_1_6_pdpte_in_memory_changed_between_entries_exit_33_qualification_2() -> None:
    """SDM 27.3.1.6: without EPT the PDPTEs are loaded from guest CR3 at every entry."""
    h = _launched("PAE guest without EPT")
    h.memory.write64(GUEST_PAE_PDPT + 8, 0x102000 | 1 | (1 << 5))  # PDPTE1: present, reserved bit 5
    _guest_fail(h, "pdptes_valid", 2)


def test_27_3_1_5_link_pointer_target_changed_between_entries_exit_33_qualification_4() -> None:
    """SDM 27.3.1.5: bits 30:0 of the VMCS the link pointer names are read at every entry."""
    h = _launched("VMCS link pointer, usable LDTR")
    h.memory.write32(OTHER_VMCS, h.profile.revision_id + 1)
    _guest_fail(h, "vmcs_link_pointer", 4)
    h = _launched("VMCS link pointer, usable LDTR")
    h.memory.write32(OTHER_VMCS, h.profile.revision_id | (1 << 31))  # shadow-VMCS indicator
    _guest_fail(h, "vmcs_link_pointer", 4)


def test_27_2_1_1_vtpr_lowered_below_tpr_threshold_between_entries_vmfail_7() -> None:
    """SDM 27.2.1.1: TPR threshold[3:0] <= VTPR[7:4], VTPR read from the virtual-APIC page."""
    h = _launched("TPR shadow")
    h.memory.write8(VIRTUAL_APIC_PAGE + 0x80, 0x30)
    _vmfail(h, 7, "tpr_threshold_vs_vtpr")


def test_27_4_msr_load_area_changed_between_entries_exit_34() -> None:
    """SDM 27.4: the VM-entry MSR-load area is processed at every entry."""
    h = _launched("MSR areas")
    h.memory.write32(ENTRY_MSR_LOAD_AREA, int(Msr.FS_BASE))
    result = h.resume()
    assert result.exit is not None and result.exit.reason == 0x80000022 and result.exit.qualification == 1


@pytest.mark.parametrize(
    ("exit_control", "field", "value", "check"),
    [
        (X.LOAD_IA32_EFER, F.HOST_IA32_EFER, 1 << 12, "host_efer_reserved_bits"),
        (X.LOAD_IA32_PAT, F.HOST_IA32_PAT, 0x02, "host_pat"),
    ],
)
def test_27_2_2_host_rule_rerun_when_an_exit_control_changes_vmfail_8(
    exit_control: X, field: F, value: int, check: str
) -> None:
    """SDM 27.2.2: host IA32_EFER / IA32_PAT are checked only with "load IA32_EFER" / "load
    IA32_PAT" = 1: setting the VM-exit control (a control-area field) re-runs the host rule."""
    h = _launched("64-bit guest")
    h.clear_bits(F.VM_EXIT_CONTROLS, exit_control)
    h.write(field, value)
    assert h.resume().succeeded
    h.set_bits(F.VM_EXIT_CONTROLS, exit_control)
    _vmfail(h, 8, check)


def test_27_2_4_host_rule_rerun_when_host_address_space_size_changes_vmfail_8() -> None:
    """SDM 27.2.4: clearing "host address-space size" on a processor in IA-32e mode fails."""
    h = _launched("32-bit guest")
    h.clear_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE | X.LOAD_IA32_EFER)
    _vmfail(h, 8, "host_addr_space_size_matches_mode")


def test_27_2_1_3_control_rule_rerun_when_guest_cr0_changes_vmfail_7() -> None:
    """SDM 27.2.1.3: deliver-error-code depends on CR0.PE in the guest CR0 field (unrestricted
    guest): #GP with an error code is valid in protected mode, not in real mode."""
    h = _launched("injected #GP")
    h.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.UNRESTRICTED_GUEST)
    assert h.resume().succeeded
    h.clear_bits(F.GUEST_CR0, Cr0.PE | Cr0.PG)
    _vmfail(h, 7, "injection_deliver_error_code")


def test_27_2_4_processor_leaving_ia32e_mode_between_entries_vmfail_8() -> None:
    """SDM 27.2.4: the processor's own IA32_EFER.LMA is an input: the same VMCS that entered from
    a 64-bit host fails from a 32-bit one."""
    h = _launched("32-bit guest")
    _set_host_ia32e_mode(h, False)
    _vmfail(h, 8, "host_addr_space_size_matches_mode")


# --- the debug switch -----------------------------------------------------------------------
def test_recheck_switch_compares_every_entry_with_a_full_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """PYVMX_RECHECK=1 (or recheck=True) runs every rule at every entry and raises if the cached
    answer differs -- shown here with a cache made to answer wrongly."""
    monkeypatch.setenv("PYVMX_RECHECK", "1")
    assert EntryCheckCache().recheck
    monkeypatch.setenv("PYVMX_RECHECK", "0")
    assert not EntryCheckCache().recheck
    assert EntryCheckCache(recheck=True).recheck
    h = _launched("64-bit guest")
    h.processor.entry_check_cache.recheck = True
    h.write(F.GUEST_RIP, 1 << 60)  # fails SDM 27.3.1.4 ...
    monkeypatch.setattr(VmcsChecks, "check", lambda *args: None)  # ... but the cache says "passes"
    with pytest.raises(EntryCacheMismatch):
        h.resume()


def test_changed_fields_names_each_changed_slot() -> None:
    h = EntryHarness()
    vmcs = h.processor.current_vmcs_region()
    before = vmcs.data_bytes()
    for field in (F.GUEST_RIP, F.HOST_CR3, F.VM_EXIT_REASON, F.PIN_BASED_VM_EXEC_CONTROL):
        vmcs.write(field, vmcs.read(field) ^ 0x10)
    assert set(changed_fields(before, vmcs.data_bytes())) == {
        F.GUEST_RIP, F.HOST_CR3, F.VM_EXIT_REASON, F.PIN_BASED_VM_EXEC_CONTROL,
    }


def test_rules_read_the_entry_only_through_recorded_inputs() -> None:
    """The cache is exact only if a rule reads nothing its EntryContext does not record: no rule
    module touches a private attribute of the context, or memory, the VMCS or the processor
    directly (every ``e.<name>`` is a public member of EntryContext)."""
    public = {name for name in dir(EntryContext) if not name.startswith("_")} | {"profile"}
    for module in (controls, host, guest_registers, guest_non_register):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "e":
                assert node.attr in public, f"{module.__name__}: e.{node.attr}"
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not imported & {"PhysicalMemory", "Processor", "VmcsRegion"}, module.__name__
